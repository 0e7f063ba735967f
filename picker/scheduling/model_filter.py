"""Filter: only endpoints that serve the model (or LoRA adapter) the request names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from picker.datalayer.endpoint import Endpoint
from picker.request import InferenceRequest


@dataclass(slots=True)
class ServedModelFilter:
    """Drops endpoints whose `/v1/models` list is known and lacks the request's model.

    Endpoints that have not told (list unknown) stay: they may serve it. A request without a model
    (a GET, a body with no `model`) is not narrowed.
    """

    name: ClassVar[str] = "served-model"

    def filter(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> Sequence[Endpoint]:
        model = request.model
        if not model:
            return candidates
        kept = [ep for ep in candidates if (models := ep.models) is None or model in models]
        return candidates if len(kept) == len(candidates) else kept
