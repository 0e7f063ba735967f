"""Pickers: turn the weighted scores into the chosen endpoint plus fallbacks."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from picker.datalayer.endpoint import Endpoint

TIE_TOLERANCE = 1e-9  # weighted sums this close are equal (float rounding of equal inputs)


@dataclass(slots=True)
class MaxScorePicker:
    """Highest score wins; equal best scores are broken at random so ties do not all go to one.

    Returns at most `max_num_of_endpoints` (the reference picker's parameter): the winner, then
    the others in descending score as fallbacks for the gateway to retry in order.
    """

    name: ClassVar[str] = "max-score-picker"
    rng: random.Random = field(default_factory=random.Random)
    max_num_of_endpoints: int = 3

    def __post_init__(self) -> None:
        if self.max_num_of_endpoints < 1:
            raise ValueError("maxNumOfEndpoints must be at least 1")

    def pick(self, candidates: Sequence[Endpoint], scores: Sequence[float]) -> list[Endpoint]:
        if not candidates:
            return []
        ranked = sorted(range(len(candidates)), key=scores.__getitem__, reverse=True)
        floor = scores[ranked[0]] - TIE_TOLERANCE
        ties = 1
        while ties < len(ranked) and scores[ranked[ties]] >= floor:
            ties += 1
        if ties > 1:  # move a random one of the equal best to the front
            pick = self.rng.randrange(ties)
            ranked[0], ranked[pick] = ranked[pick], ranked[0]
        return [candidates[i] for i in ranked[: self.max_num_of_endpoints]]
