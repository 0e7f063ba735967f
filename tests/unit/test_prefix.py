"""The prefix index and the prefix-cache scorer, alone and inside the scheduler."""

from __future__ import annotations

import random
from typing import Any

import pytest

from picker.config import Config
from picker.datalayer.endpoint import Endpoint, EngineMetrics
from picker.datalayer.pool import EndpointPool
from picker.request import InferenceRequest
from picker.scheduling.prefix import PrefixIndex, block_hashes
from picker.scheduling.scheduler import Scheduler
from picker.scheduling.scorers import PrefixCacheScorer
from picker.telemetry import REGISTRY
from tests.unit.conftest import epp

NOW = 1000.0
BLOCK = 64  # default block: 16 tokens x 4 characters


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def text(seed: int, blocks: int) -> str:
    """`blocks` full blocks of text that no other seed produces."""
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(blocks * BLOCK))


def make_pool(n: int, **metrics: Any) -> EndpointPool:
    pool = EndpointPool()
    pool.set_addresses(f"10.0.0.{i}:8000" for i in range(n))
    for ep in pool.endpoints:
        ep.metrics = EngineMetrics(**metrics)
        ep.scraped_at = NOW
        ep.refresh_load()
    return pool


def prefix_scheduler(pool: EndpointPool, seed: int = 0, **parameters: Any) -> Scheduler:
    """Prefix affinity (weight 3) against the picker's own in-flight count (weight 1)."""
    doc = epp(
        {"type": "prefix-cache-scorer", "weight": 3, "parameters": parameters},
        {"type": "inflight-load-scorer", "weight": 1},
    )
    config = Config.from_document(doc)
    return Scheduler.from_config(config, pool, clock=FakeClock(), rng=random.Random(seed))


def route(sched: Scheduler, prompt: str, *, only: Endpoint | None = None, hold: bool = True) -> Endpoint:
    """Schedule a request (optionally forced onto `only`) and, like request control, hold the
    endpoint and teach the observers."""
    request = InferenceRequest(model="m", prompt=prompt, prompt_chars=len(prompt))
    candidates = [only] if only is not None else prefix_scorer(sched).pool.endpoints
    result = sched.schedule(request, candidates)
    assert result is not None
    chosen = result.endpoints[0]
    if hold:
        chosen.inflight_requests += 1
        chosen.refresh_load()
    for observer in sched.observers:
        observer.on_pick(request, chosen)
    return chosen


def prefix_scorer(sched: Scheduler) -> PrefixCacheScorer:
    return next(s for s in sched.scorers if isinstance(s, PrefixCacheScorer))


# --- hashing and the index -----------------------------------------------------------------------


def test_block_hashes_chain_full_blocks_seeded_by_model() -> None:
    prompt = text(1, 3)
    hashes = block_hashes(prompt, "m", BLOCK, 256)
    assert len(hashes) == 3
    assert len(block_hashes(prompt + "x" * (BLOCK - 1), "m", BLOCK, 256)) == 3  # only full blocks
    assert block_hashes(prompt + text(2, 2), "m", BLOCK, 256)[:3] == hashes  # a prefix keeps its hashes
    assert block_hashes(prompt, "m", BLOCK, 2) == hashes[:2]
    assert set(block_hashes(prompt, "other-model", BLOCK, 256)).isdisjoint(hashes)
    repeated = block_hashes("z" * BLOCK * 2, "m", BLOCK, 256)
    assert repeated[0] != repeated[1]  # equal blocks at different positions differ (chained)
    assert block_hashes("short", "m", BLOCK, 256) == []


def test_index_match_walks_to_the_longest_recorded_prefix() -> None:
    index = PrefixIndex()
    a, b, c = Endpoint("a"), Endpoint("b"), Endpoint("c")
    shared = text(1, 2)
    long_prompt = block_hashes(shared + text(2, 4), "m", BLOCK, 256)
    index.record(a, block_hashes(shared + text(3, 4), "m", BLOCK, 256), capacity=100)
    index.record(b, long_prompt[:5], capacity=100)
    index.record(c, long_prompt, capacity=100)
    assert index.match(long_prompt) == {a: 2, b: 5, c: 6}
    assert index.match(long_prompt[:4]) == {a: 2, b: 4, c: 4}
    assert index.match(block_hashes(text(9, 3), "m", BLOCK, 256)) == {}
    assert index.match([]) == {}


def test_index_capacity_evicts_least_recent_and_prefixes_shrink_from_the_tail() -> None:
    index = PrefixIndex()
    a = Endpoint("a")
    old, new = block_hashes(text(1, 4), "m", BLOCK, 256), block_hashes(text(2, 2), "m", BLOCK, 256)
    index.record(a, old, capacity=4)
    index.record(a, new, capacity=4)  # pushes out old's last two blocks
    assert index.held(a) == 4
    assert index.match(old) == {a: 2}
    assert index.match(new) == {a: 2}
    index.record(a, new, capacity=2)
    assert index.match(old) == {}
    assert len(index) == 2


def test_index_charges_a_prompts_unindexed_tail_against_the_capacity() -> None:
    index = PrefixIndex()
    a = Endpoint("a")
    first, second = block_hashes(text(1, 2), "m", BLOCK, 256), block_hashes(text(2, 2), "m", BLOCK, 256)
    index.record(a, first, capacity=8, tail=4)  # 2 indexed blocks stand for a 6-block prompt
    index.record(a, first, capacity=8, tail=3)  # the next turn: the larger tail stays charged
    index.record(a, second, capacity=8)  # 6 + 2 fit
    assert index.match(first) == {a: 2} and index.match(second) == {a: 2}
    index.record(a, second, capacity=8, tail=1)  # 6 + 3 do not: first's tail block goes, tail and all
    assert index.match(first) == {a: 1} and index.held(a) == 3
    index.record(a, block_hashes(text(3, 1), "m", BLOCK, 256), capacity=4)
    assert index.match(first) == {} and index.match(second) == {a: 2}


def test_index_drop_endpoint_forgets_only_that_endpoint() -> None:
    index = PrefixIndex()
    a, b = Endpoint("a"), Endpoint("b")
    hashes = block_hashes(text(1, 3), "m", BLOCK, 256)
    index.record(a, hashes, capacity=10)
    index.record(b, hashes[:1], capacity=10)
    index.drop_endpoint(a)
    assert index.match(hashes) == {b: 1}
    assert index.held(a) == 0 and len(index) == 1
    index.drop_endpoint(b)
    assert len(index) == 0
    c = Endpoint("c")  # reuses a freed slot: nothing of a's or b's carries over
    index.record(c, hashes[:2], capacity=10)
    assert index.match(hashes) == {c: 2}


def test_index_tracks_many_endpoints() -> None:
    index = PrefixIndex()
    eps = [Endpoint(f"e{i}") for i in range(300)]
    hashes = block_hashes(text(1, 300), "m", BLOCK, 300)
    for i, ep in enumerate(eps):
        index.record(ep, hashes[: i + 1], capacity=1000)
    assert index.match(hashes) == {ep: i + 1 for i, ep in enumerate(eps)}
    index.drop_endpoint(eps[150])
    assert eps[150] not in index.match(hashes) and index.match(hashes)[eps[299]] == 300


# --- the scorer inside the scheduler -------------------------------------------------------------


def test_same_prefix_sticks_and_different_prefixes_spread() -> None:
    pool = make_pool(3)
    sched = prefix_scheduler(pool)
    firsts = [route(sched, text(seed, 8)) for seed in range(3)]
    assert set(firsts) == set(pool.endpoints)  # equal load: distinct prefixes spread
    for seed, first in enumerate(firsts):
        for turn in range(3):
            assert route(sched, text(seed, 8) + text(100 + turn, 2)) is first


def test_longer_shared_prefix_beats_shorter() -> None:
    pool = make_pool(3)
    a, b, _ = pool.endpoints
    sched = prefix_scheduler(pool)
    system = text(1, 6)
    route(sched, system[: 2 * BLOCK] + text(2, 4), only=a, hold=False)
    route(sched, system[: 5 * BLOCK] + text(3, 4), only=b, hold=False)
    assert route(sched, system + text(4, 2)) is b


def test_prefix_score_is_matched_over_total_blocks_and_ratio_is_observed() -> None:
    pool = make_pool(2)
    a, b = pool.endpoints
    sched = prefix_scheduler(pool)
    route(sched, text(1, 3), only=a, hold=False)
    request = InferenceRequest(model="m", prompt=text(1, 3) + text(2, 1))
    assert prefix_scorer(sched).score(request, [a, b]) == [0.75, 0.0]
    count = REGISTRY.get_sample_value("picker_prefix_match_ratio_count") or 0.0
    total = REGISTRY.get_sample_value("picker_prefix_match_ratio_sum") or 0.0
    prefix_scorer(sched).on_pick(request, a)
    assert REGISTRY.get_sample_value("picker_prefix_match_ratio_count") == count + 1
    assert REGISTRY.get_sample_value("picker_prefix_match_ratio_sum") == pytest.approx(total + 0.75)


def test_capacity_eviction_loses_affinity_of_an_old_prefix() -> None:
    # 8 vLLM blocks of 16 tokens = room for two 4-block prompts.
    pool = make_pool(2, num_gpu_blocks=8, block_size=16)
    a, b = pool.endpoints
    sched = prefix_scheduler(pool)
    route(sched, text(1, 4), only=a, hold=False)
    assert prefix_scorer(sched).score(InferenceRequest(model="m", prompt=text(1, 4)), [a, b]) == [1.0, 0.0]
    route(sched, text(2, 4), only=a, hold=False)
    route(sched, text(3, 4), only=a, hold=False)
    assert prefix_scorer(sched).index.held(a) == 8
    assert prefix_scorer(sched).score(InferenceRequest(model="m", prompt=text(1, 4)), [a, b]) is None


def test_a_prompt_longer_than_the_index_fills_the_capacity_it_would_on_the_engine() -> None:
    # 8 vLLM blocks of 16 tokens; the index matches 2 blocks of a prompt, the engine stores 4.
    pool = make_pool(2, num_gpu_blocks=8, block_size=16)
    a, b = pool.endpoints
    sched = prefix_scheduler(pool, maxPrefixBlocksToMatch=2)
    route(sched, text(1, 4), only=a, hold=False)
    route(sched, text(2, 4), only=a, hold=False)
    assert prefix_scorer(sched).score(InferenceRequest(model="m", prompt=text(1, 4)), [a, b]) == [1.0, 0.0]
    route(sched, text(3, 4), only=a, hold=False)  # a third 4-block prompt: the first is gone
    assert prefix_scorer(sched).score(InferenceRequest(model="m", prompt=text(1, 4)), [a, b]) is None
    assert prefix_scorer(sched).index.held(a) == 4


def test_a_follow_up_past_the_index_counts_the_earlier_prompts_tail_as_cached() -> None:
    pool = make_pool(2, num_gpu_blocks=64, block_size=16)
    a, b = pool.endpoints
    scorer = PrefixCacheScorer(pool, FakeClock(), max_prefix_blocks_to_match=2)
    turn = text(1, 5)  # 2 blocks indexed, 3 past the index

    def pick(prompt: str, endpoint: Endpoint) -> InferenceRequest:
        request = InferenceRequest(model="m", prompt=prompt, prompt_chars=len(prompt))
        scorer.score(request, [a, b])
        scorer.on_pick(request, endpoint)
        return request

    assert pick(turn, a).cached_tokens == 0
    assert pick(turn + text(2, 2), a).cached_tokens == 5 * 16  # all of the first turn's 5 blocks
    assert pick(turn + text(3, 1), b).cached_tokens == 0  # b was given none of it
    assert pick(text(1, 2) + text(4, 3), a).cached_tokens == 5 * 16  # as far as the index can tell


def test_capacity_converts_engine_blocks_to_our_blocks() -> None:
    # Most engines use 64-token blocks, so ours are 64 tokens; one engine's 8 blocks of 16 tokens
    # hold two of them.
    pool = make_pool(3, num_gpu_blocks=8, block_size=64)
    small = pool.endpoints[0]
    small.metrics = EngineMetrics(num_gpu_blocks=8, block_size=16)
    sched = prefix_scheduler(pool)
    route(sched, "w" * 64 * 4 * 5, only=small, hold=False)
    assert prefix_scorer(sched).block_size_tokens == 64
    assert prefix_scorer(sched).index.held(small) == 2


def test_without_auto_tune_block_size_and_capacity_are_as_configured() -> None:
    pool = make_pool(1, num_gpu_blocks=8, block_size=16)
    sched = prefix_scheduler(pool, blockSizeTokens=64, lruCapacityPerServer=3, autoTune=False)
    route(sched, "w" * 64 * 4 * 5, hold=False)
    assert prefix_scorer(sched).block_size_tokens == 64
    assert prefix_scorer(sched).index.held(pool.endpoints[0]) == 3


def test_endpoint_leaving_the_pool_is_dropped_from_the_index() -> None:
    pool = make_pool(2)
    a, b = pool.endpoints
    sched = prefix_scheduler(pool)
    route(sched, text(1, 4), only=a, hold=False)
    assert prefix_scorer(sched).index.held(a) == 4
    pool.set_addresses([b.address])
    assert prefix_scorer(sched).index.held(a) == 0
    assert len(prefix_scorer(sched).index) == 0


def test_block_size_auto_tune_follows_most_endpoints_and_clears_the_index() -> None:
    pool = make_pool(3, block_size=16)
    clock = FakeClock()
    scorer = PrefixCacheScorer(pool, clock)
    a = pool.endpoints[0]
    request = InferenceRequest(model="m", prompt=text(1, 4))
    scorer.score(request, [a])
    scorer.on_pick(request, a)
    assert scorer.block_size_tokens == 16 and scorer.index.held(a) == 4
    for ep in pool.endpoints[:2]:
        ep.metrics = EngineMetrics(block_size=32)
    scorer.score(InferenceRequest(model="m", prompt=text(1, 4)), [a])
    assert scorer.block_size_tokens == 16  # looks again only after the retune interval
    clock.now += 1.0
    again = InferenceRequest(model="m", prompt=text(1, 4))
    assert scorer.score(again, [a]) is None  # nothing matches: no preference
    assert scorer.block_size_tokens == 32 and len(scorer.index) == 0
    scorer.on_pick(again, a)
    assert scorer.index.held(a) == 2  # 256 characters in 128-character blocks


def test_load_guard_spreads_a_hot_prefix_off_an_overloaded_endpoint() -> None:
    pool = make_pool(2)
    a, b = pool.endpoints
    sched = prefix_scheduler(pool)
    hot = text(1, 8)
    route(sched, hot, only=a, hold=False)
    a.inflight_requests = 8  # within the gap of 8: affinity still wins over load
    a.refresh_load()
    assert route(sched, hot + "q1" * 40, hold=False) is a
    a.inflight_requests, b.inflight_requests = 55, 40  # gap 15 <= 8 + 0.25 x 40
    a.refresh_load(), b.refresh_load()
    assert route(sched, hot + "q2" * 40, hold=False) is a
    a.inflight_requests, b.inflight_requests = 9, 0
    a.refresh_load(), b.refresh_load()
    assert route(sched, hot + "q3" * 40, hold=False) is b


def test_load_guard_counts_waiting_requests_and_can_be_disabled() -> None:
    pool = make_pool(2)
    a, b = pool.endpoints
    hot = text(1, 8)
    for gap, expected in ((8.0, b), (float("inf"), a)):
        sched = prefix_scheduler(pool, maxLoadGap=gap)
        route(sched, hot, only=a, hold=False)
        a.metrics = EngineMetrics(waiting=30)
        a.refresh_load()
        assert route(sched, hot + "q" * 64, hold=False) is expected
        a.metrics = EngineMetrics()
        a.refresh_load()


def test_the_prompt_tokens_the_chosen_endpoint_holds_are_told_for_its_prefill_queue() -> None:
    pool = make_pool(2)
    a, b = pool.endpoints
    sched = prefix_scheduler(pool)
    hot = text(1, 8)  # 8 blocks of 16 tokens
    route(sched, hot, only=a, hold=False)
    for endpoint, held in ((a, 8 * 16), (b, 0)):
        request = InferenceRequest(model="m", prompt=hot + "q" * 64)
        assert sched.schedule(request, pool.endpoints) is not None
        for observer in sched.observers:
            observer.on_pick(request, endpoint)
        assert request.cached_tokens == held


def test_sparse_prefix_scores_equal_the_dense_ones() -> None:
    # The pool's snapshot (a tuple) gets scores filled in by position, a filtered list the dense
    # walk; with the load guard active both must agree, and say None when nothing matches.
    pool = make_pool(40)
    sched = prefix_scheduler(pool)
    systems = [text(100 + g, 6) for g in range(5)]
    rng = random.Random(2)
    for i in range(300):
        route(sched, rng.choice(systems) + text(1000 + i, rng.randint(0, 3)))
        if i % 7 == 0:
            done = rng.choice(pool.endpoints)
            done.inflight_requests = max(0, done.inflight_requests - 3)
            done.refresh_load()
    scorer = prefix_scorer(sched)
    filled = guarded = 0
    for g, system in enumerate(systems):
        request = InferenceRequest(model="m", prompt=system + text(5000 + g, 2))
        sparse = scorer.score(request, pool.endpoints)
        dense = scorer.score(request, list(pool.endpoints))
        assert sparse == dense
        nonzero = 0 if sparse is None else sum(1 for s in sparse if s)
        filled += nonzero
        guarded += len(scorer._cycle(request).matched) - nonzero  # matching, but too busy
    assert filled > 0 and guarded > 0
    unknown = InferenceRequest(model="m", prompt=text(9999, 4))
    assert scorer.score(unknown, pool.endpoints) is None
    assert scorer.score(unknown, list(pool.endpoints)) is None
