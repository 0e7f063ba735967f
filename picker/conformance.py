"""What the Gateway API Inference Extension conformance suite asks of an EPP (`--conformance-hooks`).

The suite (kubernetes-sigs/gateway-api-inference-extension, `conformance/`) checks a gateway by
steering its EPP per request and reading back where the request went:

- Request header `test-epp-endpoint-selection: ip[:port][,ip[:port]...]`: schedule over exactly
  the endpoints named, in that order (the reference's header-based testing filter). An entry with
  a port matches that address only; a bare IP matches every endpoint on it. Freshness and model
  filters are skipped, since the suite's backends are echo servers with no metrics; when nothing
  named is in the pool (or the gateway's subset hint), the answer is the usual 503.
- Response headers answer: `x-conformance-test-served-endpoint` carries the gateway's
  `envoy.lb` / `x-gateway-destination-endpoint-served` metadata (or the reference verifier's
  "fail: ..." text when it is missing), `x-conformance-test-selected-endpoint` the picker's pick.
  The gateway must send response headers to the EPP (full-duplex gateways do).

Off by default: the header would let any client choose its replica.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest

from picker.datalayer.endpoint import Endpoint
from picker.request import InferenceRequest

SELECTION_HEADER = "test-epp-endpoint-selection"
SERVED_HEADER = "x-conformance-test-served-endpoint"
SELECTED_HEADER = "x-conformance-test-selected-endpoint"
LB_NAMESPACE = "envoy.lb"
SERVED_KEY = "x-gateway-destination-endpoint-served"


def select(value: str, candidates: Sequence[Endpoint]) -> list[Endpoint]:
    """The candidates `value` names, in the order it names them, each once."""
    chosen: list[Endpoint] = []
    for item in value.split(","):
        host, port = _host_port(item.strip())
        if not host:
            continue
        for endpoint in candidates:
            ep_host, ep_port = _host_port(endpoint.address)
            if ep_host == host and port in (None, ep_port) and endpoint not in chosen:
                chosen.append(endpoint)
    return chosen


def _host_port(address: str) -> tuple[str, str | None]:
    """ "10.0.0.1:8000" / "[fd00::1]:8000" -> (host, port); a bare IPv4 or IPv6 -> (host, None)."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    if address.count(":") == 1:
        host, _, port = address.partition(":")
        return host, port
    return address, None


@dataclass(slots=True)
class EndpointSelectionFilter:
    """The selection header as a filter (the scheduler runs it instead of the usual filters)."""

    name: ClassVar[str] = SELECTION_HEADER

    def filter(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[Endpoint]:
        return select(request.endpoint_selection or "", candidates)


def served_endpoint(message: ProcessingRequest) -> str:
    """What the gateway says served the request, worded as the reference verifier words it."""
    metadata = message.metadata_context.filter_metadata
    if LB_NAMESPACE not in metadata:
        return "fail: missing envoy lb metadata"
    served = metadata[LB_NAMESPACE].fields.get(SERVED_KEY)
    if served is None or not served.string_value:
        return "fail: missing destination endpoint served metadata"
    return served.string_value


def result_headers(message: ProcessingRequest, selected: str | None) -> dict[str, str]:
    """The response headers the suite reads back."""
    headers = {SERVED_HEADER: served_endpoint(message)}
    if selected:
        headers[SELECTED_HEADER] = selected
    return headers
