"""Plugin types by the names a config file gives them, and the pipeline a profile makes of them.

Where picker does what a reference EPP plugin does, it answers to that plugin's type and parameter
names (`queue-scorer`, `prefix-cache-scorer` with `blockSizeTokens`, ...); picker's own scorers
carry names of the same style. A plugin class is a dataclass: its fields named like a
`PluginContext` attribute are filled from the context, every other init field is a parameter,
spelled camelCase in the file. Types that configure something picker always does
(`single-profile-handler`, `metrics-data-source`, `core-metrics-extractor`) are accepted with
nothing to run; anything else is an error naming what is supported.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Literal

from picker.config import (
    METRICS_DATA_SOURCE,
    Config,
    MetricsConfig,
    PluginSpec,
    SchedulingConfig,
    camel,
    snake,
)
from picker.datalayer.pool import EndpointPool
from picker.scheduling.pickers import MaxScorePicker
from picker.scheduling.placement import PrefixPlacementScorer
from picker.scheduling.precise_prefix import PrecisePrefixCacheScorer
from picker.scheduling.scorers import (
    InflightLoadScorer,
    KVCacheUtilizationScorer,
    LatencyScorer,
    LoraAffinityScorer,
    PrefixCacheScorer,
    QueueScorer,
    SessionAffinityScorer,
)

Kind = Literal["scorer", "picker", "profile-handler", "data", "conformance"]

# The conformance suite's test plugins (kubernetes-sigs/gateway-api-inference-extension
# conformance/resources): accepted only when picker runs with --conformance-hooks.
CONFORMANCE_FILTER = "header-based-testing-filter"
CONFORMANCE_VERIFIER = "destination-endpoint-served-verifier"


@dataclass(frozen=True, slots=True)
class PluginType:
    kind: Kind
    cls: type | None = None  # None: accepted, with nothing to run (picker always does it)
    parameters: tuple[str, ...] = ()  # the parameters a class-less type accepts


TYPES: dict[str, PluginType] = {
    **{
        cls.name: PluginType("scorer", cls)
        for cls in (
            QueueScorer,
            KVCacheUtilizationScorer,
            PrefixCacheScorer,
            LoraAffinityScorer,
            InflightLoadScorer,
            LatencyScorer,
            SessionAffinityScorer,
            PrefixPlacementScorer,
            PrecisePrefixCacheScorer,
        )
    },
    MaxScorePicker.name: PluginType("picker", MaxScorePicker),
    "single-profile-handler": PluginType("profile-handler"),
    METRICS_DATA_SOURCE: PluginType("data", parameters=("scheme", "path", "insecureSkipVerify")),
    "core-metrics-extractor": PluginType("data"),
    CONFORMANCE_FILTER: PluginType("conformance"),
    CONFORMANCE_VERIFIER: PluginType("conformance"),
}


@dataclass(frozen=True, slots=True)
class PluginContext:
    """What plugins may share: a plugin field with one of these names is filled from here."""

    pool: EndpointPool
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    clock: Callable[[], float] = time.monotonic  # injectable so tests control time
    rng: random.Random = field(default_factory=random.Random)  # tie-breaks; seed it in tests


_CONTEXT_FIELDS = frozenset(f.name for f in fields(PluginContext))


@dataclass(frozen=True, slots=True)
class Instance:
    """A plugin of a profile, checked and ready to construct."""

    name: str  # the instance's name: what decisions and debug output call it
    type: str
    cls: type
    parameters: Mapping[str, Any]  # field name -> value, typed
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class Pipeline:
    scorers: tuple[Instance, ...]
    picker: Instance


def resolve(config: SchedulingConfig, *, conformance_hooks: bool = False) -> Pipeline:
    """The one scheduling profile's scorers (weighted, in order) and picker; ValueError on any
    unknown type, parameter, reference, or a profile shape picker does not run."""
    instances = {spec.ref: _instance(spec) for spec in config.plugins}
    types = {spec.ref: spec.type for spec in config.plugins}
    asked = [ref for ref, type_ in types.items() if TYPES[type_].kind == "conformance"]
    if asked and not conformance_hooks:
        raise ValueError(
            f"plugins {asked} are conformance-test hooks: start picker with --conformance-hooks to use them"
        )
    if len(config.profiles) != 1:
        raise ValueError(
            f"picker runs one scheduling profile; got {[p.name for p in config.profiles]} "
            "(multi-profile handlers such as P/D disaggregation are not supported)"
        )
    (profile,) = config.profiles
    scorers: list[Instance] = []
    picker: Instance | None = None
    for ref in profile.plugins:
        where = f"schedulingProfiles[{profile.name!r}]"
        if ref.plugin not in types:
            raise ValueError(f"{where}: pluginRef {ref.plugin!r} names no plugin; plugins: {sorted(types)}")
        kind = TYPES[types[ref.plugin]].kind
        instance = instances[ref.plugin]
        if kind == "scorer":
            assert instance is not None
            weight = 1.0 if ref.weight is None else ref.weight
            scorers.append(Instance(instance.name, instance.type, instance.cls, instance.parameters, weight))
        elif kind == "picker":
            if picker is not None:
                raise ValueError(f"{where}: two pickers ({picker.name!r}, {ref.plugin!r}); a profile has one")
            picker = instance
        elif kind != "conformance":  # the conformance filter may sit in the profile, as in the suite
            raise ValueError(f"{where}: {ref.plugin!r} is a {kind} plugin, not a scheduling step")
    if picker is None:  # the reference EPP's rule: a profile without one gets the max-score picker
        picker = _instance(PluginSpec(MaxScorePicker.name))
    assert picker is not None
    return Pipeline(tuple(scorers), picker)


def build_plugin(instance: Instance, ctx: PluginContext) -> Any:
    """Construct `instance`, its context fields filled from `ctx`."""
    shared = {f.name: getattr(ctx, f.name) for f in fields(instance.cls) if f.name in _CONTEXT_FIELDS}
    try:
        return instance.cls(**shared, **instance.parameters)
    except ValueError as exc:
        raise ValueError(f"plugin {instance.name!r} ({instance.type}): {exc}") from None


def effective_document(config: Config) -> dict[str, Any]:
    """`config` as a complete `EndpointPickerConfig`: every plugin with all its parameters, given
    or default (what `picker config` prints and gateway/base/config.yaml holds for `Config()`)."""
    doc = config.to_document()
    for entry, spec in zip(doc["plugins"], config.scheduling.plugins, strict=True):
        instance = _instance(spec)
        if instance is not None:
            defaults = {name: _default(f) for name, f in _parameters(instance.cls).items()}
            values = defaults | dict(instance.parameters)
            if values:
                entry["parameters"] = {camel(name): value for name, value in values.items()}
    return doc


def _instance(spec: PluginSpec) -> Instance | None:
    """`spec` checked against its type; None for a type with nothing to run."""
    where = f"plugin {spec.ref!r} ({spec.type})"
    plugin_type = TYPES.get(spec.type)
    if plugin_type is None:
        raise ValueError(f"{where}: unknown type; picker supports {_supported()}")
    if plugin_type.cls is None:
        unknown = set(spec.parameters) - set(plugin_type.parameters)
        if unknown:
            raise ValueError(f"{where}: unknown parameters {sorted(unknown)}; accepted: "
                             f"{list(plugin_type.parameters) or 'none'}")  # fmt: skip
        if spec.type == METRICS_DATA_SOURCE and spec.parameters.get("scheme", "http") != "http":
            raise ValueError(f"{where}: picker scrapes metrics over plain http only")
        return None
    cls = plugin_type.cls
    raw = dict(spec.parameters)
    legacy = getattr(cls, "legacy_parameters", None)
    if legacy is not None:
        try:
            raw = legacy(raw)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    accepted = _parameters(cls)
    names = {camel(name) for name in accepted}
    unknown = set(raw) - names
    if unknown:
        raise ValueError(
            f"{where}: unknown parameters {sorted(unknown)}; accepted: {sorted(names) or 'none'}"
        )
    typed = {
        snake(key): _typed(where, key, accepted[snake(key)].default, value) for key, value in raw.items()
    }
    return Instance(spec.ref, spec.type, cls, typed)


def _default(parameter: Field[Any]) -> Any:
    """A parameter's default value (made by its factory for a mutable one, e.g. a mapping)."""
    if parameter.default_factory is not MISSING:
        return parameter.default_factory()
    return parameter.default


def _parameters(cls: type) -> dict[str, Any]:
    """A plugin class's parameters: its init fields that are not filled from the context."""
    return {f.name: f for f in fields(cls) if f.init and f.name not in _CONTEXT_FIELDS}


def _typed(where: str, key: str, default: Any, value: Any) -> Any:
    """`value` as the type of the parameter's default (an int is accepted for a float)."""
    if default is MISSING:
        return value
    expected = type(default)
    if expected is float and type(value) is int:
        return float(value)
    if type(value) is not expected:
        raise ValueError(f"{where}: parameter {key!r} must be {expected.__name__}, not {value!r}")
    if expected is float and math.isnan(value):
        raise ValueError(f"{where}: parameter {key!r} must be a number, not NaN")
    return value


def _supported() -> str:
    by_kind: dict[str, list[str]] = {}
    for name, plugin_type in TYPES.items():
        by_kind.setdefault(plugin_type.kind, []).append(name)
    return "; ".join(f"{kind}: {', '.join(names)}" for kind, names in by_kind.items())
