"""The picker's configuration: one YAML file (`--config-file`), every field optional.

```yaml
scheduling:
  scorers:                       # weighted sum; each scorer's output is in [0, 1]
    - {type: queue, weight: 2}
    - {type: kv-cache-utilization, weight: 2}
    - {type: inflight-load, weight: 1}
    - {type: latency, weight: 2}
    - {type: prefix-cache, weight: 3, params: {block_size_tokens: 16, max_prefix_blocks: 256}}
  picker: {type: max-score, params: {fallbacks: 2}}
objectives: {critical: 100, default: 0, batch: -1}   # x-gateway-inference-objective -> priority
saturation: {queue_threshold: 5, kv_threshold: 0.8, retry_after_seconds: 1}
metrics: {scrape_interval: 0.1, stale_after: 2.0, timeout: 1.0, fast_end_probe: 0.02, arrival_delay: 0.01}
limits: {max_body_bytes: 8388608, max_prefix_chars: 16384}
response_processing: close           # or echo (full-duplex gateways; see picker/protocol/extproc.py)
```

Limits on what one request may cost the picker (its event loop serves every request):
- `limits.max_body_bytes` (8 MiB): a larger body is answered 413 in every body mode. The shipped
  Envoy configs buffer exactly this much (`per_connection_buffer_limit_bytes`, Envoy answers 413
  itself above it) and the gRPC receive limit is this plus 1 MiB of message overhead, so raise
  the three together.
- `limits.max_prefix_chars` (16384 = 256 blocks x 64 chars, the prefix scorer's reach): prompt
  characters kept and hashed; past it, arrays of messages or token ids are not walked.
- JSON nesting: orjson's fixed limit of 1024 levels (deeper JSON bodies are a 400). Not
  configurable: it is the parser's, and the picker reads no deeper than three levels itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class PluginSpec:
    type: str
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)


def _default_scorers() -> tuple[PluginSpec, ...]:
    return (
        PluginSpec("queue", 2.0),
        PluginSpec("kv-cache-utilization", 2.0),
        PluginSpec("inflight-load", 1.0),
        PluginSpec("latency", 2.0),
        PluginSpec("prefix-cache", 3.0),
    )


@dataclass(frozen=True, slots=True)
class SchedulingConfig:
    filters: tuple[PluginSpec, ...] = (PluginSpec("healthy"),)
    scorers: tuple[PluginSpec, ...] = field(default_factory=_default_scorers)
    picker: PluginSpec = PluginSpec("max-score")


@dataclass(frozen=True, slots=True)
class SaturationConfig:
    """An endpoint is saturated at `waiting >= queue_threshold` or `kv >= kv_threshold`."""

    queue_threshold: float = 5.0
    kv_threshold: float = 0.8
    retry_after_seconds: int = 1


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    scrape_interval: float = 0.1  # seconds between scrapes of one endpoint
    stale_after: float = 2.0  # metrics older than this make the endpoint unroutable
    timeout: float = 1.0  # per scrape
    path: str = "/metrics"
    # An exchange that ends this soon after its pick (a refused connection does) makes the
    # scraper probe its endpoint at once, at most once per scrape_interval; 0 turns it off.
    fast_end_probe: float = 0.02
    # Seconds a routed request may take to reach its engine: a scrape that began later counts
    # it, so the picker stops adding it to the endpoint's load (Endpoint.pending).
    arrival_delay: float = 0.01


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    # Must not exceed what the gateway buffers (envoy.yaml: per_connection_buffer_limit_bytes)
    # nor the gRPC receive limit the server is started with (derived from this value).
    max_body_bytes: int = 8 * 1024 * 1024
    max_prefix_chars: int = 16384  # prompt characters hashed for prefix affinity (256 x 64)


@dataclass(frozen=True, slots=True)
class Config:
    scheduling: SchedulingConfig = SchedulingConfig()
    objectives: dict[str, int] = field(default_factory=dict)
    saturation: SaturationConfig = SaturationConfig()
    metrics: MetricsConfig = MetricsConfig()
    limits: LimitsConfig = LimitsConfig()
    session_header: str = "x-session-id"
    # Full-duplex gateways send every response chunk: "close" ends the ext_proc stream with the
    # request phase (no per-token cost), "echo" hands each chunk back (for gateways that treat a
    # clean close as an error, e.g. agentgateway#3436). See picker/protocol/extproc.py.
    response_processing: str = "close"

    @classmethod
    def load(cls, path: str | Path | None) -> Config:
        if path is None:
            return cls()
        doc = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: top level must be a mapping")
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Config:
        _reject_unknown(cls, doc, "config")
        sched = doc.get("scheduling") or {}
        _reject_unknown(SchedulingConfig, sched, "scheduling")
        scheduling = SchedulingConfig(
            **{
                key: (_plugin(value) if key == "picker" else tuple(_plugin(item) for item in value or ()))
                for key, value in sched.items()
            }
        )
        objectives = {str(k): int(v) for k, v in (doc.get("objectives") or {}).items()}
        return cls(
            scheduling=scheduling,
            objectives=objectives,
            saturation=_section(SaturationConfig, doc.get("saturation")),
            metrics=_section(MetricsConfig, doc.get("metrics")),
            limits=_section(LimitsConfig, doc.get("limits")),
            session_header=str(doc.get("session_header", "x-session-id")).lower(),
            response_processing=_choice(
                "response_processing", doc.get("response_processing", "close"), RESPONSE_PROCESSING
            ),
        )


RESPONSE_PROCESSING = ("close", "echo")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    return str(value)


def _plugin(item: Any) -> PluginSpec:
    if isinstance(item, str):
        return PluginSpec(item)
    if not isinstance(item, dict) or "type" not in item:
        raise ValueError(f"plugin entry {item!r} needs a 'type'")
    _reject_unknown(PluginSpec, item, f"plugin {item['type']}")
    return PluginSpec(str(item["type"]), float(item.get("weight", 1.0)), dict(item.get("params") or {}))


def _section(kind: type[_T], values: dict[str, Any] | None) -> _T:
    values = values or {}
    _reject_unknown(kind, values, kind.__name__)
    types = {f.name: type(getattr(kind(), f.name)) for f in fields(kind)}  # type: ignore[arg-type]
    return kind(**{key: types[key](value) for key, value in values.items()})


def _reject_unknown(kind: type, values: dict[str, Any], where: str) -> None:
    unknown = set(values) - {f.name for f in fields(kind)}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
