"""Pickers: turn the weighted scores into the chosen endpoint plus fallbacks."""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from picker.datalayer.endpoint import Endpoint

TIE_TOLERANCE = 1e-9  # weighted sums this close are equal (float rounding of equal inputs)


@dataclass(slots=True)
class MaxScorePicker:
    """Highest score wins; equal best scores are broken at random so ties do not all go to one.

    After the winner come up to `fallbacks` other endpoints in descending score, for the gateway
    to retry in order.
    """

    name: ClassVar[str] = "max-score"
    rng: random.Random = field(default_factory=random.Random)
    fallbacks: int = 2

    def __post_init__(self) -> None:
        if self.fallbacks < 0:
            raise ValueError("fallbacks must not be negative")

    def pick(self, candidates: Sequence[Endpoint], scores: Sequence[float]) -> list[Endpoint]:
        if not candidates:
            return []
        floor = max(scores) - TIE_TOLERANCE
        best = [i for i, s in enumerate(scores) if s >= floor]
        win = best[0] if len(best) == 1 else self.rng.choice(best)
        chosen = [candidates[win]]
        if self.fallbacks:
            others = (i for i in range(len(candidates)) if i != win)
            rest = heapq.nlargest(self.fallbacks, others, key=scores.__getitem__)
            chosen.extend(candidates[i] for i in rest)
        return chosen
