"""Which models and LoRA adapters each endpoint serves: its OpenAI `/v1/models` list.

Why that list and not the metrics page: `/metrics` names the base model (`model_name` labels) and
only the adapters in use right now (`vllm:lora_requests_info`); `/v1/models` lists the base model
and every adapter the server can serve (`--lora-modules`, and adapters loaded at run time, each
with `parent` naming its base model). It changes only when an adapter is loaded or unloaded, so the
scraper fetches it every `metrics.modelsInterval` seconds, not with every scrape.

An endpoint that has not answered yet, or answers with something that is not a model list (a
server without the endpoint), is unknown: it may serve anything. A request is refused with a 404
only when every candidate's list is known and none holds the model, so a pool whose endpoints
have not told yet routes exactly as before.
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson

from picker.datalayer.endpoint import Endpoint

MODELS_PATH = "/v1/models"
MAX_MODELS_BYTES = 1024 * 1024  # a list of thousands of adapters is still far below this


def parse_models(body: bytes) -> dict[str, str | None] | None:
    """model id -> its base model (None for a base model); None when `body` is no model list."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    cards = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(cards, list):
        return None
    models: dict[str, str | None] = {}
    for card in cards:
        name = card.get("id") if isinstance(card, dict) else None
        if not isinstance(name, str) or not name:
            return None
        parent = card.get("parent")
        models[name] = parent if isinstance(parent, str) and parent and parent != name else None
    return models or None  # an empty list says nothing a request could be refused on


def no_endpoint_serves(model: str, endpoints: Iterable[Endpoint]) -> bool:
    """True when `model` is named, every endpoint's list is known, and none of them serves it."""
    if not model:
        return False
    seen = False
    for endpoint in endpoints:
        models = endpoint.models
        if models is None or model in models:
            return False
        seen = True
    return seen
