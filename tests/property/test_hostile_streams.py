"""Arbitrary ext_proc traffic: the picker never crashes, never hangs a stream, answers with a
route or a clear error, releases what it held, and keeps serving normal requests."""

from __future__ import annotations

import asyncio
import itertools

import grpc
import orjson
from envoy.config.core.v3.base_pb2 import HeaderValueOption
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from picker.telemetry import REGISTRY
from tests.property.strategies import bodies, headers, message_sequences
from tests.protocol.conftest import (
    BUFFERED,
    ENDPOINTS,
    FULL_DUPLEX,
    Picker,
    body_message,
    destination,
    headers_message,
    remaining_answers,
)

ANSWER_WITHIN = 5.0  # seconds; a stream waiting longer for its answer counts as hung
ERROR_STATUSES = {400, 413, 429, 503}
SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # one picker on purpose: it must survive every example
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


def check_answer(answer: ProcessingResponse) -> str:
    """Every answer is a known kind; errors are OpenAI-style; routes name pool endpoints only."""
    kind = answer.WhichOneof("response")
    assert kind is not None, "an answer with nothing set reads as a spurious message to Envoy"
    if kind == "immediate_response":
        immediate = answer.immediate_response
        assert immediate.status.code in ERROR_STATUSES
        headers = {o.header.key: o.header.raw_value for o in immediate.headers.set_headers}
        assert headers["content-type"] == b"application/json"
        message = orjson.loads(immediate.body)["error"]["message"]
        assert isinstance(message, str) and message
    elif kind in ("request_headers", "request_body") and getattr(answer, kind).response.HasField(
        "header_mutation"
    ):
        _, listed = destination(answer)
        assert set(listed) <= set(ENDPOINTS)
        (option,) = getattr(answer, kind).response.header_mutation.set_headers
        assert option.append_action == HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD  # never the client's
    return kind


def streams_open() -> float:
    return REGISTRY.get_sample_value("picker_extproc_streams_open") or 0.0


def assert_nothing_held(picker: Picker) -> None:
    for endpoint in picker.pool.endpoints:
        assert (endpoint.inflight_requests, endpoint.inflight_tokens) == (0, 0), endpoint.address


async def assert_serves_a_normal_request(picker: Picker) -> None:
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]})
    async with asyncio.timeout(ANSWER_WITHIN):
        answers = await picker.exchange(headers_message("/v1/chat/completions"), body_message(body))
    assert answers[-1].WhichOneof("response") == "request_body", answers[-1]
    assert destination(answers[-1])[0] in ENDPOINTS


def stream_ends() -> float:
    """Streams the picker ended itself: refusals, and lean closes after the request phase."""
    metric = REGISTRY.get_sample_value
    refusals = sum(
        metric("picker_immediate_responses_total", {"status": str(s)}) or 0.0 for s in ERROR_STATUSES
    )
    return refusals + (metric("picker_extproc_lean_closes_total") or 0.0)


async def send_all(picker: Picker, messages: list[ProcessingRequest]) -> list[ProcessingResponse]:
    """Write every message, half-close, read every answer. A picker that refuses a request, or
    closes a stream after its request phase, ends it itself; later writes then fail on the client,
    which gRPC reports as INTERNAL."""
    call = picker.stub.Process()
    ended_before = stream_ends()
    answers: list[ProcessingResponse] = []
    try:
        for message in messages:
            await call.write(message)
        await call.done_writing()
        answers = await remaining_answers(call)  # raises on any non-OK status
    except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
        if await call.code() is not grpc.StatusCode.OK:
            assert await call.code() is grpc.StatusCode.INTERNAL, await call.details()
            assert stream_ends() == ended_before + 1, "the stream failed without the picker ending it"
    return answers


@SETTINGS
@given(messages=message_sequences)
async def test_any_message_sequence_ends_cleanly(picker: Picker, messages: list[ProcessingRequest]) -> None:
    before = streams_open()
    async with asyncio.timeout(ANSWER_WITHIN):
        answers = await send_all(picker, messages)
    for answer in answers:
        check_answer(answer)
    assert streams_open() == before
    assert_nothing_held(picker)
    await assert_serves_a_normal_request(picker)


async def _read(call: grpc.aio.StreamStreamCall) -> ProcessingResponse:
    async with asyncio.timeout(ANSWER_WITHIN):
        answer = await call.read()
    assert isinstance(answer, ProcessingResponse), "the picker ended the stream without answering"
    return answer


@SETTINGS
@given(
    head=headers(end_of_stream=False),
    mode=st.sampled_from([None, BUFFERED, FULL_DUPLEX]),
    body=bodies,
    cuts=st.lists(st.integers(0, 2**20), max_size=3),
)
async def test_a_gateway_waiting_for_each_answer_always_gets_one(
    picker: Picker, head: ProcessingRequest, mode: int | None, body: bytes, cuts: list[int]
) -> None:
    """Unlike a half-closed stream, Envoy waits for the answers its body mode calls for."""
    head.ClearField("protocol_config")
    if mode is not None:
        head.protocol_config.request_body_mode = mode  # type: ignore[assignment]
    call = picker.stub.Process()
    await call.write(head)
    if mode != FULL_DUPLEX:
        assert check_answer(await _read(call)) == "request_headers"
        await call.write(body_message(body))
        decision = await _read(call)
    else:
        bounds = sorted({0, *(c % (len(body) + 1) for c in cuts), len(body)})
        chunks = [body[a:b] for a, b in itertools.pairwise(bounds)] or [b""]
        for i, chunk in enumerate(chunks):
            await call.write(body_message(chunk, i == len(chunks) - 1))
        decision = await _read(call)
    kind = check_answer(decision)
    if kind == "immediate_response":
        assert await call.read() is grpc.aio.EOF  # refused: the picker ends the stream itself
    else:
        assert kind == ("request_headers" if mode == FULL_DUPLEX else "request_body")
        assert sum(e.inflight_requests for e in picker.pool.endpoints) == 1
        if mode == FULL_DUPLEX:  # every byte handed back, in order, ending the body
            echoed, ended = b"", False
            while not ended:
                streamed = (await _read(call)).request_body.response.body_mutation.streamed_response
                echoed, ended = echoed + streamed.body, streamed.end_of_stream
            assert echoed == body
        await call.done_writing()
        async with asyncio.timeout(ANSWER_WITHIN):
            assert await remaining_answers(call) == []
    assert_nothing_held(picker)
    await assert_serves_a_normal_request(picker)
