"""The ext_proc `Process` stream: one per HTTP request, speaking the EPP protocol.

Body modes (learnt from `protocol_config`, which Envoy attaches to its messages):
- BUFFERED / BUFFERED_PARTIAL (our envoy.yaml): continue the headers, pick in the body answer.
  With response headers SKIP and body NONE nothing else arrives, and the stream stays open until
  the HTTP exchange ends: that is the exact in-flight signal, at zero messages per token.
- FULL_DUPLEX_STREAMED (GKE and the reference gateways): Envoy does not wait for the headers
  answer, and a header set in a body answer would not steer routing, so buffer the body, answer
  the headers with the pick, then hand every body chunk back unchanged. Response chunks are echoed
  as they come (they must be: ending the stream early loses chunks, see reference.md).
- STREAMED, NONE, or a request without a body: pick in the headers answer, on load alone.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest

from picker import telemetry
from picker.config import Config
from picker.director import Director, Refused, Routed
from picker.protocol.answers import (
    CONTINUE,
    LB_NAMESPACE,
    Phase,
    immediate,
    route,
    streamed_body,
)
from picker.request import BadRequest, InferenceRequest, apply_body

log = logging.getLogger(__name__)

BUFFERED = ProcessingMode.BUFFERED
BUFFERED_PARTIAL = ProcessingMode.BUFFERED_PARTIAL
FULL_DUPLEX = ProcessingMode.FULL_DUPLEX_STREAMED
STREAMED = ProcessingMode.STREAMED
NONE = ProcessingMode.NONE

SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
SERVED_KEY = "x-gateway-destination-endpoint-served"
OBJECTIVE_HEADER = "x-gateway-inference-objective"

_NO_ANSWER: tuple[bytes, ...] = ()
_TOO_LARGE = Refused(413, "request body is larger than the picker accepts (limits.max_body_bytes)")


class ExtProcService:
    """Serves `envoy.service.ext_proc.v3.ExternalProcessor/Process` on raw bytes."""

    def __init__(self, director: Director, config: Config) -> None:
        self.director = director
        self.config = config
        self._wanted_headers = {
            ":method",
            ":path",
            "content-type",
            OBJECTIVE_HEADER,
            config.session_header,
        }

    async def process(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        stream = _Stream(self)
        telemetry.STREAMS_OPEN.inc()
        try:
            async for raw in requests:
                for answer in stream.handle(ProcessingRequest.FromString(raw)):
                    yield answer
                if stream.finished:
                    return
        finally:
            stream.release()
            telemetry.STREAMS_OPEN.dec()


class _Stream:
    """The state of one HTTP exchange as seen through its ext_proc stream."""

    __slots__ = (
        "chunks",
        "finished",
        "request",
        "request_mode",
        "response_mode",
        "routed",
        "service",
        "size",
    )

    def __init__(self, service: ExtProcService) -> None:
        self.service = service
        self.request = InferenceRequest()
        self.request_mode: int | None = None  # None: the gateway did not say (assume BUFFERED)
        self.response_mode: int = NONE
        self.routed: Routed | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.finished = False

    def handle(self, message: ProcessingRequest) -> tuple[bytes, ...] | list[bytes]:
        if message.HasField("protocol_config"):
            self.request_mode = message.protocol_config.request_body_mode
            self.response_mode = message.protocol_config.response_body_mode
        kind = message.WhichOneof("request")
        if kind == "request_headers":
            return self._request_headers(message)
        if kind == "request_body":
            return self._request_body(message.request_body.body, message.request_body.end_of_stream)
        if kind == "request_trailers":
            if self.request_mode == FULL_DUPLEX and self.routed is None:
                return self._decide_duplex(ended_by_trailers=True)
            return (CONTINUE[Phase.REQUEST_TRAILERS],)
        if kind == "response_headers":
            self._note_served(message)
            return (CONTINUE[Phase.RESPONSE_HEADERS],)
        if kind == "response_body":
            if self.response_mode == FULL_DUPLEX:
                body = message.response_body
                return (streamed_body(Phase.RESPONSE_BODY, body.body, body.end_of_stream),)
            return (CONTINUE[Phase.RESPONSE_BODY],)
        if kind == "response_trailers":
            return (CONTINUE[Phase.RESPONSE_TRAILERS],)
        return _NO_ANSWER

    def _request_headers(self, message: ProcessingRequest) -> tuple[bytes, ...]:
        request = self.request
        service = self.service
        for header in message.request_headers.headers.headers:
            key = header.key
            if key in service._wanted_headers:
                value = header.raw_value.decode("utf-8", "replace") if header.raw_value else header.value
                if key == ":method":
                    request.method = value
                elif key == ":path":
                    request.path = value
                elif key == "content-type":
                    request.content_type = value
                elif key == OBJECTIVE_HEADER:
                    request.objective = value
                    request.priority = service.config.objectives.get(value, 0)
                else:
                    request.session_key = value
        metadata = message.metadata_context.filter_metadata
        if SUBSET_NAMESPACE in metadata:
            hint = metadata[SUBSET_NAMESPACE].fields.get(SUBSET_KEY)
            if hint is not None:
                request.subset = frozenset(v.string_value for v in hint.list_value.values if v.string_value)
        mode = self.request_mode
        if message.request_headers.end_of_stream or mode in (STREAMED, NONE):
            return self._decide(Phase.REQUEST_HEADERS)
        if mode == FULL_DUPLEX:
            return _NO_ANSWER  # Envoy streams the body without waiting; answer when it is whole
        return (CONTINUE[Phase.REQUEST_HEADERS],)

    def _request_body(self, body: bytes, end_of_stream: bool) -> tuple[bytes, ...] | list[bytes]:
        mode = self.request_mode
        if mode == FULL_DUPLEX:
            if self.routed is not None:  # already decided (trailers came first): pass through
                return (streamed_body(Phase.REQUEST_BODY, body, end_of_stream),)
            self.size += len(body)
            if self.size > self.service.config.limits.max_body_bytes:
                return self._refuse(_TOO_LARGE)
            if body:
                self.chunks.append(body)
            if end_of_stream:
                return self._decide_duplex(ended_by_trailers=False)
            return _NO_ANSWER
        if self.routed is not None or mode == STREAMED:
            return (CONTINUE[Phase.REQUEST_BODY],)
        # BUFFERED: the whole body in one message (end_of_stream is false when trailers follow).
        # BUFFERED_PARTIAL: possibly a cut-off prefix, which must not be mistaken for bad JSON.
        complete = end_of_stream or mode != BUFFERED_PARTIAL
        if complete and len(body) > self.service.config.limits.max_body_bytes:
            # A gateway buffering more than the picker accepts: the same answer in every mode.
            return self._refuse(_TOO_LARGE)
        return self._decide(Phase.REQUEST_BODY, body, complete)

    def _decide(self, phase: Phase, body: bytes = b"", complete: bool = True) -> tuple[bytes, ...]:
        outcome = self._route(body, complete)
        if isinstance(outcome, Refused):
            return self._refuse(outcome)
        return (route(phase, outcome.destinations),)

    def _decide_duplex(self, ended_by_trailers: bool) -> tuple[bytes, ...] | list[bytes]:
        chunks = self.chunks
        self.chunks = []
        outcome = self._route(b"".join(chunks), True)
        if isinstance(outcome, Refused):
            return self._refuse(outcome)
        answers = [route(Phase.REQUEST_HEADERS, outcome.destinations)]
        last = len(chunks) - 1
        for index, chunk in enumerate(chunks):
            answers.append(streamed_body(Phase.REQUEST_BODY, chunk, index == last and not ended_by_trailers))
        if not chunks and not ended_by_trailers:
            answers.append(streamed_body(Phase.REQUEST_BODY, b"", True))
        if ended_by_trailers:
            answers.append(CONTINUE[Phase.REQUEST_TRAILERS])
        return answers

    def _route(self, body: bytes, complete: bool) -> Routed | Refused:
        if self.routed is not None:  # one decision per stream: a repeated message (a gateway
            return self.routed  # bug, or hostile) must not hold a second endpoint, never released
        request = self.request
        if body:
            try:
                apply_body(request, body, self.service.config.limits.max_prefix_chars)
            except BadRequest as exc:
                if complete:
                    return Refused(exc.status, str(exc))
        outcome = self.service.director.route(request)
        if isinstance(outcome, Routed):
            self.routed = outcome
        return outcome

    def _refuse(self, refused: Refused) -> tuple[bytes, ...]:
        telemetry.IMMEDIATE_RESPONSES.labels(str(refused.status)).inc()
        self.finished = True
        return (immediate(refused.status, refused.message, refused.retry_after),)

    def _note_served(self, message: ProcessingRequest) -> None:
        routed = self.routed
        metadata = message.metadata_context.filter_metadata
        if routed is None or LB_NAMESPACE not in metadata:
            return
        served = metadata[LB_NAMESPACE].fields.get(SERVED_KEY)
        if served is not None and served.string_value:
            self.routed = self.service.director.moved(routed, served.string_value)

    def release(self) -> None:
        if self.routed is not None:
            self.service.director.release(self.routed)
            self.routed = None
