"""The request limits: explicit, enforced in every body mode, and matching the shipped configs."""

from __future__ import annotations

import orjson
import pytest
import yaml

from loadtest.envoy import ENVOY_DIR
from picker.config import Config, LimitsConfig
from picker.request import InferenceRequest, apply_body
from picker.server import _grpc_options
from tests.protocol.conftest import (
    BUFFERED,
    ENDPOINTS,
    FULL_DUPLEX,
    Picker,
    body_message,
    destination,
    headers_message,
)

LIMITS = Config().limits
GATEWAY_ENVOY = ENVOY_DIR.parent / "gateway" / "overlays" / "standalone" / "envoy.yaml"


@pytest.mark.parametrize(
    "path", [*sorted(ENVOY_DIR.glob("envoy*.yaml")), GATEWAY_ENVOY], ids=lambda p: p.name
)
def test_shipped_envoy_buffers_exactly_the_picker_body_limit(path) -> None:
    listeners = yaml.safe_load(path.read_text())["static_resources"]["listeners"]
    assert [item["per_connection_buffer_limit_bytes"] for item in listeners] == [LIMITS.max_body_bytes]


def test_grpc_accepts_a_whole_body_at_the_limit() -> None:
    options = dict(_grpc_options(Config()))
    assert options["grpc.max_receive_message_length"] >= LIMITS.max_body_bytes + 64 * 1024


@pytest.mark.parametrize("mode", [BUFFERED, FULL_DUPLEX])
async def test_a_body_over_the_limit_is_413_in_every_mode(make_picker, mode: int) -> None:
    picker: Picker = await make_picker(Config(limits=LimitsConfig(max_body_bytes=1000)))
    at_limit = orjson.dumps({"model": "m", "prompt": "x" * (1000 - 25)})
    assert len(at_limit) == 1000
    answers = await picker.exchange(headers_message(request_mode=mode), body_message(at_limit))
    assert destination(answers[0 if mode == FULL_DUPLEX else 1])[0] in ENDPOINTS
    answers = await picker.exchange(headers_message(request_mode=mode), body_message(at_limit + b" "))
    assert answers[-1].immediate_response.status.code == 413


def test_prefix_walk_stops_at_the_cap_but_the_size_still_counts() -> None:
    """~270k messages: only the prefix is walked; the body's size stands in for the rest."""
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}] * 270_000})
    request = InferenceRequest(content_type="application/json")
    apply_body(request, body, LIMITS.max_prefix_chars)
    assert len(request.prompt) == LIMITS.max_prefix_chars
    assert request.prompt_chars == len(body)
    ids = orjson.dumps({"prompt": list(range(1_000_000))})
    apply_body(request, ids, LIMITS.max_prefix_chars)
    assert len(request.prompt) == LIMITS.max_prefix_chars and request.prompt_chars == len(ids)


async def test_json_nested_past_the_parser_limit_is_a_400(make_picker) -> None:
    picker: Picker = await make_picker()
    deep = b'{"messages":' + b"[" * 5000 + b"]" * 5000 + b"}"
    answers = await picker.exchange(headers_message(), body_message(deep))
    immediate = answers[-1].immediate_response
    assert immediate.status.code == 400
    assert "JSON" in orjson.loads(immediate.body)["error"]["message"]
