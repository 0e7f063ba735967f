"""Characters per token learned from routed prompts and the engine's counters, and what uses it."""

from __future__ import annotations

import pytest

from picker.datalayer.calibration import PRIOR_CHARS_PER_TOKEN, CharsPerToken
from picker.datalayer.endpoint import Endpoint, EngineMetrics
from picker.request import InferenceRequest
from picker.scheduling.scorers import PrefixCacheScorer
from tests.unit.conftest import pool_of
from tests.unit.test_prefix import FakeClock, text


def feed(
    estimate: CharsPerToken, *, scrapes: int, chars: int, tokens: int, mine: int = 1, others: int = 0
) -> None:
    """`scrapes` scrape intervals in each of which this picker routes `mine` prompts of `chars`
    characters (`tokens` tokens each) and other clients send `others` of the same."""
    total_tokens = total_finished = 0
    estimate.engine_counters(0.0, 0.0)
    for _ in range(scrapes):
        for _ in range(mine):
            estimate.routed_request(chars)
        total_tokens += (mine + others) * tokens
        total_finished += mine + others
        estimate.engine_counters(float(total_tokens), float(total_finished))


def test_the_prior_stands_until_enough_was_seen() -> None:
    estimate = CharsPerToken()
    feed(estimate, scrapes=2, chars=1200, tokens=100)  # 200 tokens, 2 requests: too little
    assert not estimate.calibrated and estimate.value == PRIOR_CHARS_PER_TOKEN


def test_measures_characters_per_token_of_what_was_routed() -> None:
    estimate = CharsPerToken()
    feed(estimate, scrapes=60, chars=1200, tokens=100)
    assert estimate.calibrated and estimate.value == pytest.approx(12.0)


def test_other_clients_of_the_engine_do_not_skew_it() -> None:
    # A second picker sends twice as much to the same engine: its tokens are in the counter too.
    estimate = CharsPerToken()
    feed(estimate, scrapes=60, chars=1200, tokens=100, mine=1, others=2)
    assert estimate.value == pytest.approx(12.0)


def test_an_engine_without_a_request_counter_is_taken_to_be_ours_alone() -> None:
    estimate = CharsPerToken()
    estimate.engine_counters(0.0, None)
    for i in range(1, 61):
        estimate.routed_request(300)
        estimate.engine_counters(100.0 * i, None)
    assert estimate.value == pytest.approx(3.0)


def test_a_counter_reset_is_no_negative_increase() -> None:
    estimate = CharsPerToken()
    feed(estimate, scrapes=60, chars=1200, tokens=100)
    before = (estimate.tokens, estimate.finished)
    estimate.routed_request(1200)
    estimate.engine_counters(10.0, 1.0)  # the engine restarted
    assert (estimate.tokens, estimate.finished) == before
    assert estimate.value == pytest.approx(12.0)


def test_requests_that_finish_in_a_scrape_of_their_own_are_counted() -> None:
    # A long decode: each request is routed, prefilled and finished in three different scrapes,
    # and nothing else happens in the scrape that sees it finish.
    estimate = CharsPerToken()
    tokens = finished = 0.0
    estimate.engine_counters(tokens, finished)
    for _ in range(200):
        estimate.routed_request(1200)
        estimate.engine_counters(tokens, finished)
        tokens += 100
        estimate.engine_counters(tokens, finished)
        finished += 1
        estimate.engine_counters(tokens, finished)
    assert estimate.calibrated and estimate.value == pytest.approx(12.0, rel=0.01)


def test_idle_scrapes_do_not_wear_the_estimate_away() -> None:
    estimate = CharsPerToken()
    feed(estimate, scrapes=60, chars=1200, tokens=100)
    tokens = estimate.tokens
    for _ in range(10_000):
        estimate.engine_counters(6000.0, 60.0)
    assert estimate.tokens == tokens and estimate.calibrated


def test_nonsense_is_clamped() -> None:
    estimate = CharsPerToken()
    feed(estimate, scrapes=60, chars=100_000, tokens=100)
    assert estimate.value == 32.0


def test_in_flight_tokens_use_the_endpoint_calibration() -> None:
    endpoint = Endpoint("a:1", EngineMetrics())
    assert endpoint.hold(1200, now=1.0).tokens == 1200 / PRIOR_CHARS_PER_TOKEN
    feed(endpoint.chars_per_token, scrapes=60, chars=1200, tokens=100)
    assert endpoint.hold(1200, now=2.0).tokens == 100


def test_a_request_served_elsewhere_is_taken_back() -> None:
    endpoint = Endpoint("a:1", EngineMetrics())
    entry = endpoint.hold(1200, now=1.0)
    endpoint.reroute(entry)
    assert (endpoint.inflight_requests, endpoint.pending_requests) == (0, 0)
    endpoint.chars_per_token.engine_counters(0.0, 0.0)
    endpoint.chars_per_token.engine_counters(100.0, 1.0)
    assert endpoint.chars_per_token.chars == 0.0


def test_prefix_index_capacity_is_the_engine_kv_in_calibrated_characters() -> None:
    # 100 engine blocks x 16 tokens; at 12 characters a token that is 19,200 characters of prompt.
    pool = pool_of({"num_gpu_blocks": 100, "block_size": 16}, {"num_gpu_blocks": 100, "block_size": 16})
    fast, slow = pool.endpoints
    scorer = PrefixCacheScorer(pool, FakeClock())
    feed(fast.chars_per_token, scrapes=60, chars=1200, tokens=100)
    assert scorer.block_chars == 16 * PRIOR_CHARS_PER_TOKEN  # blocks are re-cut only when it retunes
    assert scorer._capacity(fast) == 100 * 16 * 12 // 64
    assert scorer._capacity(slow) == 100  # not calibrated: the prior, 4 characters a token


def test_blocks_are_recut_when_the_pool_calibrates_far_from_the_prior() -> None:
    pool = pool_of({"block_size": 16}, {"block_size": 16})
    a, b = pool.endpoints
    clock = FakeClock()
    scorer = PrefixCacheScorer(pool, clock)
    request = InferenceRequest(model="m", prompt=text(1, 12))  # 12 blocks of 64 characters
    scorer.score(request, [a, b])
    scorer.on_pick(request, a)
    assert scorer.index.held(a) == 12
    for ep in pool.endpoints:
        feed(ep.chars_per_token, scrapes=60, chars=1200, tokens=100)
    assert a.chars_per_token.calibrated
    clock.now += 1.0
    again = InferenceRequest(model="m", prompt=text(1, 12))
    assert scorer.score(again, [a, b]) is None  # the index was cut at 64: forgotten (no match)
    assert scorer.block_chars == 16 * 12
    scorer.on_pick(again, a)
    assert scorer.index.held(a) == 4  # 768 characters in 192-character blocks
