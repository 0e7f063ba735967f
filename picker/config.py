"""The picker's configuration: the reference EPP's `EndpointPickerConfig`, plus picker's own sections.

`--config-file` / `--config-text` take the document GIE and llm-d users already have
(`apiVersion: inference.networking.x-k8s.io/v1alpha1` or `llm-d.ai/v1alpha1`, `kind:
EndpointPickerConfig`): `plugins` (name, type, parameters), `schedulingProfiles` (pluginRef,
weight) and `saturationDetector`. Picker's own settings sit beside them as top-level sections
(`objectives`, `metrics`, `limits`, `sessionHeader`, `responseProcessing`). Keys are camelCase in
the file and snake_case here. Every field is optional: `Config()` is the one source of defaults, and
gateway/base/config.yaml writes all of them out (a test keeps the two equal; `picker config`
prints the effective configuration of any file). Plugin types and their parameters are resolved
by `picker.scheduling.registry`.

Limits on what one request may cost the picker (its event loop serves every request):
- `limits.maxBodyBytes` (8 MiB): a larger body is answered 413 in every body mode. The shipped
  Envoy configs buffer exactly this much (`per_connection_buffer_limit_bytes`, Envoy answers 413
  itself above it) and the gRPC receive limit is this plus 1 MiB of message overhead, so raise
  the three together.
- `limits.maxPrefixChars` (16384 = 256 blocks x 64 chars, the prefix scorer's reach): prompt
  characters kept and hashed; past it, arrays of messages or token ids are not walked.
- JSON nesting: orjson's fixed limit of 1024 levels (deeper JSON bodies are a 400). Not
  configurable: it is the parser's, and the picker reads no deeper than three levels itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

_T = TypeVar("_T")

API_VERSIONS = ("inference.networking.x-k8s.io/v1alpha1", "llm-d.ai/v1alpha1")
KIND = "EndpointPickerConfig"
METRICS_DATA_SOURCE = "metrics-data-source"  # llm-d's scrape settings, as a plugin


@dataclass(frozen=True, slots=True)
class PluginSpec:
    """One entry of `plugins`: an instance of `type`, referenced by `name` (default: the type)."""

    type: str
    name: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return self.name or self.type


@dataclass(frozen=True, slots=True)
class PluginRef:
    """One entry of a scheduling profile; `weight` counts for scorers only (default 1)."""

    plugin: str
    weight: float | None = None


@dataclass(frozen=True, slots=True)
class SchedulingProfile:
    name: str
    plugins: tuple[PluginRef, ...]


@dataclass(frozen=True, slots=True)
class SchedulingConfig:
    """`plugins` and `schedulingProfiles` as written; `registry.resolve` makes them a pipeline.

    The default: the reference EPP's scorers, then picker's own, all in one profile.
    """

    plugins: tuple[PluginSpec, ...] = (
        PluginSpec("queue-scorer"),  # fewer waiting requests (vllm:num_requests_waiting)
        PluginSpec("kv-cache-utilization-scorer"),  # 1 - vllm:kv_cache_usage_perc
        PluginSpec("prefix-cache-scorer"),  # the replica likely to hold the prompt's KV blocks
        PluginSpec("lora-affinity-scorer"),  # the replica with the request's adapter loaded
        PluginSpec("inflight-load-scorer"),  # requests the picker itself has in flight
        # uncached prompt tokens queued for prefill: what a new request's first token waits behind
        PluginSpec("inflight-load-scorer", "prefill-queue", {"measure": "prefill"}),
        PluginSpec("latency-scorer"),  # faster decoding, as each replica reports it
        PluginSpec("max-score-picker"),
        PluginSpec("single-profile-handler"),
    )
    profiles: tuple[SchedulingProfile, ...] = (
        SchedulingProfile(
            "default",
            (
                PluginRef("queue-scorer", 2.0),
                PluginRef("kv-cache-utilization-scorer", 2.0),
                PluginRef("inflight-load-scorer", 1.0),
                PluginRef("prefill-queue", 2.0),
                PluginRef("latency-scorer", 2.0),
                PluginRef("prefix-cache-scorer", 6.0),
                PluginRef("lora-affinity-scorer", 1.0),
                PluginRef("max-score-picker"),
            ),
        ),
    )


@dataclass(frozen=True, slots=True)
class SaturationConfig:
    """An endpoint is saturated at `waiting >= queue_threshold` or `kv >= kv_threshold`.

    In the file: `saturationDetector: {queueDepthThreshold, kvCacheUtilThreshold,
    metricsStalenessThreshold, retryAfterSeconds}` (the last is picker's: the 429's Retry-After).
    """

    queue_threshold: float = 5.0
    kv_threshold: float = 0.8
    retry_after_seconds: int = 1


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    scrape_interval: float = 0.1  # seconds between scrapes of one endpoint
    # Metrics older than this make the endpoint unroutable (the file's
    # saturationDetector.metricsStalenessThreshold, as in the reference EPP).
    stale_after: float = 2.0
    timeout: float = 1.0  # per scrape
    path: str = "/metrics"
    # An exchange that ends this soon after its pick (a refused connection does) makes the
    # scraper probe its endpoint at once, at most once per scrape_interval; 0 turns it off.
    fast_end_probe: float = 0.02
    # Seconds a routed request may take to reach its engine: a scrape that began later counts
    # it, so the picker stops adding it to the endpoint's load (Endpoint.pending).
    arrival_delay: float = 0.01
    # Seconds between fetches of each endpoint's `/v1/models` (the models and LoRA adapters it
    # serves): an adapter loaded at run time is known to the picker this long after.
    models_interval: float = 5.0


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    # Must not exceed what the gateway buffers (envoy.yaml: per_connection_buffer_limit_bytes)
    # nor the gRPC receive limit the server is started with (derived from this value).
    max_body_bytes: int = 8 * 1024 * 1024
    max_prefix_chars: int = 16384  # prompt characters hashed for prefix affinity (256 x 64)


def _default_objectives() -> dict[str, int]:
    # x-gateway-inference-objective -> priority; below 0 is sheddable (429 when saturated).
    return {"critical": 100, "default": 0, "batch": -1}


@dataclass(frozen=True, slots=True)
class Config:
    scheduling: SchedulingConfig = SchedulingConfig()
    objectives: dict[str, int] = field(default_factory=_default_objectives)
    saturation: SaturationConfig = SaturationConfig()
    metrics: MetricsConfig = MetricsConfig()
    limits: LimitsConfig = LimitsConfig()
    session_header: str = "x-session-id"
    # Full-duplex gateways send every response chunk: "close" ends the ext_proc stream with the
    # request phase (no per-token cost), "echo" hands each chunk back (for gateways that treat a
    # clean close as an error, e.g. agentgateway#3436). See picker/protocol/extproc.py.
    response_processing: str = "close"

    @classmethod
    def load(cls, path: str | Path | None = None, text: str | None = None) -> Config:
        """From a file (`--config-file`) or inline text (`--config-text`); neither: defaults."""
        if path is not None:
            text = Path(path).read_text()
        if text is None:
            return cls()
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"not valid YAML: {exc}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"expected a {KIND} mapping, got {type(doc).__name__}")
        return cls.from_document(doc)

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> Config:
        """An `EndpointPickerConfig` document; absent sections keep their defaults."""
        if doc.get("apiVersion") not in API_VERSIONS or doc.get("kind") != KIND:
            raise ValueError(
                f"expected apiVersion {' or '.join(API_VERSIONS)} and kind {KIND}, got "
                f"{doc.get('apiVersion')!r} / {doc.get('kind')!r}"
            )
        unknown = set(doc) - _SECTIONS
        if unknown:
            raise ValueError(
                f"unsupported top-level keys {sorted(unknown)}; picker reads {sorted(_SECTIONS)}"
            )
        gates = _list(doc.get("featureGates"), "featureGates")
        if gates:
            raise ValueError(f"featureGates: picker has no feature gates (got {gates})")
        default = cls()
        scheduling = _scheduling(doc, default.scheduling)
        saturation_doc = dict(_mapping(doc.get("saturationDetector"), "saturationDetector"))
        stale = saturation_doc.pop("metricsStalenessThreshold", None)
        metrics = _section(MetricsConfig, doc.get("metrics"), "metrics")
        if stale is not None:
            metrics = _replace(metrics, stale_after=duration_seconds(stale, "metricsStalenessThreshold"))
        path = _data_source_path(scheduling)
        if path is not None:
            metrics = _replace(metrics, path=path)
        objectives = {
            str(name): _integer(value, f"objectives.{name}")
            for name, value in _mapping(doc.get("objectives", default.objectives), "objectives").items()
        }
        header = doc.get("sessionHeader", default.session_header)
        if not isinstance(header, str) or not header:
            raise ValueError("sessionHeader must be a header name")
        processing = doc.get("responseProcessing", default.response_processing)
        if processing not in RESPONSE_PROCESSING:
            raise ValueError(f"responseProcessing: {processing!r} is not one of {RESPONSE_PROCESSING}")
        return cls(
            scheduling=scheduling,
            objectives=objectives,
            saturation=_section(SaturationConfig, saturation_doc, "saturationDetector", _SATURATION_KEYS),
            metrics=metrics,
            limits=_section(LimitsConfig, doc.get("limits"), "limits"),
            session_header=header.lower(),
            response_processing=processing,
        )

    def to_document(self) -> dict[str, Any]:
        """This configuration as an `EndpointPickerConfig` document (`from_document` inverts it)."""
        metrics = _camel_fields(self.metrics)
        saturation = {key: getattr(self.saturation, name) for key, name in _SATURATION_KEYS.items()}
        saturation["metricsStalenessThreshold"] = f"{metrics.pop('staleAfter'):g}s"
        return {
            "apiVersion": API_VERSIONS[0],
            "kind": KIND,
            "plugins": [
                {**({"name": p.name} if p.name else {}), "type": p.type}
                | ({"parameters": dict(p.parameters)} if p.parameters else {})
                for p in self.scheduling.plugins
            ],
            "schedulingProfiles": [
                {
                    "name": profile.name,
                    "plugins": [
                        {"pluginRef": ref.plugin} | ({} if ref.weight is None else {"weight": ref.weight})
                        for ref in profile.plugins
                    ],
                }
                for profile in self.scheduling.profiles
            ],
            "saturationDetector": saturation,
            "objectives": dict(self.objectives),
            "metrics": metrics,
            "limits": _camel_fields(self.limits),
            "sessionHeader": self.session_header,
            "responseProcessing": self.response_processing,
        }


# Sections a reference EPP's file may hold that picker implements, then picker's own.
_SECTIONS = frozenset(
    {"apiVersion", "kind", "featureGates", "plugins", "schedulingProfiles", "saturationDetector", "data",
     "dataLayer", "objectives", "metrics", "limits", "sessionHeader", "responseProcessing"}
)  # fmt: skip
RESPONSE_PROCESSING = ("close", "echo")
# saturationDetector's keys (the reference's, then picker's) -> SaturationConfig fields.
_SATURATION_KEYS = {
    "queueDepthThreshold": "queue_threshold",
    "kvCacheUtilThreshold": "kv_threshold",
    "retryAfterSeconds": "retry_after_seconds",
}


def _scheduling(doc: Mapping[str, Any], default: SchedulingConfig) -> SchedulingConfig:
    """`plugins` + `schedulingProfiles`; with neither, picker's default pipeline.

    Without profiles, one profile named `default` references every plugin (the reference EPP's
    rule). `data` / `dataLayer` may only reference plugins defined here.
    """
    if "plugins" not in doc and "schedulingProfiles" not in doc:
        plugins, profiles = default.plugins, default.profiles
    else:
        plugins = tuple(_plugin(item, i) for i, item in enumerate(_list(doc.get("plugins"), "plugins")))
        items = _list(doc.get("schedulingProfiles"), "schedulingProfiles")
        profiles = tuple(_profile(item, i) for i, item in enumerate(items)) or (
            SchedulingProfile("default", tuple(PluginRef(p.ref) for p in plugins)),
        )
    names = [p.ref for p in plugins]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate is not None:
        raise ValueError(f"plugins: two plugins are named {duplicate!r}; give each instance a name")
    for section in ("data", "dataLayer"):
        for ref in _plugin_refs(doc.get(section)):
            if ref not in names:
                raise ValueError(f"{section}: pluginRef {ref!r} names no plugin in plugins")
    return SchedulingConfig(plugins, profiles)


def _plugin(item: Any, index: int) -> PluginSpec:
    where = f"plugins[{index}]"
    entry = _mapping(item, where)
    unknown = set(entry) - {"name", "type", "parameters"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; a plugin has name, type, parameters")
    type_, name = entry.get("type"), entry.get("name", "")
    if not isinstance(type_, str) or not type_:
        raise ValueError(f"{where}: 'type' is required")
    if not isinstance(name, str):
        raise ValueError(f"{where}: 'name' must be a string")
    return PluginSpec(type_, name, dict(_mapping(entry.get("parameters"), f"{where}.parameters")))


def _profile(item: Any, index: int) -> SchedulingProfile:
    where = f"schedulingProfiles[{index}]"
    entry = _mapping(item, where)
    unknown = set(entry) - {"name", "plugins"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; a profile has name, plugins")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: 'name' is required")
    refs = []
    for i, ref in enumerate(_list(entry.get("plugins"), f"{where}.plugins")):
        ref = _mapping(ref, f"{where}.plugins[{i}]")
        plugin, weight = ref.get("pluginRef"), ref.get("weight")
        if not isinstance(plugin, str) or not plugin or set(ref) - {"pluginRef", "weight"}:
            raise ValueError(f"{where}.plugins[{i}]: expected {{pluginRef: name, weight: number}}")
        if weight is not None:
            weight = _number(weight, f"{where}.plugins[{i}].weight")
            if weight < 0:
                raise ValueError(f"{where}.plugins[{i}].weight must not be negative")
        refs.append(PluginRef(plugin, weight))
    return SchedulingProfile(name, tuple(refs))


def _plugin_refs(section: Any) -> list[str]:
    """Every `pluginRef` value anywhere inside `section`."""
    if isinstance(section, Mapping):
        refs = [section["pluginRef"]] if isinstance(section.get("pluginRef"), str) else []
        return refs + [r for key, value in section.items() if key != "pluginRef" for r in _plugin_refs(value)]
    if isinstance(section, list):
        return [ref for item in section for ref in _plugin_refs(item)]
    return []


def _data_source_path(scheduling: SchedulingConfig) -> str | None:
    """The scrape path an llm-d `metrics-data-source` plugin names (the registry checks the rest)."""
    for plugin in scheduling.plugins:
        if plugin.type == METRICS_DATA_SOURCE and "path" in plugin.parameters:
            path = plugin.parameters["path"]
            if not isinstance(path, str) or not path.startswith("/"):
                raise ValueError(f"plugin {plugin.ref!r}: path must start with '/'")
            return path
    return None


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(value: Any, where: str) -> float:
    """A Go / Kubernetes duration ("2s", "200ms", "1m30s") or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value and _DURATION.sub("", value) == "":
        seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION.findall(value))
    else:
        raise ValueError(f"{where}: expected a duration such as '2s' or '200ms', got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{where}: must be a positive duration, got {value!r}")
    return seconds


def _section(kind: type[_T], values: Any, where: str, keys: Mapping[str, str] | None = None) -> _T:
    """A dataclass section from its mapping (`keys`: file key -> field; default: the camelCase
    field names); each value must fit the field's type."""
    values = _mapping(values, where)
    defaults = _fields(kind())
    known = keys or {camel(name): name for name in defaults}
    unknown = set(values) - known.keys()
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    typed = {}
    for key, value in values.items():
        name = known[key]
        expected = type(defaults[name])
        if expected is float:
            value = _number(value, f"{where}.{key}")
        elif expected is int:
            value = _integer(value, f"{where}.{key}")
        elif not isinstance(value, expected):
            raise ValueError(f"{where}.{key}: expected {expected.__name__}, got {value!r}")
        typed[name] = value
    return kind(**typed)


def _fields(section: Any) -> dict[str, Any]:
    return {f.name: getattr(section, f.name) for f in fields(section)}


def _camel_fields(section: Any) -> dict[str, Any]:
    return {camel(name): value for name, value in _fields(section).items()}


def _replace(section: _T, **changes: Any) -> _T:
    return type(section)(**(_fields(section) | changes))


def camel(name: str) -> str:
    """`max_prefix_blocks_to_match` -> `maxPrefixBlocksToMatch` (names in the file)."""
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def snake(name: str) -> str:
    """`maxPrefixBlocksToMatch` -> `max_prefix_blocks_to_match`."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise ValueError(f"{where}: expected a mapping, got {value!r}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list, got {value!r}")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    return value
