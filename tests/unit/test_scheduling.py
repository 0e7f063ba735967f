"""Filters, scorers, the max-score picker and the scheduler built from config."""

from __future__ import annotations

import random
from typing import Any

import pytest

from picker.config import Config, MetricsConfig, PluginSpec, SchedulingConfig
from picker.datalayer.endpoint import Endpoint, EngineMetrics
from picker.datalayer.pool import EndpointPool
from picker.request import InferenceRequest
from picker.scheduling.filters import HealthyFilter
from picker.scheduling.pickers import MaxScorePicker
from picker.scheduling.scheduler import SCORERS, PluginContext, Scheduler, build_plugin
from picker.scheduling.scorers import (
    InflightLoadScorer,
    KVCacheUtilizationScorer,
    LatencyScorer,
    QueueScorer,
    SessionAffinityScorer,
)
from picker.telemetry import REGISTRY

NOW = 1000.0


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def endpoint(address: str, waiting: float | None = 0.0, kv: float = 0.0, inflight: int = 0) -> Endpoint:
    """A fresh endpoint (scraped at NOW); waiting=None means no metrics yet."""
    metrics = None if waiting is None else EngineMetrics(waiting=waiting, kv_usage=kv)
    return Endpoint(address, metrics=metrics, scraped_at=NOW, inflight_requests=inflight)


def pool_of(*loads: dict[str, Any]) -> EndpointPool:
    """A pool of fresh endpoints 10.0.0.<i>:8000 with the given metrics fields."""
    pool = EndpointPool()
    pool.set_addresses(f"10.0.0.{i}:8000" for i in range(len(loads)))
    for ep, fields in zip(pool.endpoints, loads, strict=True):
        ep.metrics = EngineMetrics(**fields)
        ep.scraped_at = NOW
    return pool


def scheduler(pool: EndpointPool, doc: dict[str, Any], seed: int = 0) -> Scheduler:
    return Scheduler.from_config(Config.from_dict(doc), pool, clock=FakeClock(), rng=random.Random(seed))


def scores(scorer: Any, *candidates: Endpoint, request: InferenceRequest | None = None) -> list[float]:
    return list(scorer.score(request or InferenceRequest(), list(candidates)))


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
    assert scores(QueueScorer(), endpoint("a", 3), endpoint("b", 3)) == [1.0, 1.0]
    assert scores(QueueScorer(), endpoint("a", 7)) == [1.0]


def test_small_load_differences_cost_little_below_the_minimum_span() -> None:
    assert scores(QueueScorer(), endpoint("a", 0), endpoint("b", 1)) == [1.0, 0.75]
    assert scores(QueueScorer(min_span=0), endpoint("a", 0), endpoint("b", 1)) == [1.0, 0.0]
    a, b = endpoint("a", inflight=3), endpoint("b", inflight=5)
    assert scores(InflightLoadScorer(), a, b) == [1.0, 0.5]
    a.inflight_tokens, b.inflight_tokens = 0, 1024
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
    assert scores(LatencyScorer(), endpoint("x"), endpoint("y")) == [1.0, 1.0]
    with pytest.raises(ValueError):
        LatencyScorer(tolerance=1.0, zero_at=1.5)


def test_queue_scorer_unknown_metrics_score_zero_and_do_not_set_the_scale() -> None:
    got = scores(QueueScorer(), endpoint("a", None), endpoint("b", 2), endpoint("c", 6))
    assert got == [0.0, 1.0, 0.0]
    assert scores(QueueScorer(), endpoint("a", None), endpoint("b", 2)) == [0.0, 1.0]
    assert scores(QueueScorer(), endpoint("a", None)) == [0.0]


def test_kv_cache_scorer_is_free_fraction() -> None:
    got = scores(
        KVCacheUtilizationScorer(),
        endpoint("a", kv=0.25),
        endpoint("b", kv=1.0),
        endpoint("c", kv=1.2),  # a bogus report still yields a score in [0, 1]
        endpoint("d", waiting=None),
    )
    assert got == [0.75, 0.0, 0.0, 0.0]


def test_inflight_scorer_by_requests_or_tokens() -> None:
    a, b, c = endpoint("a", inflight=0), endpoint("b", inflight=2), endpoint("c", inflight=4)
    a.inflight_tokens, b.inflight_tokens, c.inflight_tokens = 9000, 1000, 5000
    assert scores(InflightLoadScorer(), a, b, c) == [1.0, 0.5, 0.0]
    assert scores(InflightLoadScorer(measure="tokens"), a, b, c) == [0.0, 1.0, 0.5]
    assert scores(InflightLoadScorer(), a) == [1.0]
    with pytest.raises(ValueError, match="measure"):
        InflightLoadScorer(measure="bytes")


def test_session_affinity_prefers_last_endpoint_of_the_session() -> None:
    a, b = endpoint("a:1"), endpoint("b:1")
    scorer = SessionAffinityScorer(max_sessions=1)
    alice = InferenceRequest(session_key="alice")
    assert scores(scorer, a, b, request=alice) == [0.0, 0.0]
    scorer.on_pick(alice, b)
    assert scores(scorer, a, b, request=alice) == [0.0, 1.0]
    assert scores(scorer, a, b, request=InferenceRequest()) == [0.0, 0.0]
    scorer.on_pick(InferenceRequest(session_key="bob"), a)  # evicts alice (bound of 1)
    assert scores(scorer, a, b, request=alice) == [0.0, 0.0]
    assert scores(scorer, a, b, request=InferenceRequest(session_key="bob")) == [1.0, 0.0]


# --- picker --------------------------------------------------------------------------------------


def test_picker_clear_winner_always_wins_and_fallbacks_descend() -> None:
    eps = [endpoint(name) for name in "abcde"]
    values = [0.3, 2.5, 0.1, 1.9, 2.0]
    for seed in range(20):
        picked = MaxScorePicker(random.Random(seed), fallbacks=3).pick(eps, values)
        assert [ep.address for ep in picked] == ["b", "e", "d", "a"]
    assert MaxScorePicker(random.Random(0), fallbacks=0).pick(eps, values) == [eps[1]]
    assert len(MaxScorePicker(random.Random(0), fallbacks=10).pick(eps, values)) == 5


def test_picker_breaks_ties_at_random() -> None:
    eps = [endpoint("a"), endpoint("b"), endpoint("c")]
    winners = {
        MaxScorePicker(random.Random(seed), fallbacks=0).pick(eps, [1.0, 1.0 + 1e-12, 0.5])[0].address
        for seed in range(40)
    }
    assert winners == {"a", "b"}


# --- scheduler -----------------------------------------------------------------------------------


def test_weights_from_yaml_decide_and_name_the_reason() -> None:
    # a: short queue, full cache; b: long queue, empty cache.
    loads = ({"waiting": 0, "kv_usage": 0.9}, {"waiting": 10, "kv_usage": 0.0})

    def decide(queue_weight: float, kv_weight: float) -> tuple[str, str]:
        doc = {
            "scheduling": {
                "scorers": [
                    {"type": "queue", "weight": queue_weight},
                    {"type": "kv-cache-utilization", "weight": kv_weight},
                ],
                "picker": {"type": "max-score", "params": {"fallbacks": 1}},
            }
        }
        pool = pool_of(*loads)
        result = scheduler(pool, doc).schedule(InferenceRequest(), pool.endpoints)
        assert result is not None and len(result.endpoints) == 2
        return result.endpoints[0].address, result.reason

    assert decide(1, 3) == ("10.0.0.1:8000", "kv-cache-utilization")
    assert decide(5, 1) == ("10.0.0.0:8000", "queue")


def test_scheduler_special_reasons_and_no_candidate() -> None:
    pool = pool_of({}, {})
    sched = scheduler(pool, {})
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
        sched = scheduler(pool, {"scheduling": {"scorers": ["queue"]}}, seed)
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
    sched = scheduler(pool, {"scheduling": {"scorers": ["inflight-load"]}})
    for _ in range(10):
        result = sched.schedule(InferenceRequest(), pool.endpoints)
        assert result is not None and pool.endpoints[0] not in result.endpoints


def test_default_config_builds_every_default_plugin() -> None:
    sched = Scheduler.from_config(Config(), pool_of({}))
    assert [s.name for s in sched.scorers] == [
        "queue",
        "kv-cache-utilization",
        "inflight-load",
        "latency",
        "prefix-cache",
    ]
    assert sched.weights == [2.0, 2.0, 1.0, 2.0, 3.0]
    assert [f.name for f in sched.filters] == ["healthy"]


@pytest.mark.parametrize(
    ("scheduling", "message"),
    [
        (
            SchedulingConfig(filters=(PluginSpec("nope"),)),
            r"unknown filter type 'nope'; known: healthy",
        ),
        (SchedulingConfig(scorers=(PluginSpec("queue", params={"x": 1}),)), r"unknown params \['x'\]"),
        (
            SchedulingConfig(scorers=(PluginSpec("prefix-cache", params={"auto_tune": "yes"}),)),
            r"'auto_tune' must be bool",
        ),
        (
            SchedulingConfig(scorers=(PluginSpec("prefix-cache", params={"max_prefix_blocks": 0}),)),
            r"scorer 'prefix-cache': max_prefix_blocks must be at least 1",
        ),
        (SchedulingConfig(scorers=(PluginSpec("queue", weight=-1),)), r"weight must be finite"),
        (SchedulingConfig(picker=PluginSpec("max-score", params={"fallbacks": -1})), r"fallbacks"),
        (SchedulingConfig(picker=PluginSpec("random")), r"unknown picker type 'random'"),
    ],
)
def test_bad_plugin_config_fails_at_start_up(scheduling: SchedulingConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Scheduler(scheduling, PluginContext(EndpointPool()))


def test_build_plugin_fills_context_and_coerces_numbers() -> None:
    ctx = PluginContext(EndpointPool(), MetricsConfig(stale_after=0.5), FakeClock())
    healthy = build_plugin("filter", {"healthy": HealthyFilter}, PluginSpec("healthy"), ctx)
    assert healthy.metrics.stale_after == 0.5 and healthy.clock is ctx.clock
    spec = PluginSpec("prefix-cache", params={"max_load_gap": 3})
    prefix = build_plugin("scorer", SCORERS, spec, ctx)
    assert prefix.max_load_gap == 3.0 and isinstance(prefix.max_load_gap, float)
    with pytest.raises(ValueError, match="accepted: none"):
        build_plugin("filter", {"healthy": HealthyFilter}, PluginSpec("healthy", params={"a": 1}), ctx)
