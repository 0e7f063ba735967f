"""The scheduler: filters -> weighted scorers -> picker, as the config's profile says.

Called once per request on the ext_proc server's event loop, so one `schedule` is synchronous and
O(endpoints + prompt blocks): lists of floats, no logging, no per-candidate dicts, and the
weighted sum in one pass over the candidates (`weighted_sum`). The last decisions are kept for
`/debug/decisions` as a few small tuples each in a bounded deque, and rendered only when someone
asks.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import NamedTuple

from picker.config import Config, SchedulingConfig
from picker.conformance import EndpointSelectionFilter
from picker.datalayer.endpoint import Endpoint
from picker.datalayer.pool import EndpointPool
from picker.request import InferenceRequest
from picker.scheduling.filters import HealthyFilter
from picker.scheduling.interface import Filter, Picker, PickObserver, Scorer, Service
from picker.scheduling.model_filter import ServedModelFilter
from picker.scheduling.pickers import TIE_TOLERANCE
from picker.scheduling.precise_prefix import PrecisePrefixCacheScorer
from picker.scheduling.prefix import KVBlockIndex, PrefixIndex
from picker.scheduling.registry import Instance, PluginContext, build_plugin, resolve
from picker.scheduling.scorers import PrefixCacheScorer
from picker.telemetry import DECISIONS

DECISIONS_KEPT = 100  # decisions /debug/decisions can show
MODELS_COUNTED = 1000  # distinct model names counted per model; the rest count as OTHER_MODELS
OTHER_MODELS = "other"


class DecisionRecord(NamedTuple):
    """One scheduling cycle, kept small: the endpoints it came down to (the pick, its fallbacks,
    then the runner-up) with every scorer's score, not the whole pool, so a hundred records of a
    large pool pin a few hundred objects, not megabytes. No request text beyond the model name.

    Taken with `operator.itemgetter` (one C call per column, ~1.5 us a decision), which returns
    the item itself, not a 1-tuple, when a decision had one candidate: see `rows`.
    """

    at: float  # time.time()
    model: str
    candidates: int  # endpoints that passed the filters
    endpoints: tuple[Endpoint, ...] | Endpoint
    totals: tuple[float, ...] | float  # the weighted sums
    # per scorer instance (`Scheduler.names` order); None: that scorer had no preference
    scores: list[tuple[float, ...] | None] | list[float | None]
    reason: str

    def rows(self) -> list[tuple[Endpoint, float, list[float | None]]]:
        """(endpoint, total, scores by scorer instance) of each endpoint considered, in order."""
        if self.candidates == 1:
            return [(self.endpoints, self.totals, list(self.scores))]  # type: ignore[list-item]
        return [
            (ep, total, [None if column is None else column[i] for column in self.scores])  # type: ignore[index]
            for i, (ep, total) in enumerate(zip(self.endpoints, self.totals, strict=True))  # type: ignore[arg-type]
        ]


@dataclass(slots=True)
class SchedulingResult:
    endpoints: list[Endpoint]  # the pick first, then fallbacks
    reason: str  # scorer instance that most separated the winner from the runner-up, or a special case


class Scheduler:
    """Runs one scheduling cycle per request with the plugins of the config's profile.

    Built-in filters run first: fresh metrics and the model the request names (request control
    has applied the gateway's subset hint to the candidates already). With the conformance hooks
    on, a request carrying the conformance suite's endpoint-selection header skips them and is
    scheduled over exactly the endpoints it names.
    """

    def __init__(
        self, config: SchedulingConfig, ctx: PluginContext, *, conformance_hooks: bool = False
    ) -> None:
        pipeline = resolve(config, conformance_hooks=conformance_hooks)
        self.filters: list[Filter] = [HealthyFilter(ctx.metrics, ctx.clock), ServedModelFilter()]
        self.selecting: list[Filter] = [EndpointSelectionFilter()]
        self.instances: tuple[Instance, ...] = pipeline.scorers
        self.scorers: list[Scorer] = [build_plugin(instance, ctx) for instance in pipeline.scorers]
        self.names: list[str] = [instance.name for instance in pipeline.scorers]
        self.weights: list[float] = [instance.weight for instance in pipeline.scorers]
        # which scorers had a preference -> the weighted sum over just those (compiled when first met)
        self._sums: dict[tuple[bool, ...], Callable[..., list[float]]] = {}
        self.picker: Picker = build_plugin(pipeline.picker, ctx)
        self.observers: list[PickObserver] = [
            plugin for plugin in (*self.scorers, self.picker) if callable(getattr(plugin, "on_pick", None))
        ]
        self.services: list[Service] = [
            plugin for plugin in self.scorers if callable(getattr(plugin, "run", None))
        ]
        self.recent: deque[DecisionRecord] = deque(maxlen=DECISIONS_KEPT)
        self.requests_by_model: dict[str, int] = {}  # routed requests (reference_metrics exports)

    @classmethod
    def from_config(
        cls,
        config: Config,
        pool: EndpointPool,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        conformance_hooks: bool = False,
    ) -> Scheduler:
        """The scheduler the picker's config file describes, over `pool`."""
        ctx = PluginContext(pool, config.metrics, clock, rng or random.Random())
        return cls(config.scheduling, ctx, conformance_hooks=conformance_hooks)

    def schedule(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> SchedulingResult | None:
        """Choose among `candidates` for `request`, or None when none survives the filters.

        Decides only: request control commits the decision and then tells `observers`.
        """
        for flt in self.filters if request.endpoint_selection is None else self.selecting:
            candidates = flt.filter(request, candidates)
            if not candidates:
                return None
        columns = [scorer.score(request, candidates) for scorer in self.scorers]
        active = [column for column in columns if column is not None]
        if active:
            present = tuple([column is not None for column in columns])
            total = self._sums.get(present)
            if total is None:
                total = self._sums[present] = weighted_sum(
                    [w for w, there in zip(self.weights, present, strict=True) if there]
                )
            totals = total(*active)
        else:
            totals = [0.0] * len(candidates)
        chosen = self.picker.pick(candidates, totals)
        shown = [candidates.index(endpoint) for endpoint in chosen]
        runner_up = self._runner_up(totals, shown[0])
        reason = self._reason(totals, columns, shown[0], runner_up)
        DECISIONS.labels(chosen[0].address, reason).inc()
        if runner_up is not None and runner_up not in shown:
            shown.append(runner_up)
        take = itemgetter(*shown)
        model = request.model
        record = (
            time.time(),
            model,
            len(candidates),
            take(candidates),
            take(totals),
            [None if c is None else take(c) for c in columns],
        )
        self.recent.append(DecisionRecord(*record, reason))
        by_model = self.requests_by_model
        if model not in by_model and len(by_model) >= MODELS_COUNTED:  # client-chosen: bound it
            model = OTHER_MODELS
        by_model[model] = by_model.get(model, 0) + 1
        return SchedulingResult(chosen, reason)

    def prefix_indexes(self) -> dict[str, PrefixIndex | KVBlockIndex]:
        """Each prefix-cache scorer instance's index (approximate or precise), by instance name."""
        return {
            name: scorer.index
            for name, scorer in zip(self.names, self.scorers, strict=True)
            if isinstance(scorer, PrefixCacheScorer | PrecisePrefixCacheScorer)
        }

    @staticmethod
    def _runner_up(totals: list[float], win: int) -> int | None:
        """The position of the best total after the winner's; None when there is no other."""
        if len(totals) == 1:
            return None
        best = totals[win]
        totals[win] = -math.inf
        runner_up = totals.index(max(totals))
        totals[win] = best
        return runner_up

    def _reason(
        self, totals: list[float], columns: list[Sequence[float] | None], win: int, runner_up: int | None
    ) -> str:
        """The scorer whose weighted contribution most separated the winner from the runner-up
        (the first such; scorers without a preference contributed nothing)."""
        if runner_up is None:
            return "only-candidate"
        if totals[win] - totals[runner_up] <= TIE_TOLERANCE:
            return "tie"
        reason, widest = "tie", -math.inf
        for name, w, col in zip(self.names, self.weights, columns, strict=True):
            if col is not None and (gap := w * (col[win] - col[runner_up])) > widest:
                reason, widest = name, gap
        return reason


def weighted_sum(weights: Sequence[float]) -> Callable[..., list[float]]:
    """`total(*columns)`: per candidate, the sum of weight x score over `columns` (one per weight,
    at least one).

    Generated as a single list comprehension over the zipped columns, so a decision walks the
    candidates once instead of once per scorer. Terms are added in column order and a weight of 1
    is not multiplied, so each total equals, bit for bit, the running sum `0.0 + w0*s0 + w1*s1 ...`.
    """
    scores = "".join(f"s{i}, " for i in range(len(weights)))
    columns = ", ".join(f"c{i}" for i in range(len(weights)))
    terms = " + ".join(f"s{i}" if w == 1.0 else f"w{i} * s{i}" for i, w in enumerate(weights))
    source = (
        f"lambda {''.join(f'w{i}, ' for i in range(len(weights)))}: "
        f"lambda {columns}: [{terms} for {scores} in zip({columns}, strict=True)]"
    )
    return eval(source)(*weights)  # names and indices only: the weights are passed as values
