"""The contracts of the scheduling extension points (implementations live beside this module).

Modelled on the reference EPP's framework: a plugin is configured from YAML by its `type`, scores
are in [0, 1] (or None: no preference this decision) and combined as a weighted sum, and scorers
say whether they pull traffic together (affinity) or spread it (distribution).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Protocol

from picker.datalayer.endpoint import Endpoint
from picker.request import InferenceRequest


class ScorerCategory(enum.StrEnum):
    AFFINITY = "affinity"  # prefers endpoints likely to hold this request's state
    DISTRIBUTION = "distribution"  # prefers endpoints with spare capacity


class Filter(Protocol):
    name: str

    def filter(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> Sequence[Endpoint]:
        """The candidates that may serve `request` (a subset, order kept; `candidates` itself
        when all may, which lets scorers reuse what they derived from it)."""
        ...


class Scorer(Protocol):
    name: str
    category: ScorerCategory

    def score(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> Sequence[float] | None:
        """One score in [0, 1] per candidate, in candidate order; higher is better. None: no
        preference this time (no state for this request, nothing measured, every candidate
        equal), which leaves the scorer out of the weighted sum and of the decision's reason:
        under max-score picking a column equal for all candidates would change no pick."""
        ...


class Picker(Protocol):
    name: str

    def pick(self, candidates: Sequence[Endpoint], scores: Sequence[float]) -> list[Endpoint]:
        """The chosen endpoint first, then fallbacks a gateway may retry in order."""
        ...


class PickObserver(Protocol):
    """Told by request control where a request went, once the decision is committed (and again
    if the gateway served it on a fallback), e.g. so the prefix index learns what is where."""

    def on_pick(self, request: InferenceRequest, endpoint: Endpoint) -> None: ...


class Service(Protocol):
    """A plugin with work of its own beside decisions (following the engines' KV events): the
    server runs `run()` for as long as it serves."""

    async def run(self) -> None: ...
