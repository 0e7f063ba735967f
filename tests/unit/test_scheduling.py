"""Filters, scorers, the max-score picker and the scheduler built from config."""

from __future__ import annotations

import random
from typing import Any

import pytest

from picker.config import Config, MetricsConfig
from picker.datalayer.endpoint import Endpoint, EngineMetrics, Freshness, fresh_among
from picker.datalayer.pool import EndpointPool
from picker.request import InferenceRequest
from picker.scheduling.filters import HealthyFilter
from picker.scheduling.pickers import MaxScorePicker
from picker.scheduling.scheduler import Scheduler, weighted_sum
from picker.scheduling.scorers import (
    InflightLoadScorer,
    KVCacheUtilizationScorer,
    LatencyScorer,
    LoraAffinityScorer,
    QueueScorer,
    SessionAffinityScorer,
    least_is_best,
)
from picker.telemetry import REGISTRY
from tests.unit.conftest import NOW, epp, pool_of


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def endpoint(address: str, waiting: float | None = 0.0, kv: float = 0.0, inflight: int = 0) -> Endpoint:
    """A fresh endpoint (scraped at NOW); waiting=None means no metrics yet."""
    metrics = None if waiting is None else EngineMetrics(waiting=waiting, kv_usage=kv)
    return Endpoint(address, metrics=metrics, scraped_at=NOW, inflight_requests=inflight)


def scheduler(pool: EndpointPool, doc: dict[str, Any] | None = None, seed: int = 0) -> Scheduler:
    config = Config() if doc is None else Config.from_document(doc)
    return Scheduler.from_config(config, pool, clock=FakeClock(), rng=random.Random(seed))


def scores(
    scorer: Any, *candidates: Endpoint, request: InferenceRequest | None = None
) -> list[float] | None:
    """The scorer's column for `candidates` as a list, or None (no preference)."""
    got = scorer.score(request or InferenceRequest(), list(candidates))
    return None if got is None else list(got)


# --- filters -------------------------------------------------------------------------------------


def test_healthy_filter_keeps_only_fresh_endpoints() -> None:
    clock = FakeClock(NOW + 2.0)
    fresh, unknown, failing, stale = (
        endpoint("fresh:1"),
        endpoint("unknown:1", waiting=None),
        endpoint("failing:1"),
        endpoint("stale:1"),
    )
    failing.consecutive_failures = 1
    stale.scraped_at = NOW - 0.5
    flt = HealthyFilter(MetricsConfig(stale_after=2.0), clock)
    assert flt.filter(InferenceRequest(), [fresh, unknown, failing, stale]) == [fresh]


def test_with_nothing_fresh_known_endpoints_that_did_not_refuse_are_kept() -> None:
    clock = FakeClock(NOW + 2.0)
    timing_out, refused, unknown = endpoint("slow:1"), endpoint("dead:1"), endpoint("new:1", None)
    for failed, kind in ((timing_out, "timeout"), (refused, "connect")):
        failed.consecutive_failures, failed.last_failure = 3, kind
    flt = HealthyFilter(MetricsConfig(stale_after=2.0), clock)
    assert flt.filter(InferenceRequest(), [timing_out, refused, unknown]) == [timing_out]
    assert flt.filter(InferenceRequest(), [refused, unknown]) == []


# --- scorers -------------------------------------------------------------------------------------


def test_queue_scorer_reference_formula() -> None:
    assert scores(QueueScorer(), endpoint("a", 0), endpoint("b", 5), endpoint("c", 10)) == [1.0, 0.5, 0.0]
    assert scores(QueueScorer(), endpoint("a", 3), endpoint("b", 3)) is None  # no preference
    assert scores(QueueScorer(), endpoint("a", 7)) is None


def test_small_load_differences_cost_little_below_the_minimum_span() -> None:
    assert scores(QueueScorer(), endpoint("a", 0), endpoint("b", 1)) == [1.0, 0.75]
    assert scores(QueueScorer(min_span=0), endpoint("a", 0), endpoint("b", 1)) == [1.0, 0.0]
    a, b = endpoint("a", inflight=3), endpoint("b", inflight=5)
    assert scores(InflightLoadScorer(), a, b) == [1.0, 0.5]
    a.inflight_tokens, b.inflight_tokens = 0, 1024
    a.refresh_load(), b.refresh_load()
    assert scores(InflightLoadScorer(measure="tokens"), a, b) == [1.0, 0.75]


def decoded(ep: Endpoint, *scrapes: tuple[float, float]) -> Endpoint:
    """Feed `ep` scrapes carrying cumulative (itl_sum, itl_count) histogram totals."""
    for itl_sum, itl_count in scrapes:
        ep.observe_metrics(EngineMetrics(itl_sum=itl_sum, itl_count=itl_count), NOW)
    return ep


def test_endpoint_learns_recent_token_latency_from_histogram_deltas() -> None:
    ep = decoded(endpoint("a"), (10.0, 1000), (10.1, 1010))  # 10 tokens at 10 ms each
    assert ep.token_seconds == pytest.approx(0.010)
    decoded(ep, (10.1, 1010))  # idle: nothing decoded, the estimate stays
    assert ep.token_seconds == pytest.approx(0.010)
    decoded(ep, (10.5, 1020))  # 40 ms tokens now: the average moves towards them
    assert 0.010 < ep.token_seconds < 0.040
    decoded(ep, (0.0, 0))  # engine restarted, counters reset: no bogus sample
    assert 0.010 < ep.token_seconds < 0.040


def test_latency_scorer_ignores_small_gaps_and_zeroes_slow_replicas() -> None:
    fast = decoded(endpoint("fast"), (0, 0), (0.6, 100))  # 6 ms per token
    busier = decoded(endpoint("busier"), (0, 0), (0.8, 100))  # 8 ms: batch-size noise
    slow = decoded(endpoint("slow"), (0, 0), (1.8, 100))  # 18 ms: a slower GPU
    fresh = endpoint("fresh")  # not measured yet: counts as the pool's average
    got = scores(LatencyScorer(), fast, busier, slow, fresh)
    assert got[:3] == [1.0, 1.0, 0.0]
    assert 0.0 < got[3] < 1.0
    assert scores(LatencyScorer(), endpoint("x"), endpoint("y")) is None  # nothing measured
    with pytest.raises(ValueError):
        LatencyScorer(tolerance=1.0, zero_at=1.5)


def test_queue_scorer_unknown_metrics_score_zero_and_do_not_set_the_scale() -> None:
    got = scores(QueueScorer(), endpoint("a", None), endpoint("b", 2), endpoint("c", 6))
    assert got == [0.0, 1.0, 0.0]
    assert scores(QueueScorer(), endpoint("a", None), endpoint("b", 2)) == [0.0, 1.0]
    assert scores(QueueScorer(), endpoint("a", None), endpoint("b", 4), endpoint("c", 4)) == [0.0, 1.0, 1.0]
    assert scores(QueueScorer(), endpoint("a", None)) is None


def test_kv_cache_scorer_is_free_fraction() -> None:
    got = scores(
        KVCacheUtilizationScorer(),
        endpoint("a", kv=0.25),
        endpoint("b", kv=1.0),
        endpoint("c", kv=1.2),  # a bogus report still yields a score in [0, 1]
        endpoint("d", waiting=None),
    )
    assert got == [0.75, 0.0, 0.0, 0.0]


def test_inflight_scorer_by_requests_tokens_or_prefill() -> None:
    a, b, c = endpoint("a", inflight=0), endpoint("b", inflight=2), endpoint("c", inflight=4)
    a.inflight_tokens, b.inflight_tokens, c.inflight_tokens = 9000, 1000, 5000
    a.prefill.tokens, b.prefill.tokens, c.prefill.tokens = 0, 8000, 4000
    for ep in (a, b, c):
        ep.refresh_load()
    assert scores(InflightLoadScorer(), a, b, c) == [1.0, 0.5, 0.0]
    assert scores(InflightLoadScorer(measure="tokens"), a, b, c) == [0.0, 1.0, 0.5]
    assert scores(InflightLoadScorer(measure="prefill"), a, b, c) == [1.0, 0.0, 0.5]
    assert scores(InflightLoadScorer(), a) is None
    with pytest.raises(ValueError, match="measure"):
        InflightLoadScorer(measure="bytes")


def test_session_affinity_prefers_last_endpoint_of_the_session() -> None:
    a, b = endpoint("a:1"), endpoint("b:1")
    scorer = SessionAffinityScorer(max_sessions=1)
    alice = InferenceRequest(session_key="alice")
    assert scores(scorer, a, b, request=alice) is None  # no preference: a session not seen
    scorer.on_pick(alice, b)
    assert scores(scorer, a, b, request=alice) == [0.0, 1.0]
    assert scores(scorer, b, a, request=alice) == [1.0, 0.0]
    assert scores(scorer, a, request=alice) is None  # its endpoint is not a candidate
    assert scores(scorer, a, b, request=InferenceRequest()) is None
    scorer.on_pick(InferenceRequest(session_key="bob"), a)  # evicts alice (bound of 1)
    assert scores(scorer, a, b, request=alice) is None
    assert scores(scorer, a, b, request=InferenceRequest(session_key="bob")) == [1.0, 0.0]


def lora_endpoint(address: str, running: set[str], waiting: set[str], max_lora: int | None) -> Endpoint:
    metrics = EngineMetrics(
        max_lora=max_lora,
        running_loras=frozenset(running),
        waiting_loras=frozenset(waiting),
        loaded_loras=len(running | waiting),
    )
    return Endpoint(address, metrics=metrics, scraped_at=NOW)


def test_lora_affinity_reference_scoring() -> None:
    running = lora_endpoint("running", {"a"}, set(), 2)  # a loaded: 1.0
    free = lora_endpoint("free", {"b"}, set(), 2)  # a slot free: 0.8
    queued = lora_endpoint("queued", {"b"}, {"a"}, 2)  # a only waiting, slots full: 0.6
    full = lora_endpoint("full", {"b", "c"}, set(), 2)  # a neither, no slot: 0
    # Running and waiting share adapters in vLLM: each counts once, so a slot is still free.
    shared = lora_endpoint("shared", {"b"}, {"b"}, 2)
    no_lora = Endpoint("plain", metrics=EngineMetrics(), scraped_at=NOW)  # no LoRA reported
    unknown = endpoint("new", waiting=None)
    request = InferenceRequest(model="a")
    got = scores(LoraAffinityScorer(), running, free, queued, full, shared, no_lora, unknown, request=request)
    assert got == [1.0, 0.8, 0.6, 0.0, 0.8, 0.0, 0.0]


def test_lora_affinity_treats_a_served_base_model_as_loaded() -> None:
    base = lora_endpoint("base", {"b", "c"}, set(), 2)  # slots full, but the base model is resident
    base.models = {"llama": None, "b": "llama", "c": "llama"}
    other = lora_endpoint("other", set(), set(), 2)
    other.models = {"llama": None}
    # equal everywhere: no preference, so adapter slots do not steer base-model requests
    assert scores(LoraAffinityScorer(), base, other, request=InferenceRequest(model="llama")) is None
    assert scores(LoraAffinityScorer(), base, other, request=InferenceRequest(model="")) is None
    no_lora = [lora_endpoint(f"plain{i}", set(), set(), None) for i in range(3)]
    assert scores(LoraAffinityScorer(), *no_lora, request=InferenceRequest(model="a")) is None


def test_lora_affinity_steers_adapter_requests_in_the_scheduler() -> None:
    pool = pool_of({}, {}, {})
    for ep, running in zip(pool.endpoints, ({"x"}, {"a"}, set()), strict=True):
        ep.metrics = EngineMetrics(max_lora=1, running_loras=frozenset(running), loaded_loras=len(running))
    sched = scheduler(pool, epp({"type": "lora-affinity-scorer", "weight": 1}))
    for model, where in (("a", 1), ("x", 0), ("new", 2)):
        result = sched.schedule(InferenceRequest(model=model), pool.endpoints)
        assert result is not None and result.endpoints[0] is pool.endpoints[where]
        assert result.reason == "lora-affinity-scorer"


# --- picker --------------------------------------------------------------------------------------


def test_picker_clear_winner_always_wins_and_fallbacks_descend() -> None:
    eps = [endpoint(name) for name in "abcde"]
    values = [0.3, 2.5, 0.1, 1.9, 2.0]
    for seed in range(20):
        picked = MaxScorePicker(random.Random(seed), max_num_of_endpoints=4).pick(eps, values)
        assert [ep.address for ep in picked] == ["b", "e", "d", "a"]
    assert MaxScorePicker(random.Random(0), max_num_of_endpoints=1).pick(eps, values) == [eps[1]]
    assert len(MaxScorePicker(random.Random(0), max_num_of_endpoints=10).pick(eps, values)) == 5


def test_picker_breaks_ties_at_random() -> None:
    eps = [endpoint("a"), endpoint("b"), endpoint("c")]
    winners = {
        MaxScorePicker(random.Random(seed), max_num_of_endpoints=1)
        .pick(eps, [1.0, 1.0 + 1e-12, 0.5])[0]
        .address
        for seed in range(40)
    }
    assert winners == {"a", "b"}


# --- scheduler -----------------------------------------------------------------------------------


def test_weights_from_yaml_decide_and_name_the_reason() -> None:
    # a: short queue, full cache; b: long queue, empty cache.
    loads = ({"waiting": 0, "kv_usage": 0.9}, {"waiting": 10, "kv_usage": 0.0})

    def decide(queue_weight: float, kv_weight: float) -> tuple[str, str]:
        doc = epp(
            {"type": "queue-scorer", "weight": queue_weight},
            {"type": "kv-cache-utilization-scorer", "weight": kv_weight},
            picker={"maxNumOfEndpoints": 2},
        )
        pool = pool_of(*loads)
        result = scheduler(pool, doc).schedule(InferenceRequest(), pool.endpoints)
        assert result is not None and len(result.endpoints) == 2
        return result.endpoints[0].address, result.reason

    assert decide(1, 3) == ("10.0.0.1:8000", "kv-cache-utilization-scorer")
    assert decide(5, 1) == ("10.0.0.0:8000", "queue-scorer")


def test_scheduler_special_reasons_and_no_candidate() -> None:
    pool = pool_of({}, {})
    sched = scheduler(pool)
    assert sched.schedule(InferenceRequest(), []) is None
    only = sched.schedule(InferenceRequest(), pool.endpoints[1:])
    assert only is not None
    assert [ep.address for ep in only.endpoints] == ["10.0.0.1:8000"]
    assert only.reason == "only-candidate"
    tie = sched.schedule(InferenceRequest(), pool.endpoints)
    assert tie is not None and tie.reason == "tie"


def test_scheduler_ties_spread_across_seeds_and_count_decisions() -> None:
    pool = pool_of({"waiting": 1}, {"waiting": 1})
    winners = set()
    for seed in range(30):
        before = REGISTRY.get_sample_value(
            "picker_decisions_total", {"endpoint": "10.0.0.0:8000", "reason": "tie"}
        )
        sched = scheduler(pool, epp("queue-scorer"), seed)
        result = sched.schedule(InferenceRequest(), pool.endpoints)
        assert result is not None and result.reason == "tie"
        winners.add(result.endpoints[0].address)
        after = REGISTRY.get_sample_value(
            "picker_decisions_total", {"endpoint": "10.0.0.0:8000", "reason": "tie"}
        )
        assert (after or 0) - (before or 0) == (result.endpoints[0].address == "10.0.0.0:8000")
    assert winners == {"10.0.0.0:8000", "10.0.0.1:8000"}


def test_scheduler_skips_unhealthy_endpoints() -> None:
    pool = pool_of({"waiting": 0}, {"waiting": 0}, {"waiting": 0})
    pool.endpoints[0].consecutive_failures = 2
    sched = scheduler(pool, epp("inflight-load-scorer"))
    for _ in range(10):
        result = sched.schedule(InferenceRequest(), pool.endpoints)
        assert result is not None and pool.endpoints[0] not in result.endpoints


def test_default_config_builds_every_default_plugin() -> None:
    sched = Scheduler.from_config(Config(), pool_of({}))
    assert sched.names == [
        "queue-scorer",
        "kv-cache-utilization-scorer",
        "inflight-load-scorer",
        "prefill-queue",
        "latency-scorer",
        "prefix-cache-scorer",
        "lora-affinity-scorer",
    ]
    assert sched.weights == [2.0, 2.0, 1.0, 2.0, 2.0, 6.0, 1.0]
    assert [f.name for f in sched.filters] == ["healthy", "served-model"]


def test_two_instances_of_one_scorer_are_named_apart_in_reasons() -> None:
    # requests in flight favour a, prompt tokens in flight favour b: the heavier instance decides
    pool = pool_of({}, {})
    a, b = pool.endpoints
    a.inflight_requests, a.inflight_tokens = 0, 50_000
    b.inflight_requests, b.inflight_tokens = 6, 0
    a.refresh_load(), b.refresh_load()

    def decide(by_requests: float, by_tokens: float) -> tuple[str, str]:
        doc = epp(
            {"type": "inflight-load-scorer", "name": "by-requests", "weight": by_requests},
            {
                "type": "inflight-load-scorer",
                "name": "by-tokens",
                "weight": by_tokens,
                "parameters": {"measure": "tokens"},
            },
        )
        result = scheduler(pool, doc).schedule(InferenceRequest(), pool.endpoints)
        assert result is not None
        return result.endpoints[0].address, result.reason

    assert decide(3, 1) == (a.address, "by-requests")
    assert decide(1, 3) == (b.address, "by-tokens")


# --- the weighted sum, and scorers without a preference -------------------------------------------


def test_weighted_sum_equals_the_running_sum_bit_for_bit() -> None:
    rng = random.Random(7)
    for k in range(1, 7):
        weights = [rng.choice((1.0, 2.0, 0.5, 3.7, -1.25, 0.0)) for _ in range(k)]
        columns = [[rng.random() for _ in range(50)] for _ in range(k)]
        running = [0.0] * 50
        for w, column in zip(weights, columns, strict=True):
            running = [t + w * s for t, s in zip(running, column, strict=True)]
        assert weighted_sum(weights)(*columns) == running
    with pytest.raises(ValueError):  # a column of the wrong length is a scorer bug, not a silent cut
        weighted_sum([1.0, 2.0])([0.5, 0.5], [0.5])


class _Uniform:
    """A scorer as it was before None existed: no preference -> the same score for everyone."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name, self.category = inner, inner.name, inner.category

    def score(self, request: InferenceRequest, candidates: Any) -> list[float]:
        got = self.inner.score(request, candidates)
        return [0.625] * len(candidates) if got is None else got


def test_leaving_out_scorers_without_preference_changes_no_pick_or_reason() -> None:
    doc = epp(
        {"type": "queue-scorer", "weight": 2},
        {"type": "inflight-load-scorer", "weight": 1},
        {"type": "latency-scorer", "weight": 1},
        {"type": "lora-affinity-scorer", "weight": 3},
        {"type": "session-affinity-scorer", "weight": 2},
        picker={"maxNumOfEndpoints": 3},
    )
    rng = random.Random(3)
    left_out = 0
    for trial in range(200):
        pool = pool_of(*({"waiting": float(rng.choice((0, 0, 1, 3)))} for _ in range(rng.randint(1, 9))))
        for ep in pool.endpoints:
            ep.inflight_requests = rng.choice((0, 0, 2))
            ep.refresh_load()
        plain, uniform = scheduler(pool, doc, seed=trial), scheduler(pool, doc, seed=trial)
        uniform.scorers = [_Uniform(s) for s in uniform.scorers]
        request = InferenceRequest(model="m")
        got, want = plain.schedule(request, pool.endpoints), uniform.schedule(request, pool.endpoints)
        assert got is not None and want is not None
        assert (got.endpoints, got.reason) == (want.endpoints, want.reason)
        left_out += plain.recent[-1].scores.count(None)
    assert left_out >= 200 * 3  # latency, LoRA and session never had one; queue and in-flight at times


def test_a_scorer_without_preference_is_shown_as_none_and_never_the_reason() -> None:
    pool = pool_of({"waiting": 0.0}, {"waiting": 4.0})
    doc = epp({"type": "latency-scorer", "weight": 5}, {"type": "queue-scorer", "weight": 1})
    sched = scheduler(pool, doc)
    result = sched.schedule(InferenceRequest(), pool.endpoints)
    assert result is not None and result.endpoints[0] is pool.endpoints[0]
    assert result.reason == "queue-scorer"
    assert [scores for _, _, scores in sched.recent[-1].rows()] == [[None, 1.0], [None, 0.0]]
    assert [total for _, total, _ in sched.recent[-1].rows()] == [1.0, 0.0]


def test_fresh_among_agrees_with_freshness() -> None:
    rng = random.Random(11)
    eps = []
    for i in range(300):
        ep = endpoint(f"e{i}", waiting=rng.choice((None, 0.0)))
        ep.scraped_at = NOW - rng.choice((0.0, 1.0, 2.0, 2.5, 5.0))
        ep.consecutive_failures = rng.choice((0, 0, 1))
        eps.append(ep)
    want = [ep for ep in eps if ep.freshness(NOW, 2.0) is Freshness.FRESH]
    assert 0 < len(want) < len(eps)
    assert fresh_among(eps, NOW, 2.0) == want
    everyone = tuple(want)
    assert fresh_among(everyone, NOW, 2.0) is everyone  # all fresh: handed on as it is


def test_least_is_best_gives_the_formula_whether_loads_repeat_or_not() -> None:
    rng = random.Random(5)
    for distinct in (2, 3, 50):
        values = [float(rng.randrange(distinct)) for _ in range(200)]
        low, high = min(values), max(values)
        for min_span in (0.0, 4.0):
            span = max(high - low, min_span)
            assert least_is_best(values, min_span) == [1.0 - (v - low) / span for v in values]
    assert least_is_best([2.0] * 9) is None and least_is_best([]) is None
