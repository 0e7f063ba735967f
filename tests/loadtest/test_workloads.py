"""Workloads: lengths, prefix sharing, sizing to the KV cache, and how clients split the stream."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from loadtest.workloads import (
    CachePressure,
    MultiTurn,
    SharedPrefix,
    Uniform,
    assigned_sessions,
    assigned_warmup,
    from_dict,
    to_dict,
    with_params,
)
from tests.support.tokens import TOKENIZER, count_tokens


def tokens(text: str) -> int:
    return count_tokens(text, special=False)


def take(workload, n: int, seed: int = 0):
    return list(itertools.islice(workload.sessions(random.Random(seed)), n))


def test_uniform_lengths_fall_in_the_range_and_prompts_share_no_block() -> None:
    sessions = take(Uniform(input_tokens=100, output_tokens=50, range_ratio=0.8), 300)
    inputs = [tokens(s.prompts[0]) for s in sessions]
    outputs = [s.max_tokens[0] for s in sessions]
    assert min(inputs) >= 80 and max(inputs) <= 100 and len(set(inputs)) > 10
    assert min(outputs) >= 40 and max(outputs) <= 50
    assert all(not s.chat and s.system is None for s in sessions)
    first_blocks = {tuple(TOKENIZER.encode(s.prompts[0]).ids[:16]) for s in sessions}
    assert len(first_blocks) == len(sessions)


def test_shared_prefix_reuses_exactly_its_groups_system_prompts() -> None:
    workload = SharedPrefix(groups=5, prefix_tokens=64, question_tokens=8, output_tokens=4)
    sessions = take(workload, 200)
    assert len({s.system for s in sessions}) == 5
    assert {tokens(s.system or "") for s in sessions} == {64}
    assert len({s.prompts[0] for s in sessions}) == 200  # every question is new


def test_shared_prefix_is_sized_to_exceed_one_replica_and_fit_the_pool() -> None:
    kv_tokens, replicas = 32_768, 4
    workload = SharedPrefix(prefix_tokens=4000).sized_for(kv_tokens, replicas)
    total = workload.groups * workload.prefix_tokens
    assert kv_tokens < total <= replicas * kv_tokens
    assert total >= 0.75 * replicas * kv_tokens
    assert workload.min_requests == 10 * workload.groups  # every prefix comes back ~10 times


def test_multi_turn_sessions_have_all_their_turns() -> None:
    session = take(MultiTurn(turns=3, first_tokens=40, turn_tokens=8, output_tokens=5), 1)[0]
    assert [tokens(p) for p in session.prompts] == [40, 8, 8]
    assert session.max_tokens == (5, 5, 5) and session.chat


def test_same_seed_same_stream_and_round_trip_through_a_dict() -> None:
    workload = SharedPrefix(groups=3, prefix_tokens=32, question_tokens=4)
    assert from_dict(to_dict(workload)) == workload
    assert take(workload, 20, seed=7) == take(from_dict(to_dict(workload)), 20, seed=7)
    assert take(workload, 20, seed=7) != take(workload, 20, seed=8)


def test_with_params_converts_types_and_rejects_unknown_names() -> None:
    changed = with_params(Uniform(), {"output_tokens": "16", "range_ratio": "1"})
    assert changed == Uniform(output_tokens=16, range_ratio=1.0)
    with pytest.raises(ValueError, match="no parameter groups"):
        with_params(Uniform(), {"groups": "3"})


def test_clients_split_the_stream_by_share_and_stop_at_the_request_count() -> None:
    workload = MultiTurn(turns=3, first_tokens=8, turn_tokens=4, output_tokens=2)
    shares = [3, 1]
    parts = [list(assigned_sessions(workload, 1, shares, i, max_requests=100)) for i in range(2)]
    assert sum(len(s) for part in parts for s in part) == 100  # the last session is cut short
    assert len(parts[0]) == pytest.approx(3 * len(parts[1]), abs=3)
    first_prompts = [s.prompts[0] for part in parts for s in part]
    assert len(set(first_prompts)) == len(first_prompts)  # nobody sends a session twice


def test_shared_prefix_warm_up_is_every_groups_prefix_once_split_over_clients() -> None:
    workload = SharedPrefix(groups=7, prefix_tokens=32, question_tokens=4)
    prefixes = {s.system for s in take(workload, 200, seed=2)}
    parts = [assigned_warmup(workload, 2, [2, 1], i) for i in range(2)]
    assert [len(part) for part in parts] == [5, 2]
    assert {s.system for part in parts for s in part} == prefixes
    assert all(s.max_tokens == (1,) for part in parts for s in part)
    assert Uniform().warmup(random.Random(0)) == MultiTurn().warmup(random.Random(0)) == []


def test_text_is_words_whose_characters_per_token_vary_by_workload() -> None:
    """Not hex at the picker's assumed 4 characters per token: prose of common words packs more
    characters into a token than uniform's rare words, and neither is 4."""
    prose = "".join(s.system or "" for s in take(SharedPrefix(groups=3, prefix_tokens=2000), 3))
    rare = "".join(s.prompts[0] for s in take(Uniform(input_tokens=2000, range_ratio=1.0), 3))
    ratios = [len(text) / tokens(text) for text in (prose, rare)]
    assert ratios[0] > 4.2 and ratios[1] < 3.7, ratios
    assert all(word.strip(".").isalpha() for word in prose.split())


def test_cache_pressure_prefixes_are_sized_to_a_multiple_of_the_pool_cache() -> None:
    workload = CachePressure(prefix_tokens=2000).sized_for(kv_tokens=16384, replicas=4)
    assert (workload.hot_groups, workload.warm_groups, workload.cold_groups) == (2, 20, 60)  # 8:72:220
    assert 2.2 <= workload.groups * workload.prefix_tokens / (4 * 16384) <= 2.8  # prequal's 2.2-2.8x
    tiny = CachePressure(prefix_tokens=2000).sized_for(kv_tokens=2048, replicas=1)
    assert min(tiny.hot_groups, tiny.warm_groups, tiny.cold_groups) >= 1


def test_cache_pressure_draws_tiers_by_their_share_and_warms_the_popular_ones() -> None:
    workload = CachePressure(2, 6, 12, prefix_tokens=8, question_tokens=4)
    prefixes = workload._prefixes(random.Random(7))
    tier = {system: 0 if i < 2 else 1 if i < 8 else 2 for i, system in enumerate(prefixes)}
    drawn = Counter(tier[s.system] for s in itertools.islice(workload.sessions(random.Random(7)), 4000))
    assert [round(drawn[t] / 4000, 1) for t in range(3)] == [0.3, 0.4, 0.3]
    assert [s.system for s in workload.warmup(random.Random(7))] == prefixes[:8]  # hot and warm, once each
