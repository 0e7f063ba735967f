"""The EPP protocol over gRPC, one body mode at a time."""

from __future__ import annotations

import asyncio

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse

from picker.config import Config, LimitsConfig
from picker.telemetry import REGISTRY
from tests.protocol.conftest import (
    BUFFERED,
    ENDPOINTS,
    FULL_DUPLEX,
    NONE,
    STREAMED,
    body_message,
    destination,
    headers_message,
    remaining_answers,
    response_body_message,
    trailers_message,
)

CHAT = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hello " * 50}]})


async def test_buffered_continues_headers_and_routes_in_the_body_answer(make_picker) -> None:
    picker = await make_picker()
    answers = await picker.exchange(headers_message("/v1/chat/completions"), body_message(CHAT))
    assert [a.WhichOneof("response") for a in answers] == ["request_headers", "request_body"]
    assert not answers[0].request_headers.response.HasField("header_mutation")
    pick, listed = destination(answers[1])
    assert pick in ENDPOINTS and set(listed) <= set(ENDPOINTS)


async def test_buffered_routes_to_the_endpoint_with_the_shortest_queue(make_picker) -> None:
    picker = await make_picker()
    for address, waiting in zip(ENDPOINTS, (9, 0, 7), strict=True):
        picker.set_metrics(address, waiting=waiting, kv_usage=0.3)
    for _ in range(5):
        answers = await picker.exchange(headers_message(), body_message(b'{"prompt": "x"}'))
        assert destination(answers[1])[0] == ENDPOINTS[1]


async def test_in_flight_is_held_while_the_stream_is_open_and_released_at_its_end(make_picker) -> None:
    picker = await make_picker(endpoints=ENDPOINTS[:1])
    call = picker.stub.Process()
    await call.write(headers_message())
    await call.read()
    await call.write(body_message(b'{"prompt": "abc"}'))
    assert destination(await call.read())[0] == ENDPOINTS[0]
    assert picker.inflight(ENDPOINTS[0]) == 1
    await call.done_writing()  # the HTTP exchange ended normally
    assert await remaining_answers(call) == []
    assert await picker.released() == ENDPOINTS[0]
    assert picker.inflight(ENDPOINTS[0]) == 0


async def test_in_flight_is_released_when_the_gateway_cancels_the_stream(make_picker) -> None:
    picker = await make_picker(endpoints=ENDPOINTS[:1])
    call = picker.stub.Process()
    await call.write(headers_message())
    await call.read()
    await call.write(body_message(b'{"prompt": "abc"}'))
    await call.read()
    assert picker.inflight(ENDPOINTS[0]) == 1
    call.cancel()  # client aborted: Envoy resets the stream
    assert await picker.released() == ENDPOINTS[0]
    assert picker.inflight(ENDPOINTS[0]) == 0


async def test_in_flight_load_spreads_a_burst_before_metrics_move(make_picker) -> None:
    picker = await make_picker()
    calls, chosen = [], []
    for _ in range(len(ENDPOINTS)):
        call = picker.stub.Process()
        await call.write(headers_message())
        await call.read()
        await call.write(body_message(b'{"prompt": "same"}'))
        chosen.append(destination(await call.read())[0])
        calls.append(call)
    assert sorted(chosen) == sorted(ENDPOINTS)
    for call in calls:
        await call.done_writing()


async def test_bodyless_request_is_routed_in_the_headers_answer(make_picker) -> None:
    picker = await make_picker()
    answers = await picker.exchange(headers_message("/v1/models", "GET", end_of_stream=True))
    assert [a.WhichOneof("response") for a in answers] == ["request_headers"]
    assert destination(answers[0])[0] in ENDPOINTS


async def test_streamed_and_none_body_modes_route_on_headers_and_pass_the_body(make_picker) -> None:
    picker = await make_picker()
    for mode in (STREAMED, NONE):
        messages = [headers_message(request_mode=mode)]
        if mode == STREAMED:
            messages += [body_message(b'{"prompt":', False), body_message(b' "x"}', True)]
        answers = await picker.exchange(*messages)
        assert destination(answers[0])[0] in ENDPOINTS
        for answer in answers[1:]:
            assert answer.WhichOneof("response") == "request_body"
            assert not answer.request_body.response.HasField("body_mutation")


async def test_missing_protocol_config_is_treated_as_buffered(make_picker) -> None:
    picker = await make_picker()
    answers = await picker.exchange(headers_message(request_mode=None), body_message(CHAT))
    assert [a.WhichOneof("response") for a in answers] == ["request_headers", "request_body"]
    assert destination(answers[1])[0] in ENDPOINTS


def _streamed(answer: ProcessingResponse, kind: str) -> tuple[bytes, bool]:
    assert answer.WhichOneof("response") == kind
    streamed = getattr(answer, kind).response.body_mutation.streamed_response
    return streamed.body, streamed.end_of_stream


async def test_full_duplex_buffers_then_routes_in_headers_and_returns_the_body_unchanged(
    make_picker,
) -> None:
    picker = await make_picker(Config(response_processing="echo"))
    pieces = [CHAT[:10], CHAT[10:40], CHAT[40:]]
    call = picker.stub.Process()
    await call.write(headers_message(request_mode=FULL_DUPLEX, response_mode=FULL_DUPLEX))
    for index, piece in enumerate(pieces):
        await call.write(body_message(piece, index == len(pieces) - 1))
    answers = [await call.read() for _ in range(1 + len(pieces))]
    assert answers[0].WhichOneof("response") == "request_headers"
    assert destination(answers[0])[0] in ENDPOINTS
    echoed = [_streamed(a, "request_body") for a in answers[1:]]
    assert b"".join(body for body, _ in echoed) == CHAT
    assert [eos for _, eos in echoed] == [False, False, True]
    # The response: headers continue, every SSE chunk handed back unchanged and in order.
    await call.write(ProcessingRequest(response_headers={}))
    assert (await call.read()).WhichOneof("response") == "response_headers"
    chunks = [f"data: {i}\n\n".encode() for i in range(5)] + [b"data: [DONE]\n\n"]
    for index, chunk in enumerate(chunks):
        await call.write(response_body_message(chunk, index == len(chunks) - 1))
        assert _streamed(await call.read(), "response_body") == (chunk, index == len(chunks) - 1)
    await call.done_writing()
    assert await remaining_answers(call) == []


def lean_closes() -> float:
    return REGISTRY.get_sample_value("picker_extproc_lean_closes_total") or 0.0


async def request_phase_then_end(call: grpc.aio.StreamStreamCall, *messages: ProcessingRequest) -> list:
    """Write `messages` without half-closing; every answer until the picker ends the RPC (OK)."""
    for message in messages:
        await call.write(message)
    answers = []
    async with asyncio.timeout(5):
        while (answer := await call.read()) is not grpc.aio.EOF:
            answers.append(answer)
    assert await call.code() is grpc.StatusCode.OK
    return answers


async def test_close_mode_ends_a_full_duplex_stream_with_the_request_phase(make_picker) -> None:
    """Lean mode: the gateway would send every response chunk; the picker ends the RPC with the
    request body's last answer instead, so the response never crosses it."""
    picker = await make_picker(endpoints=ENDPOINTS[:1])
    closes = lean_closes()
    pieces = [CHAT[:10], CHAT[10:40], CHAT[40:]]
    answers = await request_phase_then_end(
        picker.stub.Process(),
        headers_message(request_mode=FULL_DUPLEX, response_mode=FULL_DUPLEX),
        *(body_message(piece, index == len(pieces) - 1) for index, piece in enumerate(pieces)),
    )
    assert destination(answers[0])[0] == ENDPOINTS[0]
    echoed = [_streamed(a, "request_body") for a in answers[1:]]
    assert b"".join(body for body, _ in echoed) == CHAT
    assert [eos for _, eos in echoed] == [False, False, True]
    assert lean_closes() == closes + 1
    # The stream is gone, but the request is still assumed on its endpoint until a scrape shows it.
    assert await picker.released() == ENDPOINTS[0]
    (endpoint,) = picker.pool.endpoints
    assert endpoint.inflight_requests == 0 and endpoint.load == 1


@pytest.mark.parametrize(
    ("request_mode", "messages", "kinds"),
    [
        (FULL_DUPLEX, [], ["request_headers"]),  # bodyless: the headers answer is the last
        (
            FULL_DUPLEX,
            [body_message(CHAT, False), trailers_message()],
            ["request_headers", "request_body", "request_trailers"],
        ),
        (BUFFERED, [body_message(CHAT)], ["request_headers", "request_body"]),
        (
            STREAMED,
            [body_message(CHAT[:20], False), body_message(CHAT[20:])],
            ["request_headers", "request_body", "request_body"],
        ),
    ],
    ids=["duplex-bodyless", "duplex-trailers", "buffered", "streamed"],
)
async def test_close_mode_ends_with_the_last_answer_of_every_request_phase(
    make_picker, request_mode: int, messages: list[ProcessingRequest], kinds: list[str]
) -> None:
    picker = await make_picker()
    head = headers_message(request_mode=request_mode, response_mode=FULL_DUPLEX, end_of_stream=not messages)
    answers = await request_phase_then_end(picker.stub.Process(), head, *messages)
    assert [a.WhichOneof("response") for a in answers] == kinds
    assert destination(answers[1 if request_mode == BUFFERED else 0])[0] in ENDPOINTS


async def test_close_mode_keeps_streams_open_when_no_response_would_cross_the_picker(make_picker) -> None:
    """Response body NONE: nothing to spare, and the stream may carry the exchange's lifetime."""
    picker = await make_picker()
    closes = lean_closes()
    call = picker.stub.Process()
    await call.write(headers_message(request_mode=FULL_DUPLEX, response_mode=NONE))
    await call.write(body_message(CHAT))
    assert destination(await call.read())[0] in ENDPOINTS
    assert _streamed(await call.read(), "request_body") == (CHAT, True)
    assert sum(picker.inflight(a) for a in ENDPOINTS) == 1
    await call.done_writing()
    assert await remaining_answers(call) == []
    assert lean_closes() == closes


async def test_full_duplex_request_ended_by_trailers(make_picker) -> None:
    picker = await make_picker()
    answers = await picker.exchange(
        headers_message(request_mode=FULL_DUPLEX),
        body_message(CHAT[:20], False),
        body_message(CHAT[20:], False),
        trailers_message(),
    )
    kinds = [a.WhichOneof("response") for a in answers]
    assert kinds == ["request_headers", "request_body", "request_body", "request_trailers"]
    assert b"".join(_streamed(a, "request_body")[0] for a in answers[1:3]) == CHAT
    assert not any(_streamed(a, "request_body")[1] for a in answers[1:3])


async def test_full_duplex_body_over_the_limit_is_refused_with_413(make_picker) -> None:
    picker = await make_picker(Config(limits=LimitsConfig(max_body_bytes=100)))
    answers = await picker.exchange(
        headers_message(request_mode=FULL_DUPLEX), body_message(b"x" * 80, False), body_message(b"x" * 80)
    )
    assert answers[-1].immediate_response.status.code == 413


async def test_subset_hint_restricts_the_choice(make_picker) -> None:
    picker = await make_picker()
    picker.set_metrics(ENDPOINTS[0], waiting=0)
    picker.set_metrics(ENDPOINTS[2], waiting=50)  # worse, but the only one the gateway allows
    for _ in range(5):
        answers = await picker.exchange(headers_message(subset=[ENDPOINTS[2]]), body_message(CHAT))
        assert destination(answers[1])[0] == ENDPOINTS[2]


def _error(answer: ProcessingResponse) -> tuple[int, dict, dict[str, str]]:
    immediate = answer.immediate_response
    headers = {o.header.key: o.header.raw_value.decode() for o in immediate.headers.set_headers}
    return immediate.status.code, orjson.loads(immediate.body), headers


async def test_subset_hint_that_is_empty_or_matches_nothing_is_503(make_picker) -> None:
    picker = await make_picker()
    for subset in ([], ["192.0.2.9:8000"]):
        answers = await picker.exchange(headers_message(subset=subset), body_message(CHAT))
        status, body, headers = _error(answers[-1])
        assert status == 503 and headers["content-type"] == "application/json"
        assert body["error"]["message"]


async def test_invalid_json_is_a_400_with_an_openai_error_body(make_picker) -> None:
    picker = await make_picker()
    answers = await picker.exchange(headers_message(), body_message(b'{"model": "m", "prompt": '))
    status, body, _ = _error(answers[-1])
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert "JSON" in body["error"]["message"]
    assert all(p.inflight(a) == 0 for p in [picker] for a in ENDPOINTS)


async def test_non_json_body_on_an_unknown_path_routes_by_load(make_picker) -> None:
    picker = await make_picker()
    answers = await picker.exchange(
        headers_message("/custom/thing", extra=[("content-type", "text/plain")]),
        body_message(b"\x00\xffbinary"),
    )
    assert destination(answers[-1])[0] in ENDPOINTS


async def test_no_live_endpoint_is_503(make_picker) -> None:
    picker = await make_picker()
    for endpoint in picker.pool.endpoints:
        endpoint.consecutive_failures, endpoint.last_failure = 3, "connect"
    answers = await picker.exchange(headers_message(), body_message(CHAT))
    assert _error(answers[-1])[0] == 503


async def test_scrapes_timing_out_everywhere_still_route_on_last_metrics(make_picker) -> None:
    picker = await make_picker()
    for endpoint in picker.pool.endpoints:
        endpoint.consecutive_failures, endpoint.last_failure = 2, "timeout"
    answers = await picker.exchange(headers_message(), body_message(CHAT))
    assert destination(answers[-1])[0] in ENDPOINTS


async def test_sheddable_request_on_a_saturated_pool_gets_429_with_retry_after(make_picker) -> None:
    config = Config(objectives={"batch": -1, "chat": 10})
    picker = await make_picker(config)
    for address in ENDPOINTS:
        picker.set_metrics(address, waiting=50, kv_usage=0.95)
    shed = await picker.exchange(
        headers_message(extra=[("x-gateway-inference-objective", "batch")]), body_message(CHAT)
    )
    status, body, headers = _error(shed[-1])
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert body["error"]["message"]
    kept = await picker.exchange(
        headers_message(extra=[("x-gateway-inference-objective", "chat")]), body_message(CHAT)
    )
    assert destination(kept[-1])[0] in ENDPOINTS
