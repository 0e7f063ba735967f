"""Merge the clients' raw measurements into one result per mode, and name the metrics reports show.

Throughput is over the measured window (first client's start to last client's end), as
`vllm bench serve` divides by the benchmark duration: total tokens = prompt + output tokens.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from loadtest.client import ClientResult
from loadtest.observe import COUNTERS, Counters, hit_rate

PERCENTILES = (50, 90, 99)


def percentiles(seconds: Sequence[float]) -> dict[str, float]:
    """p50 / p90 / p99 and mean in milliseconds; empty when there are no samples."""
    if not seconds:
        return {}
    values = np.asarray(seconds) * 1000.0
    points = np.percentile(values, PERCENTILES)
    stats = {f"p{p}": float(v) for p, v in zip(PERCENTILES, points, strict=True)}
    return stats | {"mean": float(values.mean())}


@dataclass(slots=True)
class ModeResult:
    """One mode at one concurrency: the `results.json` entry under `modes`."""

    requests: int
    completed: int
    errors: int
    errors_by_kind: dict[str, int]
    duration_s: float
    request_throughput: float
    input_tokens: int
    output_tokens: int
    output_tokens_per_s: float
    total_tokens_per_s: float
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    prefix_cache_hit_rate: float | None
    per_replica_hit_rate: dict[str, float | None]
    preemptions: int
    per_replica_requests: dict[str, int]
    replica_profiles: dict[str, str]  # address -> simulator profile
    cpu_seconds: dict[str, float]  # per process (clients, simulator, envoy, picker, runner)
    cpu_cores_used: float  # sum of cpu_seconds / duration: > cores available means CPU-bound
    host_cpu_busy: float  # share of all the machine's cores busy during the window (anyone's)
    clients: int = 1


def summarize(
    clients: Sequence[ClientResult],
    replica_counters: dict[str, Counters],
    replica_names: dict[str, str],
    replica_profiles: dict[str, str],
    process_cpu: dict[str, float],
    host_cpu_busy: float,
) -> ModeResult:
    """One mode's result from every client's raw result and the window's counter deltas.

    Per-replica figures are keyed by address; `replica_names` maps the replicas' header names.
    """
    duration = max(c.ended for c in clients) - min(c.started for c in clients)
    errors: Counter[str] = Counter()
    replicas: Counter[str] = Counter()
    for client in clients:
        errors += client.errors
        replicas.update({replica_names.get(name, name): n for name, n in client.replicas.items()})
    completed = sum(c.completed for c in clients)
    input_tokens = sum(c.input_tokens for c in clients)
    output_tokens = sum(c.output_tokens for c in clients)
    pool = {name: sum(c[name] for c in replica_counters.values()) for name in COUNTERS}
    cpu = {f"client-{i}": c.cpu_seconds for i, c in enumerate(clients)} | process_cpu
    per_second = 1.0 / duration if duration > 0 else 0.0
    return ModeResult(
        requests=completed + errors.total(),
        completed=completed,
        errors=errors.total(),
        errors_by_kind=dict(errors),
        duration_s=duration,
        request_throughput=completed * per_second,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        output_tokens_per_s=output_tokens * per_second,
        total_tokens_per_s=(input_tokens + output_tokens) * per_second,
        ttft_ms=percentiles([t for c in clients for t in c.ttft]),
        tpot_ms=percentiles([t for c in clients for t in c.tpot]),
        itl_ms=percentiles([t for c in clients for t in c.itl]),
        e2e_ms=percentiles([t for c in clients for t in c.e2e]),
        prefix_cache_hit_rate=hit_rate(pool),
        per_replica_hit_rate={address: hit_rate(c) for address, c in replica_counters.items()},
        preemptions=int(pool["vllm:num_preemptions_total"]),
        per_replica_requests=dict(sorted(replicas.items())),
        replica_profiles=replica_profiles,
        cpu_seconds=cpu,
        cpu_cores_used=sum(cpu.values()) * per_second,
        host_cpu_busy=host_cpu_busy,
        clients=len(clients),
    )


@dataclass(frozen=True, slots=True)
class Metric:
    """A number reports compare across modes, and which direction is better."""

    label: str
    field: str
    stat: str | None = None  # percentile key for latency fields
    better: Literal["higher", "lower"] = "higher"

    def of(self, result: ModeResult) -> float | None:
        value = getattr(result, self.field)
        if self.stat is not None:
            value = value.get(self.stat)
        return None if value is None else float(value)


OUTPUT_TPS = Metric("output tok/s", "output_tokens_per_s")
TOTAL_TPS = Metric("total tok/s", "total_tokens_per_s")
TTFT_P50 = Metric("TTFT p50 ms", "ttft_ms", "p50", "lower")
TTFT_P90 = Metric("TTFT p90 ms", "ttft_ms", "p90", "lower")
TTFT_P99 = Metric("TTFT p99 ms", "ttft_ms", "p99", "lower")
TPOT_P50 = Metric("TPOT p50 ms", "tpot_ms", "p50", "lower")
TPOT_P90 = Metric("TPOT p90 ms", "tpot_ms", "p90", "lower")
ITL_P50 = Metric("ITL p50 ms", "itl_ms", "p50", "lower")
ITL_P99 = Metric("ITL p99 ms", "itl_ms", "p99", "lower")
E2E_P50 = Metric("E2E p50 ms", "e2e_ms", "p50", "lower")
E2E_P90 = Metric("E2E p90 ms", "e2e_ms", "p90", "lower")
E2E_P99 = Metric("E2E p99 ms", "e2e_ms", "p99", "lower")
HIT_RATE = Metric("prefix hit rate", "prefix_cache_hit_rate")

# The columns of the summary tables, and the rows of the ratio tables.
SUMMARY = (OUTPUT_TPS, TOTAL_TPS, TTFT_P50, TTFT_P90, TTFT_P99, TPOT_P50, ITL_P99, E2E_P50, E2E_P99, HIT_RATE)
RATIOS = (OUTPUT_TPS, TOTAL_TPS, TTFT_P90, TPOT_P50, E2E_P99, HIT_RATE)


def ratio(metric: Metric, result: ModeResult, baseline: ModeResult) -> float | None:
    """`result`'s value over `baseline`'s (None when either is missing or the baseline is 0)."""
    value, base = metric.of(result), metric.of(baseline)
    if value is None or not base:
        return None
    return value / base
