"""Served models: `/v1/models` parsing, the model filter, and when a request is refused with 404."""

from __future__ import annotations

import orjson
import pytest

from picker.admission import Admission
from picker.config import Config
from picker.datalayer.endpoint import Endpoint, EngineMetrics
from picker.datalayer.models import no_endpoint_serves, parse_models
from picker.datalayer.pool import EndpointPool
from picker.errors import Refusal
from picker.request import InferenceRequest
from picker.requestcontrol import Decision, RequestControl
from picker.scheduling.scheduler import Scheduler
from tests.unit.conftest import NOW, pool_of


def vllm_models(base: str, *adapters: str) -> bytes:
    """What vLLM's `/v1/models` answers (trimmed): the base model, then LoRA adapters."""
    cards = [{"id": base, "object": "model", "root": "/models/llama", "parent": None}]
    cards += [{"id": name, "object": "model", "root": f"/loras/{name}", "parent": base} for name in adapters]
    return orjson.dumps({"object": "list", "data": cards})


def test_parse_models_maps_each_model_to_its_base() -> None:
    assert parse_models(vllm_models("llama", "sql", "chat")) == {
        "llama": None,
        "sql": "llama",
        "chat": "llama",
    }


@pytest.mark.parametrize(
    "body",
    [
        b"<html>not found</html>",
        b'{"object": "list"}',
        b'{"data": {"id": "x"}}',
        b'{"data": [{"object": "model"}]}',
        b'{"data": []}',
        b"[]",
        b'{"path": "/v1/models", "method": "GET"}',  # an echo server answers every path
    ],
)
def test_anything_but_a_model_list_leaves_the_endpoint_unknown(body: bytes) -> None:
    assert parse_models(body) is None


def endpoint(address: str, models: dict[str, str | None] | None) -> Endpoint:
    return Endpoint(address, metrics=EngineMetrics(), scraped_at=NOW, models=models)


def test_only_a_pool_that_has_told_can_refuse_a_model() -> None:
    told = endpoint("a:1", {"llama": None, "sql": "llama"})
    also = endpoint("b:1", {"llama": None})
    silent = endpoint("c:1", None)
    assert no_endpoint_serves("gpt-4", [told, also])
    assert not no_endpoint_serves("sql", [told, also])
    assert not no_endpoint_serves("gpt-4", [told, silent])  # c may serve it
    assert not no_endpoint_serves("gpt-4", [])
    assert not no_endpoint_serves("", [told, also])  # no model named: nothing to refuse


def pool_with(*models: dict[str, str | None] | None) -> EndpointPool:
    pool = pool_of(*({} for _ in models))
    for ep, served in zip(pool.endpoints, models, strict=True):
        ep.models = served
    return pool


def control(pool: EndpointPool) -> RequestControl:
    config = Config()
    scheduler = Scheduler.from_config(config, pool, clock=lambda: NOW)
    return RequestControl(pool, scheduler, Admission(config.saturation, config.metrics, lambda: NOW), config)


def test_requests_go_only_where_their_model_is_served() -> None:
    pool = pool_with({"llama": None}, {"llama": None, "sql": "llama"}, None)
    picks = control(pool)
    for _ in range(10):
        decision = picks.decide(InferenceRequest(model="sql"))
        assert isinstance(decision, Decision) and decision.endpoint is not pool.endpoints[0]
        picks.release(decision, lived_as_exchange=True)


def test_a_model_no_endpoint_serves_is_refused_404_not_misrouted() -> None:
    pool = pool_with({"llama": None}, {"llama": None, "sql": "llama"})
    refused = control(pool).decide(InferenceRequest(model="gpt-4"))
    assert isinstance(refused, Refusal) and refused.status == 404
    assert refused.message == "The model `gpt-4` does not exist."
    assert all(ep.inflight_requests == 0 for ep in pool.endpoints)


def test_until_endpoints_tell_nothing_is_refused_for_its_model() -> None:
    pool = pool_with(None, None)
    assert isinstance(control(pool).decide(InferenceRequest(model="anything")), Decision)
