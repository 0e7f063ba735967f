"""The issues' acceptance targets, checked against a run's results wherever both modes were measured.

`TARGETS` compare modes at one concurrency; `LADDER_TARGETS` compare rate ladders (capacity at an
SLO, `python -m loadtest capacity`), keyed by the capacity preset's name.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from loadtest.stats import (
    E2E_P99,
    HIT_RATE,
    OUTPUT_TPS,
    TOTAL_TPS,
    TTFT_P90,
    Metric,
    ModeResult,
    capacity,
    meets_slo,
    ratio,
)


@dataclass(frozen=True, slots=True)
class Target:
    workload: str
    metric: Metric
    bound: float  # the ratio mode / baseline must reach (>= for higher-is-better, <= otherwise)
    baseline: str
    mode: str = "picker"

    def __str__(self) -> str:
        sign = ">=" if self.metric.better == "higher" else "<="
        return f"{self.mode} {self.metric.label} {sign} {self.bound:g} x {self.baseline}"


@dataclass(frozen=True, slots=True)
class Check:
    target: Target
    ratio: float | None  # None: a value was missing (e.g. no completed request)

    @property
    def met(self) -> bool:
        compare = operator.ge if self.target.metric.better == "higher" else operator.le
        return self.ratio is not None and compare(self.ratio, self.target.bound)


TARGETS = (
    Target("uniform", TOTAL_TPS, 0.97, "envoy-rr"),
    Target("uniform", TOTAL_TPS, 0.95, "direct"),
    Target("shared-prefix", TTFT_P90, 0.2, "direct"),
    Target("shared-prefix", OUTPUT_TPS, 1.3, "direct"),
    Target("shared-prefix", HIT_RATE, 2.0, "direct"),
    Target("heterogeneous", E2E_P99, 0.6, "direct"),
)


def check(workload: str, modes: dict[str, ModeResult]) -> list[Check]:
    """The targets of `workload` whose mode and baseline are both in `modes`."""
    return [
        Check(t, ratio(t.metric, modes[t.mode], modes[t.baseline]))
        for t in TARGETS
        if t.workload == workload and t.mode in modes and t.baseline in modes
    ]


Measure = Literal["capacity", "hit rate", "hit points lost", "TTFT p90 at baseline capacity"]


@dataclass(frozen=True, slots=True)
class LadderTarget:
    """A bound on `mode` against `baseline` over their ladders.

    - `capacity`: capacity at the SLO / the baseline's (>= bound);
    - `hit rate`: mean prefix hit rate / the baseline's (>= bound), see `mean_hit_rates`;
    - `hit points lost`: the same means' difference, baseline minus mode (<= bound);
    - `TTFT p90 at baseline capacity`: TTFT p90 / the baseline's at the highest rate where the
      baseline met the SLO (<= bound).
    """

    workload: str
    measure: Measure
    bound: float
    baseline: str
    mode: str = "picker"

    @property
    def higher_is_better(self) -> bool:
        return self.measure in ("capacity", "hit rate")

    def __str__(self) -> str:
        if self.measure == "hit points lost":
            return f"{self.mode} hit rate within {self.bound * 100:g} points of {self.baseline}"
        sign = ">=" if self.higher_is_better else "<="
        return f"{self.mode} {self.measure} {sign} {self.bound:g} x {self.baseline}"

    def value(
        self, ladders: Mapping[str, Mapping[float, ModeResult]], slo_ttft_p90_ms: float | None
    ) -> float | None:
        """The measured ratio (or difference); None when a number is missing."""
        mine, base = ladders[self.mode], ladders[self.baseline]
        if self.measure == "capacity":
            mine_rate, base_rate = capacity(mine, slo_ttft_p90_ms).rate, capacity(base, slo_ttft_p90_ms).rate
            return None if mine_rate is None or not base_rate else mine_rate / base_rate
        if self.measure == "TTFT p90 at baseline capacity":
            rate = capacity(base, slo_ttft_p90_ms).rate
            if rate is None or rate not in mine:
                return None
            return ratio(TTFT_P90, mine[rate], base[rate])
        mine_hit, base_hit = mean_hit_rates(mine, base, slo_ttft_p90_ms)
        if mine_hit is None or base_hit is None:
            return None
        if self.measure == "hit points lost":
            return base_hit - mine_hit
        return mine_hit / base_hit if base_hit else None


def mean_hit_rates(
    mine: Mapping[float, ModeResult], base: Mapping[float, ModeResult], slo_ttft_p90_ms: float | None
) -> tuple[float | None, float | None]:
    """Each ladder's mean prefix hit rate over the rates both ran within the SLO (all they both
    ran if none): past its capacity a pool's queues decide what stays cached, not its routing."""
    common = sorted(set(mine) & set(base))
    within = [
        r for r in common if meets_slo(mine[r], slo_ttft_p90_ms) and meets_slo(base[r], slo_ttft_p90_ms)
    ]
    common = within or common

    def mean(stages: Mapping[float, ModeResult]) -> float | None:
        values = [v for rate in common if (v := stages[rate].prefix_cache_hit_rate) is not None]
        return sum(values) / len(values) if values else None

    return mean(mine), mean(base)


@dataclass(frozen=True, slots=True)
class LadderCheck:
    target: LadderTarget
    value: float | None

    @property
    def met(self) -> bool:
        if self.value is None:
            return False
        return (
            self.value >= self.target.bound
            if self.target.higher_is_better
            else self.value <= self.target.bound
        )


_SEVERAL_PICKERS = tuple(
    target
    for workload in ("cache-pressure", "trace")
    for mode in ("picker-x2", "picker-x3")
    for target in (
        LadderTarget(workload, "hit points lost", 0.03, "picker", mode),
        LadderTarget(workload, "capacity", 0.95, "picker", mode),
    )
)
LADDER_TARGETS = (
    LadderTarget("well-lit", "capacity", 2.5, "envoy-rr"),
    LadderTarget("cache-pressure", "hit rate", 0.9, "oracle"),
    LadderTarget("cache-pressure", "capacity", 1.3, "envoy-rr"),
    LadderTarget("trace", "TTFT p90 at baseline capacity", 0.5, "envoy-rr"),
    LadderTarget("trace", "hit rate", 0.9, "oracle"),
    LadderTarget("uniform", "capacity", 0.97, "envoy-rr"),
    *_SEVERAL_PICKERS,
)


def check_ladders(
    workload: str, ladders: Mapping[str, Mapping[float, ModeResult]], slo_ttft_p90_ms: float | None
) -> list[LadderCheck]:
    """The ladder targets of `workload` whose mode and baseline both ran (others are skipped)."""
    return [
        LadderCheck(t, t.value(ladders, slo_ttft_p90_ms))
        for t in LADDER_TARGETS
        if t.workload == workload and t.mode in ladders and t.baseline in ladders
    ]
