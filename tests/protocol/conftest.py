"""Drive the picker's ext_proc service over a real gRPC connection, as a gateway would."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import grpc
import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpHeaders,
    HttpTrailers,
    ProcessingRequest,
    ProcessingResponse,
)
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub

from picker.admission import Admission
from picker.config import Config
from picker.datalayer.endpoint import EngineMetrics
from picker.datalayer.pool import EndpointPool
from picker.protocol.extproc import ExtProcService
from picker.requestcontrol import Decision, RequestControl
from picker.scheduling.scheduler import Scheduler
from picker.server import extproc_handler

BUFFERED = ProcessingMode.BUFFERED
FULL_DUPLEX = ProcessingMode.FULL_DUPLEX_STREAMED
STREAMED = ProcessingMode.STREAMED
NONE = ProcessingMode.NONE


def headers_message(
    path: str = "/v1/completions",
    method: str = "POST",
    extra: Iterable[tuple[str, str]] = (),
    *,
    end_of_stream: bool = False,
    request_mode: int | None = BUFFERED,
    response_mode: int = NONE,
    subset: list[str] | None = None,
) -> ProcessingRequest:
    pairs = [(":method", method), (":path", path), (":authority", "gw"), *extra]
    if method == "POST" and not any(k == "content-type" for k, _ in extra):
        pairs.append(("content-type", "application/json"))
    message = ProcessingRequest(
        request_headers=HttpHeaders(
            headers=HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]),
            end_of_stream=end_of_stream,
        )
    )
    if request_mode is not None:
        message.protocol_config.request_body_mode = request_mode  # type: ignore[assignment]
        message.protocol_config.response_body_mode = response_mode  # type: ignore[assignment]
    if subset is not None:
        message.metadata_context.filter_metadata["envoy.lb.subset_hint"].update(
            {"x-gateway-destination-endpoint-subset": subset}
        )
    return message


def body_message(body: bytes, end_of_stream: bool = True) -> ProcessingRequest:
    return ProcessingRequest(request_body=HttpBody(body=body, end_of_stream=end_of_stream))


def response_body_message(body: bytes, end_of_stream: bool) -> ProcessingRequest:
    return ProcessingRequest(response_body=HttpBody(body=body, end_of_stream=end_of_stream))


def trailers_message() -> ProcessingRequest:
    message = ProcessingRequest(request_trailers=HttpTrailers())
    message.request_trailers.SetInParent()
    return message


def destination(answer: ProcessingResponse) -> tuple[str, list[str]]:
    """(the pick, the pick and its fallbacks) of a routing answer; header and metadata agree."""
    kind = answer.WhichOneof("response")
    common = getattr(answer, kind).response
    (option,) = common.header_mutation.set_headers
    assert option.header.key == "x-gateway-destination-endpoint"
    assert common.clear_route_cache
    lb = answer.dynamic_metadata.fields["envoy.lb"].struct_value
    value = option.header.raw_value.decode()
    assert lb.fields["x-gateway-destination-endpoint"].string_value == value
    endpoints = value.split(",")
    assert len(set(endpoints)) == len(endpoints)
    return endpoints[0], endpoints


@dataclass
class Picker:
    pool: EndpointPool
    stub: ExternalProcessorStub
    config: Config
    releases: asyncio.Queue[str]  # the address of each endpoint the picker let go of

    async def released(self) -> str:
        """Wait for the next release of an in-flight hold (a stream ended)."""
        async with asyncio.timeout(5):
            return await self.releases.get()

    def set_metrics(self, address: str, **values: float) -> None:
        endpoint = self.pool.get(address)
        assert endpoint is not None
        endpoint.metrics = EngineMetrics(**values)  # type: ignore[arg-type]
        endpoint.scraped_at = time.monotonic()
        endpoint.consecutive_failures = 0
        endpoint.refresh_load()

    def inflight(self, address: str) -> int:
        endpoint = self.pool.get(address)
        assert endpoint is not None
        return endpoint.inflight_requests

    async def exchange(self, *messages: ProcessingRequest) -> list[ProcessingResponse]:
        """Send messages on one stream, half-close, and collect every answer until the end.

        See `remaining_answers` for the end of the stream.
        """
        call = self.stub.Process()
        for message in messages:
            await call.write(message)
        await call.done_writing()
        return await remaining_answers(call)


async def remaining_answers(call: grpc.aio.StreamStreamCall) -> list[ProcessingResponse]:
    """Every answer until the stream ends, which must end with status OK.

    In `close` mode the picker answers the gateway's own end of a stream it kept open with an
    empty message (ExtProcService.process_closing): checked here, and left out.
    """
    answers = []
    while (answer := await call.read()) is not grpc.aio.EOF:
        answers.append(answer)
    assert await call.code() is grpc.StatusCode.OK
    if answers and answers[-1].WhichOneof("response") is None:
        assert answers.pop() == ProcessingResponse()
    return answers


ENDPOINTS = ("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000")


@pytest.fixture
async def make_picker() -> AsyncIterator:
    servers: list[grpc.aio.Server] = []
    channels: list[grpc.aio.Channel] = []

    async def make(
        config: Config | None = None, endpoints: Iterable[str] = ENDPOINTS, conformance_hooks: bool = False
    ) -> Picker:
        config = config or Config()
        pool = EndpointPool()
        pool.set_addresses(endpoints)
        for endpoint in pool.endpoints:
            endpoint.metrics = EngineMetrics()
            endpoint.scraped_at = time.monotonic()
        scheduler = Scheduler.from_config(config, pool, conformance_hooks=conformance_hooks)
        control = RequestControl(pool, scheduler, Admission(config.saturation, config.metrics), config)
        releases: asyncio.Queue[str] = asyncio.Queue()
        release = control.release

        def observed_release(decision: Decision, *, lived_as_exchange: bool) -> None:
            release(decision, lived_as_exchange=lived_as_exchange)
            releases.put_nowait(decision.endpoint.address)

        control.release = observed_release  # type: ignore[method-assign]
        server = grpc.aio.server()
        service = ExtProcService(control, config, conformance_hooks=conformance_hooks)
        server.add_generic_rpc_handlers((extproc_handler(service),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return Picker(pool, ExternalProcessorStub(channel), config, releases)

    yield make
    for channel in channels:
        await channel.close()
    for server in servers:
        await server.stop(None)
