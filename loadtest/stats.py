"""Merge the clients' raw measurements into one result per mode, and name the metrics reports show.

Throughput is over the measured window (first client's start to last client's end), as
`vllm bench serve` divides by the benchmark duration: total tokens = prompt + output tokens.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import numpy as np

from loadtest.client import ClientResult
from loadtest.observe import COUNTERS, Counters, hit_rate

PERCENTILES = (50, 90, 99)
_V = TypeVar("_V")


def percentiles(seconds: Sequence[float]) -> dict[str, float]:
    """p50 / p90 / p99 and mean in milliseconds; empty when there are no samples."""
    if not seconds:
        return {}
    values = np.asarray(seconds) * 1000.0
    points = np.percentile(values, PERCENTILES)
    stats = {f"p{p}": float(v) for p, v in zip(PERCENTILES, points, strict=True)}
    return stats | {"mean": float(values.mean())}


@dataclass(frozen=True, slots=True)
class Measurement:
    """One mode measured once on its own stack: the clients' raw results and what was read
    around the window. Replicas are keyed by their `x-sim-replica` name (pool position), which
    stays the same across repeats while addresses change."""

    clients: list[ClientResult]
    replica_counters: dict[str, Counters]  # counter deltas over the window
    replica_profiles: dict[str, str]
    process_cpu: dict[str, float]  # seconds over the window, per role (envoy, picker, ...)
    host_cpu_busy: float
    extproc_messages: dict[str, float] = field(default_factory=dict)  # Envoy -> picker: sent, received

    @property
    def duration(self) -> float:
        return max(c.ended for c in self.clients) - min(c.started for c in self.clients)

    @property
    def total_tokens(self) -> int:
        return sum(c.input_tokens + c.output_tokens for c in self.clients)


@dataclass(frozen=True, slots=True)
class RepeatSummary:
    """One of the pooled runs, to show how much they differ."""

    total_tokens_per_s: float
    host_cpu_busy: float


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
    # Prompt tokens the replicas computed (prefix-cache lookups that missed, re-admissions after a
    # preemption included) per completed request: the work routing for the cache saves.
    recomputed_prompt_tokens_per_request: float | None
    per_replica_hit_rate: dict[str, float | None]
    preemptions: int
    per_replica_requests: dict[str, int]
    replica_profiles: dict[str, str]  # replica name -> simulator profile
    cpu_seconds: dict[str, float]  # per process (clients, simulator, envoy, picker, runner)
    cpu_cores_used: float  # sum of cpu_seconds / duration: > cores available means CPU-bound
    # What routing costs, per completed request and per 1,000 output tokens, for the gateway and
    # the picker (CPU milliseconds), and the ext_proc messages Envoy sent the picker and got back.
    proxy_cost: dict[str, dict[str, float]]
    host_cpu_busy: float  # share of all the machine's cores busy during the window (anyone's)
    clients: int = 1
    repeats: int = 1
    by_repeat: list[RepeatSummary] = field(default_factory=list)  # the spread shows the noise


def summarize(measurements: Sequence[Measurement]) -> ModeResult:
    """One mode's result, pooling every repeat: samples are merged, counts and times summed."""
    clients = [c for m in measurements for c in m.clients]
    duration = sum(m.duration for m in measurements)
    errors: Counter[str] = Counter()
    requests: Counter[str] = Counter()
    for client in clients:
        errors += client.errors
        requests += client.replicas
    replicas: dict[str, Counters] = {}
    cpu: Counter[str] = Counter()
    for m in measurements:
        for name, counters in m.replica_counters.items():
            replicas[name] = {k: replicas.get(name, {}).get(k, 0.0) + v for k, v in counters.items()}
        cpu.update({f"client-{i}": c.cpu_seconds for i, c in enumerate(m.clients)} | m.process_cpu)
    pool = {name: sum(c[name] for c in replicas.values()) for name in COUNTERS}
    order = {name: i for i, name in enumerate(measurements[0].replica_profiles)}  # pool order

    def in_pool_order(items: dict[str, _V]) -> dict[str, _V]:
        return dict(sorted(items.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))

    completed = sum(c.completed for c in clients)
    input_tokens = sum(c.input_tokens for c in clients)
    output_tokens = sum(c.output_tokens for c in clients)
    messages: Counter[str] = Counter()
    for m in measurements:
        messages.update(m.extproc_messages)
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
        recomputed_prompt_tokens_per_request=(
            (pool["vllm:prefix_cache_queries_total"] - pool["vllm:prefix_cache_hits_total"]) / completed
            if completed
            else None
        ),
        per_replica_hit_rate=in_pool_order({name: hit_rate(c) for name, c in replicas.items()}),
        preemptions=int(pool["vllm:num_preemptions_total"]),
        per_replica_requests=in_pool_order(dict(requests)),
        replica_profiles=measurements[0].replica_profiles,
        cpu_seconds=dict(cpu),
        cpu_cores_used=cpu.total() * per_second,
        proxy_cost=_proxy_cost(cpu, messages, completed, output_tokens),
        host_cpu_busy=sum(m.host_cpu_busy * m.duration for m in measurements) * per_second,
        clients=len(measurements[0].clients),
        repeats=len(measurements),
        by_repeat=[RepeatSummary(m.total_tokens / m.duration, m.host_cpu_busy) for m in measurements],
    )


def _proxy_cost(
    cpu: Counter[str], messages: Counter[str], requests: int, output_tokens: int
) -> dict[str, dict[str, float]]:
    cost: dict[str, dict[str, float]] = {}
    if not requests:
        return cost
    for role in ("envoy", "picker"):
        if role in cpu:
            cost[f"{role} CPU ms"] = {
                "per request": 1000 * cpu[role] / requests,
                "per 1k output tokens": 1e6 * cpu[role] / output_tokens if output_tokens else 0.0,
            }
    if messages:
        cost["ext_proc messages"] = {way: n / requests for way, n in messages.items()}
    return cost


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
LADDER = (TTFT_P50, TTFT_P90, TTFT_P99, OUTPUT_TPS, HIT_RATE)  # with recomputed tokens and failures
RATIOS = (OUTPUT_TPS, TOTAL_TPS, TTFT_P90, TPOT_P50, E2E_P99, HIT_RATE)


RECOMPUTED = Metric(
    "recomputed prompt tokens / request", "recomputed_prompt_tokens_per_request", better="lower"
)
MAX_FAILURES = 0.01  # share of a stage's requests that may fail and the stage still meet the SLO


def failure_rate(result: ModeResult) -> float:
    return result.errors / result.requests if result.requests else 1.0


def meets_slo(result: ModeResult, slo_ttft_p90_ms: float | None) -> bool:
    """TTFT p90 within the SLO (any, when there is none) and at most `MAX_FAILURES` failed."""
    p90 = result.ttft_ms.get("p90")
    within = slo_ttft_p90_ms is None or (p90 is not None and p90 <= slo_ttft_p90_ms)
    return within and result.completed > 0 and failure_rate(result) <= MAX_FAILURES


@dataclass(frozen=True, slots=True)
class Capacity:
    """A mode's headline on a rate ladder.

    `rate` is the highest rate of the unbroken run of stages from the bottom that all meet the SLO
    (None: the first stage already missed); a stage that meets it above a miss does not count
    (`unsteady` lists those, a sign of noise or a ladder too short to tell), since a pool that
    misses at 8/s is not trusted at 10/s. `at_least`: even the top stage met, so the capacity is
    higher than the ladder measured.
    """

    rate: float | None
    at_least: bool
    unsteady: tuple[float, ...]


def capacity(stages: dict[float, ModeResult], slo_ttft_p90_ms: float | None) -> Capacity:
    """The capacity at the SLO of one mode's ladder (rate -> result)."""
    rates = sorted(stages)
    met = [meets_slo(stages[rate], slo_ttft_p90_ms) for rate in rates]
    steady = next((i for i, ok in enumerate(met) if not ok), len(rates))
    best = rates[steady - 1] if steady else None
    unsteady = tuple(rate for rate, ok in zip(rates[steady:], met[steady:], strict=True) if ok)
    return Capacity(best, bool(rates) and steady == len(rates), unsteady)


def ratio(metric: Metric, result: ModeResult, baseline: ModeResult) -> float | None:
    """`result`'s value over `baseline`'s (None when either is missing or the baseline is 0)."""
    value, base = metric.of(result), metric.of(baseline)
    if value is None or not base:
        return None
    return value / base
