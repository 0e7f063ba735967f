"""The scheduler: filters -> weighted scorers -> picker, built from YAML config.

Called once per request on the ext_proc server's event loop, so one `schedule` is synchronous and
O(endpoints + prompt blocks): lists of floats, no logging, no per-candidate dicts.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from picker.config import Config, MetricsConfig, PluginSpec, SchedulingConfig
from picker.datalayer.endpoint import Endpoint
from picker.datalayer.pool import EndpointPool
from picker.request import InferenceRequest
from picker.scheduling.filters import HealthyFilter
from picker.scheduling.interface import Filter, Picker, PickObserver, Scorer
from picker.scheduling.pickers import TIE_TOLERANCE, MaxScorePicker
from picker.scheduling.scorers import (
    InflightLoadScorer,
    KVCacheUtilizationScorer,
    LatencyScorer,
    PrefixCacheScorer,
    QueueScorer,
    SessionAffinityScorer,
)
from picker.telemetry import DECISIONS


@dataclass(frozen=True, slots=True)
class PluginContext:
    """What plugins may share: a plugin field with one of these names is filled from here."""

    pool: EndpointPool
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    clock: Callable[[], float] = time.monotonic  # injectable so tests control time
    rng: random.Random = field(default_factory=random.Random)  # tie-breaks; seed it in tests


_CONTEXT_FIELDS = frozenset(f.name for f in fields(PluginContext))

FILTERS: dict[str, type] = {cls.name: cls for cls in (HealthyFilter,)}
SCORERS: dict[str, type] = {
    cls.name: cls
    for cls in (
        QueueScorer,
        KVCacheUtilizationScorer,
        InflightLoadScorer,
        LatencyScorer,
        PrefixCacheScorer,
        SessionAffinityScorer,
    )
}
PICKERS: dict[str, type] = {cls.name: cls for cls in (MaxScorePicker,)}


def build_plugin(kind: str, registry: Mapping[str, type], spec: PluginSpec, ctx: PluginContext) -> Any:
    """Construct the plugin `spec.type` from its params; raise ValueError on anything unknown.

    Params are the plugin dataclass's init fields not named after a context attribute; each must
    have the type of the field's default (an int is accepted for a float).
    """
    cls = registry.get(spec.type)
    if cls is None:
        raise ValueError(f"unknown {kind} type {spec.type!r}; known: {', '.join(sorted(registry))}")
    where = f"{kind} {spec.type!r}"
    accepted = {f.name: f for f in fields(cls) if f.init and f.name not in _CONTEXT_FIELDS}
    unknown = spec.params.keys() - accepted.keys()
    if unknown:
        raise ValueError(f"{where}: unknown params {sorted(unknown)}; accepted: {sorted(accepted) or 'none'}")
    params = {key: _typed(where, accepted[key], value) for key, value in spec.params.items()}
    shared = {f.name: getattr(ctx, f.name) for f in fields(cls) if f.name in _CONTEXT_FIELDS}
    try:
        return cls(**shared, **params)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _typed(where: str, param: Field[Any], value: Any) -> Any:
    expected = type(param.default) if param.default is not MISSING else object
    if expected is float and type(value) is int:
        return float(value)
    if type(value) is not expected and expected is not object:
        raise ValueError(f"{where}: param {param.name!r} must be {expected.__name__}, not {value!r}")
    return value


@dataclass(slots=True)
class SchedulingResult:
    endpoints: list[Endpoint]  # the pick first, then fallbacks
    reason: str  # scorer that most separated the winner from the runner-up, or a special case


class Scheduler:
    """Runs one scheduling cycle per request with the plugins `config` names."""

    def __init__(self, config: SchedulingConfig, ctx: PluginContext) -> None:
        for spec in config.scorers:
            if not (math.isfinite(spec.weight) and spec.weight >= 0):
                raise ValueError(f"scorer {spec.type!r}: weight must be finite and >= 0")
        self.filters: list[Filter] = [build_plugin("filter", FILTERS, s, ctx) for s in config.filters]
        self.scorers: list[Scorer] = [build_plugin("scorer", SCORERS, s, ctx) for s in config.scorers]
        self.weights: list[float] = [s.weight for s in config.scorers]
        self.picker: Picker = build_plugin("picker", PICKERS, config.picker, ctx)
        self.observers: list[PickObserver] = [
            plugin
            for plugin in (*self.filters, *self.scorers, self.picker)
            if callable(getattr(plugin, "on_pick", None))
        ]

    @classmethod
    def from_config(
        cls,
        config: Config,
        pool: EndpointPool,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> Scheduler:
        """The scheduler the picker's config file describes, over `pool`."""
        ctx = PluginContext(pool, config.metrics, clock, rng or random.Random())
        return cls(config.scheduling, ctx)

    def schedule(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> SchedulingResult | None:
        """Choose among `candidates` for `request`, or None when none survives the filters.

        Decides only: request control commits the decision and then tells `observers`.
        """
        candidates = list(candidates)
        for flt in self.filters:
            candidates = flt.filter(request, candidates)
            if not candidates:
                return None
        columns = [scorer.score(request, candidates) for scorer in self.scorers]
        totals = [0.0] * len(candidates)
        for weight, column in zip(self.weights, columns, strict=True):
            totals = [t + weight * s for t, s in zip(totals, column, strict=True)]
        chosen = self.picker.pick(candidates, totals)
        winner = chosen[0]
        reason = self._reason(candidates, totals, columns, winner)
        DECISIONS.labels(winner.address, reason).inc()
        return SchedulingResult(chosen, reason)

    def _reason(
        self,
        candidates: list[Endpoint],
        totals: list[float],
        columns: list[Sequence[float]],
        winner: Endpoint,
    ) -> str:
        """The scorer whose weighted contribution most separated the winner from the runner-up."""
        if len(candidates) == 1:
            return "only-candidate"
        win = candidates.index(winner)
        best = totals[win]
        totals[win] = -math.inf
        runner_up = totals.index(max(totals))
        totals[win] = best
        if best - totals[runner_up] <= TIE_TOLERANCE:
            return "tie"
        gaps = [w * (col[win] - col[runner_up]) for w, col in zip(self.weights, columns, strict=True)]
        return self.scorers[gaps.index(max(gaps))].name
