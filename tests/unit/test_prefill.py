"""The prefill queue: which routed requests a new one waits behind, and when they leave it."""

from __future__ import annotations

from picker.datalayer.endpoint import Endpoint, EngineMetrics
from picker.datalayer.prefill import MAX_AGE


def scraped(endpoint: Endpoint, first_tokens: float | None, began: float, waiting: float = 0.0) -> None:
    endpoint.observe_metrics(EngineMetrics(waiting=waiting, first_tokens=first_tokens), visible_before=began)


def test_requests_leave_when_the_engines_first_token_count_reaches_their_turn() -> None:
    endpoint = Endpoint("a:1")
    scraped(endpoint, 7.0, began=9.0)
    first = endpoint.hold(400, now=10.0)  # 100 tokens at the prior; the 8th first token
    endpoint.hold(800, now=10.5, cached_tokens=150)  # 200 tokens, 150 of them held already
    endpoint.hold(4000, now=11.0)
    assert endpoint.prefill.tokens == 100 + 50 + 1000
    scraped(endpoint, 7.0, began=11.5)
    assert endpoint.prefill.tokens == 1150  # nothing past its prefill yet
    scraped(endpoint, 9.0, began=12.0)
    assert endpoint.prefill.tokens == 1000 and first.prefill == 0
    scraped(endpoint, 10.0, began=12.5)
    assert (endpoint.prefill.tokens, len(endpoint.prefill.entries)) == (0, 0)


def test_requests_queued_ahead_from_elsewhere_keep_a_request_in_the_queue() -> None:
    # Four requests (another picker's, say) wait at the engine when this one is routed: the first
    # tokens they get do not take it out; its own does.
    endpoint = Endpoint("a:1")
    scraped(endpoint, 0.0, began=1.0, waiting=4.0)
    endpoint.hold(400, now=1.5)
    scraped(endpoint, 4.0, began=2.0, waiting=1.0)
    assert endpoint.prefill.tokens == 100
    scraped(endpoint, 5.0, began=2.5)
    assert endpoint.prefill.tokens == 0


def test_the_queue_forgets_what_ended_restarted_or_cannot_be_counted() -> None:
    endpoint = Endpoint("a:1")
    scraped(endpoint, 50.0, began=9.0)
    over = endpoint.hold(400, now=10.0)
    endpoint.release(over, exchange_over=True)  # answered (or failed) before any scrape saw it
    assert endpoint.prefill.tokens == 0
    lean = endpoint.hold(400, now=10.0)
    endpoint.release(lean, exchange_over=False)  # lean mode: only the request phase is over
    assert endpoint.prefill.tokens == 100
    endpoint.hold(400, now=10.0)
    scraped(endpoint, 3.0, began=11.0)  # the count went back: the engine restarted
    assert (endpoint.prefill.tokens, len(endpoint.prefill.entries)) == (0, 0)
    # An engine without the counter: exchanges that end leave at once (none is kept)...
    scraped(endpoint, None, began=12.0)
    for held in [endpoint.hold(400, now=12.5) for _ in range(100)]:
        endpoint.release(held, exchange_over=True)
    assert (endpoint.prefill.tokens, len(endpoint.prefill.entries)) == (0, 0)
    # ...and what never ends, only age takes out.
    endpoint.hold(400, now=20.0)
    scraped(endpoint, None, began=21.0)
    endpoint.hold(40, now=20.0 + MAX_AGE + 1.0)
    assert endpoint.prefill.tokens == 10


def test_requests_routed_before_the_first_count_queue_from_it() -> None:
    endpoint = Endpoint("a:1")
    endpoint.hold(400, now=1.0)
    endpoint.hold(400, now=1.0)
    scraped(endpoint, 20.0, began=2.0)  # the first scrape: they are the next two first tokens
    assert endpoint.prefill.tokens == 200
    scraped(endpoint, 21.0, began=2.5)
    assert endpoint.prefill.tokens == 100
    scraped(endpoint, 22.0, began=3.0)
    assert endpoint.prefill.tokens == 0
