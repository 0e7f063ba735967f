"""The ext_proc `Process` stream: one per HTTP request, speaking the EPP protocol.

Body modes (learnt from `protocol_config`, which Envoy attaches to its messages):
- BUFFERED / BUFFERED_PARTIAL (our envoy.yaml): continue the headers, pick in the body answer.
  With response headers SKIP and body NONE nothing else arrives, and the stream stays open until
  the HTTP exchange ends: the exact in-flight signal, at zero messages per token.
- FULL_DUPLEX_STREAMED (GKE and the reference gateways): Envoy does not wait for the headers
  answer, and a header set in a body answer would not steer routing, so buffer the body, answer
  the headers with the pick, then hand every body chunk back unchanged.
- STREAMED, NONE, or a request without a body: pick in the headers answer, on load alone.

Responses. A gateway that would send the response through the picker (response body mode not
NONE: every full-duplex gateway) is spared it with `response_processing: close`: the RPC ends
with the request phase, which the ext_proc spec reads as "proceed without the server". The last
answer of the request phase and the end of the RPC go out in one gRPC batch (one HTTP/2 write),
so Envoy learns of the end in the same read as the request's last byte, before the upstream can
possibly answer. Ended in a later write, Envoy had sometimes already handed the first response
bytes to the dying stream and lost them (5% of 1,000 streams against an instant upstream, 43%
under CPU pressure; 0 of 10,000 with the batch: loadtest/bench_lean.py). `echo` instead hands
every response chunk back, for gateways that treat a server's close as an error.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest

from picker import conformance, telemetry
from picker.config import Config
from picker.errors import Refusal
from picker.protocol.answers import (
    CONTINUE,
    LB_NAMESPACE,
    Phase,
    immediate,
    response_headers,
    route,
    streamed_body,
)
from picker.request import InferenceRequest, apply_body
from picker.requestcontrol import Decision, RequestControl

log = logging.getLogger(__name__)

BUFFERED = ProcessingMode.BUFFERED
BUFFERED_PARTIAL = ProcessingMode.BUFFERED_PARTIAL
FULL_DUPLEX = ProcessingMode.FULL_DUPLEX_STREAMED
STREAMED = ProcessingMode.STREAMED
NONE = ProcessingMode.NONE
# Request body modes in which Envoy keeps the stream open until the exchange ends even when it
# needs nothing more (Envoy >= 1.37 closes it early otherwise: ext_proc_stream_close_optimization).
_HELD_OPEN = frozenset({None, BUFFERED, BUFFERED_PARTIAL})

SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
SERVED_KEY = "x-gateway-destination-endpoint-served"
OBJECTIVE_HEADER = "x-gateway-inference-objective"

_NO_ANSWER: tuple[bytes, ...] = ()
# Answer to a gateway's end of a stream the picker kept open (see ExtProcService.process_closing).
_AFTER_END = b""


class ExtProcService:
    """Serves `envoy.service.ext_proc.v3.ExternalProcessor/Process` on raw bytes."""

    def __init__(self, control: RequestControl, config: Config, *, conformance_hooks: bool = False) -> None:
        self.control = control
        self.config = config
        self.conformance_hooks = conformance_hooks
        # The conformance hooks answer response headers, so the stream must outlive the request.
        self.closing = config.response_processing == "close" and not conformance_hooks
        self._wanted_headers = {
            ":method",
            ":path",
            "content-type",
            OBJECTIVE_HEADER,
            config.session_header,
            *([conformance.SELECTION_HEADER] if conformance_hooks else []),
        }

    async def process_closing(self, requests: AsyncIterator[bytes], context: Any) -> bytes:
        """`close`: a stream-unary handler, because only a unary answer goes out in one batch with
        the RPC's end. Streams the gateway keeps open (our envoy.yaml) end when it says so; the
        empty message that then goes with the status reaches a finished exchange and is dropped
        (measured: no Envoy stat counts it)."""
        stream = _Stream(self)
        telemetry.STREAMS_OPEN.inc()
        try:
            async for raw in requests:
                answers = stream.handle(ProcessingRequest.FromString(raw))
                if stream.finished:
                    for answer in answers[:-1]:
                        await context.write(answer)
                    return answers[-1]
                for answer in answers:
                    await context.write(answer)
            return _AFTER_END
        finally:
            stream.release()
            telemetry.STREAMS_OPEN.dec()

    async def process_echoing(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        """`echo`: a stream-stream handler that ends only after the gateway does (or on a refusal)."""
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
        "decision",
        "finished",
        "request",
        "request_mode",
        "response_mode",
        "service",
        "size",
    )

    def __init__(self, service: ExtProcService) -> None:
        self.service = service
        self.request = InferenceRequest()
        self.request_mode: int | None = None  # None: the gateway did not say (assume BUFFERED)
        self.response_mode: int = NONE
        self.decision: Decision | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.finished = False  # the RPC ends with the answers just returned

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
            if self.request_mode == FULL_DUPLEX and self.decision is None:
                return self._decide_duplex(ended_by_trailers=True)
            return self._request_done((CONTINUE[Phase.REQUEST_TRAILERS],))
        if kind == "response_headers":
            self._note_served(message)
            if self.service.conformance_hooks:
                selected = self.decision.destinations.split(",")[0] if self.decision else None
                return (response_headers(conformance.result_headers(message, selected)),)
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
                elif key == conformance.SELECTION_HEADER:
                    request.endpoint_selection = value
                else:
                    request.session_key = value
        metadata = message.metadata_context.filter_metadata
        if SUBSET_NAMESPACE in metadata:
            hint = metadata[SUBSET_NAMESPACE].fields.get(SUBSET_KEY)
            if hint is not None:
                request.subset = frozenset(v.string_value for v in hint.list_value.values if v.string_value)
        mode = self.request_mode
        if message.request_headers.end_of_stream or mode == NONE:  # no body will come to the picker
            return self._request_done(self._decide(Phase.REQUEST_HEADERS))
        if mode == STREAMED:
            return self._decide(Phase.REQUEST_HEADERS)
        if mode == FULL_DUPLEX:
            return _NO_ANSWER  # Envoy streams the body without waiting; answer when it is whole
        return (CONTINUE[Phase.REQUEST_HEADERS],)

    def _request_body(self, body: bytes, end_of_stream: bool) -> tuple[bytes, ...] | list[bytes]:
        mode = self.request_mode
        if mode == FULL_DUPLEX:
            if self.decision is not None:  # already decided (trailers came first): pass through
                return (streamed_body(Phase.REQUEST_BODY, body, end_of_stream),)
            self.size += len(body)
            if self.size > self.service.config.limits.max_body_bytes:
                return self._refuse(_too_large())
            if body:
                self.chunks.append(body)
            if end_of_stream:
                return self._decide_duplex(ended_by_trailers=False)
            return _NO_ANSWER
        if self.decision is not None or mode == STREAMED:
            answers = (CONTINUE[Phase.REQUEST_BODY],)
            return self._request_done(answers) if end_of_stream else answers
        # BUFFERED: the whole body in one message (end_of_stream is false when trailers follow).
        # BUFFERED_PARTIAL: possibly a cut-off prefix, which must not be mistaken for bad JSON.
        complete = end_of_stream or mode != BUFFERED_PARTIAL
        if complete and len(body) > self.service.config.limits.max_body_bytes:
            # A gateway buffering more than the picker accepts: the same answer in every mode.
            return self._refuse(_too_large())
        answers = self._decide(Phase.REQUEST_BODY, body, complete)
        return self._request_done(answers) if end_of_stream else answers

    def _decide(self, phase: Phase, body: bytes = b"", complete: bool = True) -> tuple[bytes, ...]:
        outcome = self._route(body, complete)
        if isinstance(outcome, Refusal):
            return self._refuse(outcome)
        return (route(phase, outcome.destinations),)

    def _decide_duplex(self, ended_by_trailers: bool) -> tuple[bytes, ...] | list[bytes]:
        chunks = self.chunks
        self.chunks = []
        outcome = self._route(b"".join(chunks), True)
        if isinstance(outcome, Refusal):
            return self._refuse(outcome)
        answers = [route(Phase.REQUEST_HEADERS, outcome.destinations)]
        last = len(chunks) - 1
        for index, chunk in enumerate(chunks):
            answers.append(streamed_body(Phase.REQUEST_BODY, chunk, index == last and not ended_by_trailers))
        if not chunks and not ended_by_trailers:
            answers.append(streamed_body(Phase.REQUEST_BODY, b"", True))
        if ended_by_trailers:
            answers.append(CONTINUE[Phase.REQUEST_TRAILERS])
        return self._request_done(answers)

    def _request_done(self, answers: tuple[bytes, ...] | list[bytes]) -> tuple[bytes, ...] | list[bytes]:
        """The request phase ends with `answers`: in `close` mode the RPC ends with them when the
        gateway would otherwise send the response through the picker."""
        if self.service.closing and self.response_mode != NONE and not self.finished:
            self.finished = True
            telemetry.LEAN_CLOSES.inc()
        return answers

    def _route(self, body: bytes, complete: bool) -> Decision | Refusal:
        if self.decision is not None:  # one decision per stream: a repeated message (a gateway
            return self.decision  # bug, or hostile) must not hold a second endpoint, never released
        request = self.request
        if body:
            try:
                apply_body(request, body, self.service.config.limits.max_prefix_chars)
            except Refusal as refusal:
                if complete:
                    return refusal
        outcome = self.service.control.decide(request)
        if isinstance(outcome, Decision):
            self.decision = outcome
        return outcome

    def _refuse(self, refusal: Refusal) -> tuple[bytes, ...]:
        telemetry.IMMEDIATE_RESPONSES.labels(str(refusal.status)).inc()
        self.finished = True
        return (immediate(refusal.status, refusal.message, refusal.retry_after),)

    def _note_served(self, message: ProcessingRequest) -> None:
        decision = self.decision
        metadata = message.metadata_context.filter_metadata
        if decision is None or LB_NAMESPACE not in metadata:
            return
        served = metadata[LB_NAMESPACE].fields.get(SERVED_KEY)
        if served is not None and served.string_value:
            self.service.control.served_elsewhere(decision, served.string_value)

    def release(self) -> None:
        decision = self.decision
        if decision is not None:
            self.decision = None
            # The stream lived as long as the exchange unless it ended with the request phase:
            # closed by the picker, or by Envoy when it needs nothing more (no response processing).
            lived_as_exchange = not self.finished and (
                self.request_mode in _HELD_OPEN or self.response_mode != NONE
            )
            self.service.control.release(decision, lived_as_exchange=lived_as_exchange)


def _too_large() -> Refusal:
    return Refusal(413, "request body is larger than the picker accepts (limits.max_body_bytes)")
