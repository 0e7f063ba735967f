"""Prefix placement: the same prefix lands on the same endpoint in every picker, load bounded."""

from __future__ import annotations

import random
from collections import Counter

from picker.config import Config
from picker.datalayer.pool import EndpointPool
from picker.request import InferenceRequest
from picker.scheduling.placement import PrefixPlacementScorer, placement_key, rendezvous_order
from picker.scheduling.scheduler import Scheduler
from tests.unit.conftest import NOW, epp, pool_of
from tests.unit.test_prefix import FakeClock, text

ADDRESSES = [f"10.0.0.{i}:8000" for i in range(4)]


def target(scorer: PrefixPlacementScorer, pool: EndpointPool, prompt: str) -> str:
    scores = scorer.score(InferenceRequest(model="m", prompt=prompt), pool.endpoints)
    assert sorted(scores) == [0.0] * (len(scores) - 1) + [1.0]
    return pool.endpoints[scores.index(1.0)].address


def test_the_key_is_the_leading_characters_and_the_model() -> None:
    shared = "s" * 1024
    assert placement_key(shared + "question one", "m", 1024) == placement_key(shared + "another", "m", 1024)
    assert placement_key(shared, "m", 1024) != placement_key(shared, "other-model", 1024)
    assert placement_key("short a", "m", 1024) != placement_key("short b", "m", 1024)


def test_order_does_not_depend_on_how_the_pool_is_listed() -> None:
    key = placement_key(text(1, 20), "m", 1024)
    order = [ADDRESSES[i] for i in rendezvous_order(key, ADDRESSES)]
    shuffled = ADDRESSES[::-1]
    assert [shuffled[i] for i in rendezvous_order(key, shuffled)] == order


def test_two_pickers_place_every_prefix_alike_and_spread_the_prefixes() -> None:
    one, two = pool_of(*[{}] * 4), pool_of(*[{}] * 4)
    first, second = PrefixPlacementScorer(), PrefixPlacementScorer()
    placed = Counter()
    for seed in range(400):
        prompt = text(seed, 20)
        address = target(first, one, prompt)
        assert target(second, two, prompt) == address
        placed[address] += 1
    assert set(placed) == set(ADDRESSES) and min(placed.values()) > 400 / 4 * 0.6


def test_a_busy_first_choice_overflows_to_the_same_second_choice_everywhere() -> None:
    prompt = text(7, 20)
    pool = pool_of(*[{}] * 4)
    scorer = PrefixPlacementScorer(load_factor=1.25, load_slack=2.0)
    home = target(scorer, pool, prompt)
    key = placement_key(prompt, "m", scorer.prefix_chars)
    second = ADDRESSES[rendezvous_order(key, ADDRESSES)[1]]
    busy = pool.get(home)
    assert busy is not None and busy.metrics is not None
    busy.metrics.running = 3.0  # mean 0.75: bound 2.94
    busy.refresh_load()
    assert target(scorer, pool, prompt) == second
    busy.metrics.running = 2.0  # within the slack: still home
    busy.refresh_load()
    assert target(scorer, pool, prompt) == home


def test_an_endpoint_leaving_moves_only_the_prefixes_placed_on_it() -> None:
    pool = pool_of(*[{}] * 4)
    scorer = PrefixPlacementScorer()
    before = {seed: target(scorer, pool, text(seed, 20)) for seed in range(200)}
    gone = ADDRESSES[2]
    pool.set_addresses(a for a in ADDRESSES if a != gone)
    for ep in pool.endpoints:
        ep.scraped_at = NOW
    after = {seed: target(scorer, pool, text(seed, 20)) for seed in range(200)}
    assert all(after[s] == before[s] for s in before if before[s] != gone)


def test_schedulers_of_two_pickers_agree_on_new_prefixes() -> None:
    """Each picker learns only its own picks; with placement, the groups still land alike."""
    doc = epp(
        {"type": "prefix-cache-scorer", "weight": 3},
        {"type": "prefix-placement-scorer", "weight": 2},
        {"type": "inflight-load-scorer", "weight": 1},
    )
    config = Config.from_document(doc)
    pools = pool_of(*[{}] * 4), pool_of(*[{}] * 4)
    pickers = [
        Scheduler.from_config(config, p, clock=FakeClock(), rng=random.Random(i)) for i, p in enumerate(pools)
    ]
    groups = [text(seed, 30) for seed in range(8)]
    homes: dict[int, set[str]] = {g: set() for g in range(len(groups))}
    for turn in range(32):
        group = turn % len(groups)
        picker, pool = pickers[turn % 2], pools[turn % 2]
        request = InferenceRequest(model="m", prompt=groups[group] + f" question {turn}")
        result = picker.schedule(request, pool.endpoints)
        assert result is not None
        for observer in picker.observers:
            observer.on_pick(request, result.endpoints[0])
        homes[group].add(result.endpoints[0].address)
    assert all(len(where) == 1 for where in homes.values())
