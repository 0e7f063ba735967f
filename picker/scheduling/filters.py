"""Filters: narrow the candidates before scoring.

Plugins are dataclasses: fields named like `PluginContext` attributes (pool, metrics, clock, rng)
are filled from the context, every other field is a YAML param (see `scheduler.build_plugin`).
The gateway's subset hint is not a filter: request control applies it once, before admission.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from picker.config import MetricsConfig
from picker.datalayer.endpoint import Endpoint, Freshness, fresh_among
from picker.request import InferenceRequest


@dataclass(slots=True)
class HealthyFilter:
    """Keeps endpoints whose metrics are fresh: anything else may be down or hung.

    When none is fresh, the trouble is more likely on the picker's side (its own CPU starved, the
    scrapes timing out everywhere at once) than every replica failing together: then the stale
    ones (known, and not refusing connections) still get traffic, on their last metrics, instead
    of every request getting a 503.
    """

    name: ClassVar[str] = "healthy"
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    clock: Callable[[], float] = time.monotonic

    def filter(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> Sequence[Endpoint]:
        now = self.clock()
        stale_after = self.metrics.stale_after
        fresh = fresh_among(candidates, now, stale_after)
        if fresh:
            return fresh
        return [e for e in candidates if e.freshness(now, stale_after) is Freshness.STALE]
