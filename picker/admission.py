"""Admission: shed sheddable requests (priority < 0) while the pool is saturated.

Saturation follows the reference EPP: an endpoint's saturation is max(waiting / queue_threshold,
kv_usage / kv_threshold), an endpoint whose metrics are not fresh counts as saturated, and the
pool is saturated when the mean over the candidates reaches 1. Each endpoint's value is capped at 1
so one runaway replica cannot shed traffic its idle peers could serve: the pool is saturated
exactly when no candidate has room, and the mean below 1 says how close it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from picker.config import MetricsConfig, SaturationConfig
from picker.datalayer.endpoint import Endpoint, Freshness
from picker.errors import Refusal


@dataclass(slots=True)
class Admission:
    saturation: SaturationConfig = field(default_factory=SaturationConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        if self.saturation.queue_threshold <= 0 or self.saturation.kv_threshold <= 0:
            raise ValueError("saturation thresholds must be positive")

    def endpoint_saturation(self, endpoint: Endpoint, now: float) -> float:
        """0 (idle) .. 1 (saturated); metrics not fresh -> 1, we cannot count on it."""
        m = endpoint.metrics
        if m is None or endpoint.freshness(now, self.metrics.stale_after) is not Freshness.FRESH:
            return 1.0
        cfg = self.saturation
        return min(1.0, max(m.waiting / cfg.queue_threshold, m.kv_usage / cfg.kv_threshold))

    def pool_saturation(self, candidates: Sequence[Endpoint]) -> float:
        """Mean endpoint saturation; 0 for no candidates (that is a 503, not shedding)."""
        if not candidates:
            return 0.0
        now = self.clock()
        return sum(self.endpoint_saturation(ep, now) for ep in candidates) / len(candidates)

    def check(self, candidates: Sequence[Endpoint]) -> Refusal | None:
        """A 429 for a sheddable request meeting a saturated pool; None admits it."""
        if self.pool_saturation(candidates) < 1.0:
            return None
        return Refusal(
            429,
            "the inference pool is saturated; sheddable requests are rejected until it recovers",
            retry_after=self.saturation.retry_after_seconds,
        )
