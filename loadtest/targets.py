"""The issue's acceptance targets, checked against a run's results wherever both modes were measured."""

from __future__ import annotations

import operator
from dataclasses import dataclass

from loadtest.stats import E2E_P99, HIT_RATE, OUTPUT_TPS, TOTAL_TPS, TTFT_P90, Metric, ModeResult, ratio


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
