"""Hypothesis strategies for hostile ext_proc traffic: headers, bodies and message sequences.

Bodies stay under ~1 MB here so a CI run stays short; the multi-MB cases are explicit tests.
"""

from __future__ import annotations

import orjson
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpHeaders,
    HttpTrailers,
    ProcessingRequest,
)
from hypothesis import strategies as st

from tests.protocol.conftest import BUFFERED, ENDPOINTS, FULL_DUPLEX, NONE, STREAMED, body_message

BUFFERED_PARTIAL = 3
MODES = (BUFFERED, BUFFERED_PARTIAL, STREAMED, NONE, FULL_DUPLEX)

_KEYS = (
    ":method",
    ":path",
    ":authority",
    "content-type",
    "x-gateway-inference-objective",
    "x-session-id",
    "x-gateway-destination-endpoint",
    "content-length",
)
_METHODS = ("POST", "GET", "PUT", "DELETE", "OPTIONS", "BREW", "", "post")
_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/", "/../etc/x", "")
_CONTENT_TYPES = ("application/json", "application/vnd.x+json; charset=utf-8", "text/plain", "", "json")

header_values = st.one_of(
    st.sampled_from(_METHODS + _PATHS + _CONTENT_TYPES + ("batch", "critical", ENDPOINTS[0])),
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
    st.text(max_size=64),
)
header_pairs = st.lists(
    st.tuples(st.one_of(st.sampled_from(_KEYS), st.text(max_size=20)), header_values), max_size=12
)


@st.composite
def headers(draw: st.DrawFn, end_of_stream: bool | None = None) -> ProcessingRequest:
    """Request headers in any order, duplicated or missing, in `value` or `raw_value`, with or
    without protocol_config and subset hint."""
    pairs = draw(header_pairs)
    raw = draw(st.booleans())
    values = [
        HeaderValue(key=k, raw_value=v.encode("utf-8", "surrogatepass"))
        if raw
        else HeaderValue(key=k, value=v)
        for k, v in pairs
    ]
    eos = draw(st.booleans()) if end_of_stream is None else end_of_stream
    message = ProcessingRequest(
        request_headers=HttpHeaders(headers=HeaderMap(headers=values), end_of_stream=eos)
    )
    mode = draw(st.one_of(st.none(), st.sampled_from(MODES)))
    if mode is not None:
        message.protocol_config.request_body_mode = mode  # type: ignore[assignment]
        message.protocol_config.response_body_mode = draw(st.sampled_from(MODES))  # type: ignore[assignment]
    hint = st.lists(st.sampled_from([*ENDPOINTS, "", "x", "1.2.3.4:5"]), max_size=4)
    subset = draw(st.one_of(st.none(), hint))
    if subset is not None:
        message.metadata_context.filter_metadata["envoy.lb.subset_hint"].update(
            {"x-gateway-destination-endpoint-subset": subset}
        )
    return message


_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=40),
)
_json = st.recursive(
    _json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(
            st.one_of(
                st.sampled_from(["model", "messages", "prompt", "input", "content", "role", "stream"]),
                st.text(max_size=8),
            ),
            inner,
            max_size=5,
        ),
    ),
    max_leaves=30,
)


def _chat(content: object, count: int = 1) -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": content}] * count})


bodies = st.one_of(
    st.binary(max_size=2048),  # binary, non-UTF-8
    st.binary(max_size=64).map(lambda b: b"{" + b),  # looks like JSON, is not
    _json.map(orjson.dumps),  # any JSON value, OpenAI-looking keys
    st.builds(lambda text, cut: _chat(text)[:cut], st.text(max_size=200), st.integers(0, 300)),  # truncated
    st.integers(1, 3000).map(lambda depth: b'{"messages":' + b"[" * depth + b"]" * depth + b"}"),  # nesting
    st.integers(1, 20_000).map(lambda n: _chat("hi", n)),  # enormous messages arrays
    st.integers(1, 20_000).map(lambda n: orjson.dumps({"model": "m", "prompt": list(range(n))})),
    st.integers(0, 1_000_000).map(lambda n: _chat("x" * n)),  # prompts up to 1 MB
    st.text(max_size=200).map(lambda t: t.encode("utf-16")),  # valid text, wrong encoding
    st.sampled_from([b'{"prompt": [1e999, 99999999999999999999999999]}', rb'{"model": "\ud800"}']),
)


_KINDS = ("headers", "body", "body", "trailers", "response_headers", "response_body", "response_trailers", "")


@st.composite
def any_message(draw: st.DrawFn) -> ProcessingRequest:
    """Any message a gateway could send, in any phase."""
    kind = draw(st.sampled_from(_KINDS))
    if kind == "headers":
        return draw(headers())
    if kind == "body":
        return body_message(draw(bodies), draw(st.booleans()))
    if kind == "trailers":
        return ProcessingRequest(request_trailers=HttpTrailers())
    if kind == "response_headers":
        return ProcessingRequest(response_headers=HttpHeaders(end_of_stream=draw(st.booleans())))
    if kind == "response_body":
        chunk = HttpBody(body=draw(st.binary(max_size=256)), end_of_stream=draw(st.booleans()))
        return ProcessingRequest(response_body=chunk)
    if kind == "response_trailers":
        return ProcessingRequest(response_trailers=HttpTrailers())
    return ProcessingRequest()


message_sequences = st.lists(any_message(), max_size=8)
