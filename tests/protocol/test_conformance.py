"""The conformance suite's hooks (`--conformance-hooks`): endpoint selection and served-endpoint report."""

from __future__ import annotations

import time

from envoy.service.ext_proc.v3.external_processor_pb2 import HttpHeaders, ProcessingRequest

from picker.conformance import SELECTED_HEADER, SELECTION_HEADER, SERVED_HEADER, select, served_endpoint
from picker.datalayer.endpoint import Endpoint
from tests.protocol.conftest import ENDPOINTS, body_message, destination, headers_message

BODY = b'{"model": "m", "prompt": "hello"}'


def endpoints(*addresses: str) -> list[Endpoint]:
    return [Endpoint(address) for address in addresses]


def test_selection_names_endpoints_by_address_or_ip_in_header_order() -> None:
    a, b, c, d = pool = endpoints("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.2:8001", "[fd00::7]:8000")
    assert select("10.0.0.2:8001", pool) == [c]
    assert select("10.0.0.2", pool) == [b, c]  # a bare IP: every port on it
    assert select(" 10.0.0.2:8000 , 10.0.0.1", pool) == [b, a]  # header order, spaces ignored
    assert select("10.0.0.1,10.0.0.1:8000", pool) == [a]  # each once
    assert select("fd00::7", pool) == [d] and select("[fd00::7]:8000", pool) == [d]
    assert select("256.256.256.256", pool) == [] and select("", pool) == []


def response_headers_message(served: str | None, lb: bool = True) -> ProcessingRequest:
    message = ProcessingRequest(response_headers=HttpHeaders())
    if lb:
        fields = {"x-gateway-destination-endpoint-served": served} if served else {"other": "x"}
        message.metadata_context.filter_metadata["envoy.lb"].update(fields)
    return message


def test_served_endpoint_is_reported_as_the_reference_verifier_reports_it() -> None:
    assert served_endpoint(response_headers_message("10.0.0.2:8000")) == "10.0.0.2:8000"
    assert (
        served_endpoint(response_headers_message(None))
        == "fail: missing destination endpoint served metadata"
    )
    assert served_endpoint(response_headers_message(None, lb=False)) == "fail: missing envoy lb metadata"


def set_headers(answer) -> dict[str, str]:
    mutation = answer.response_headers.response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


async def test_with_hooks_the_header_picks_exactly_that_endpoint_and_the_answer_reports_it(
    make_picker,
) -> None:
    picker = await make_picker(conformance_hooks=True)
    for address, waiting in zip(ENDPOINTS, (0, 0, 40), strict=True):
        picker.set_metrics(address, waiting=waiting)
    worst = ENDPOINTS[2]
    picker.pool.get(worst).scraped_at = time.monotonic() - 3600  # stale: normally unroutable
    for _ in range(5):
        answers = await picker.exchange(
            headers_message(extra=[(SELECTION_HEADER, worst)]),
            body_message(BODY),
            response_headers_message("10.9.9.9:8000"),
        )
        pick, listed = destination(answers[1])
        assert pick == worst and listed == [worst]
        assert set_headers(answers[2]) == {SERVED_HEADER: "10.9.9.9:8000", SELECTED_HEADER: worst}
    two = f"{ENDPOINTS[0]},{ENDPOINTS[1]}"
    picks = {
        destination(
            (await picker.exchange(headers_message(extra=[(SELECTION_HEADER, two)]), body_message(BODY)))[1]
        )[0]
        for _ in range(20)
    }
    assert picks <= {ENDPOINTS[0], ENDPOINTS[1]} and len(picks) == 2  # equal scores: both used
    refused = await picker.exchange(
        headers_message(extra=[(SELECTION_HEADER, "256.256.256.256")]), body_message(BODY)
    )
    assert refused[-1].immediate_response.status.code == 503


async def test_without_hooks_the_header_is_ignored_and_nothing_is_reported(make_picker) -> None:
    picker = await make_picker()
    for address, waiting in zip(ENDPOINTS, (0, 30, 40), strict=True):
        picker.set_metrics(address, waiting=waiting)
    answers = await picker.exchange(
        headers_message(extra=[(SELECTION_HEADER, ENDPOINTS[2])]),
        body_message(BODY),
        response_headers_message("10.9.9.9:8000"),
    )
    assert destination(answers[1])[0] == ENDPOINTS[0]
    assert not answers[2].response_headers.response.HasField("header_mutation")
