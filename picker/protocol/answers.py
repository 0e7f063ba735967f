"""Serialized ProcessingResponse messages, built once and reused.

Building an answer with protobuf costs ~14 us; returning cached bytes ~0.3 us. The server uses raw
(bytes) gRPC handlers, so everything it yields here goes on the wire as is.
"""

from __future__ import annotations

from enum import IntEnum

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    ImmediateResponse,
    ProcessingResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.struct_pb2 import Struct

from picker.errors import openai_error_body

DESTINATION_HEADER = "x-gateway-destination-endpoint"
LB_NAMESPACE = "envoy.lb"


class Phase(IntEnum):
    """ProcessingResponse field numbers of the answer kinds the picker sends."""

    REQUEST_HEADERS = 1
    RESPONSE_HEADERS = 2
    REQUEST_BODY = 3
    RESPONSE_BODY = 4
    REQUEST_TRAILERS = 5
    RESPONSE_TRAILERS = 6


_FIELD = {
    Phase.REQUEST_HEADERS: "request_headers",
    Phase.RESPONSE_HEADERS: "response_headers",
    Phase.REQUEST_BODY: "request_body",
    Phase.RESPONSE_BODY: "response_body",
    Phase.REQUEST_TRAILERS: "request_trailers",
    Phase.RESPONSE_TRAILERS: "response_trailers",
}


def _empty(phase: Phase) -> bytes:
    answer = ProcessingResponse()
    # An unset answer would read as "no answer" to Envoy (spurious message): mark it present.
    getattr(answer, _FIELD[phase]).SetInParent()
    return answer.SerializeToString()


CONTINUE: dict[Phase, bytes] = {phase: _empty(phase) for phase in Phase}


def route(phase: Phase, destinations: str) -> bytes:
    """Answer (to request headers or body) routing to `destinations`: header + envoy.lb metadata.

    `destinations` is "ip:port[,ip:port...]", the pick then fallbacks.

    Overwrites any destination header the client sent, and clears the route cache so a route that
    matches on the header's presence is chosen after the picker has spoken.
    """
    cached = _route_cache.get((phase, destinations))
    if cached is not None:
        return cached
    common = CommonResponse(
        header_mutation=HeaderMutation(set_headers=[_set_header(DESTINATION_HEADER, destinations)]),
        clear_route_cache=True,
    )
    metadata = Struct()
    metadata.update({LB_NAMESPACE: {DESTINATION_HEADER: destinations}})
    answer = ProcessingResponse(dynamic_metadata=metadata)
    if phase is Phase.REQUEST_HEADERS:
        answer.request_headers.CopyFrom(HeadersResponse(response=common))
    else:
        answer.request_body.CopyFrom(BodyResponse(response=common))
    data = answer.SerializeToString()
    if len(_route_cache) >= _ROUTE_CACHE_SIZE:
        _route_cache.clear()
    _route_cache[(phase, destinations)] = data
    return data


_ROUTE_CACHE_SIZE = 4096
_route_cache: dict[tuple[Phase, str], bytes] = {}


def immediate(status: int, message: str, retry_after: int | None = None) -> bytes:
    """The picker answers the client itself, with an OpenAI-style JSON error body."""
    headers = [_set_header("content-type", "application/json")]
    if retry_after is not None:
        headers.append(_set_header("retry-after", str(retry_after)))
    return ProcessingResponse(
        immediate_response=ImmediateResponse(
            status=HttpStatus(code=status),  # type: ignore[arg-type]
            headers=HeaderMutation(set_headers=headers),
            body=openai_error_body(status, message),
            details=f"picker_{status}",
        )
    ).SerializeToString()


def response_headers(headers: dict[str, str]) -> bytes:
    """Answer to response headers that sets `headers` on the response to the client."""
    common = CommonResponse(
        header_mutation=HeaderMutation(set_headers=[_set_header(k, v) for k, v in headers.items()])
    )
    return ProcessingResponse(response_headers=HeadersResponse(response=common)).SerializeToString()


def _set_header(key: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(
        header=HeaderValue(key=key, raw_value=value.encode()),
        append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def streamed_body(phase: Phase, body: bytes, end_of_stream: bool) -> bytes:
    """A full-duplex body chunk handed back unchanged, encoded by hand (hot path: once per chunk).

    ProcessingResponse{<phase>: BodyResponse{response: CommonResponse{body_mutation:
    BodyMutation{streamed_response: StreamedBodyResponse{body, end_of_stream}}}}}
    """
    chunk = _field(1, body) if body else b""
    if end_of_stream:
        chunk += b"\x10\x01"
    return _field(phase, _field(1, _field(3, _field(3, chunk))))
