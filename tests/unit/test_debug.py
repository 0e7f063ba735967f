"""The debug views: every named scorer instance reported on its own, newest decision first."""

from __future__ import annotations

import random

from picker.admission import Admission
from picker.config import Config
from picker.datalayer.pool import EndpointPool
from picker.debug import decisions_view, endpoints_view
from picker.request import InferenceRequest
from picker.requestcontrol import Decision, RequestControl
from picker.scheduling.scheduler import DECISIONS_KEPT, Scheduler
from tests.unit.conftest import NOW, epp, pool_of

DOC = epp(
    {"type": "inflight-load-scorer", "name": "requests", "weight": 1},
    {"type": "inflight-load-scorer", "name": "tokens", "weight": 2, "parameters": {"measure": "tokens"}},
    {"type": "prefix-cache-scorer", "name": "short-prefixes", "parameters": {"blockSizeTokens": 4}},
)


def scheduled(requests: int) -> tuple[EndpointPool, Scheduler]:
    """`requests` decisions through request control (which teaches the prefix index)."""
    pool = pool_of({}, {})
    a, b = pool.endpoints
    a.inflight_requests, b.inflight_tokens = 2, 9000
    a.refresh_load(), b.refresh_load()
    config = Config.from_document(DOC)
    sched = Scheduler.from_config(config, pool, clock=lambda: NOW, rng=random.Random(1))
    control = RequestControl(pool, sched, Admission(config.saturation, config.metrics, lambda: NOW), config)
    for i in range(requests):
        request = InferenceRequest(model=f"m{i}", prompt="p" * 64, prompt_chars=64)
        assert isinstance(control.decide(request), Decision)
    return pool, sched


def test_each_named_instance_reports_its_own_scores() -> None:
    pool, sched = scheduled(1)
    a, b = pool.endpoints
    view = decisions_view(sched)
    assert view["scorers"] == [
        {"name": "requests", "type": "inflight-load-scorer", "weight": 1.0},
        {"name": "tokens", "type": "inflight-load-scorer", "weight": 2.0},
        {"name": "short-prefixes", "type": "prefix-cache-scorer", "weight": 1.0},
    ]
    (decision,) = view["decisions"]
    assert decision["reason"] == "tokens" and decision["candidates"] == 2
    assert [c["endpoint"] for c in decision["considered"]] == [a.address, b.address]  # pick, fallback
    by_endpoint = {c["endpoint"]: c for c in decision["considered"]}
    # nothing was recorded yet, so the prefix scorer had no preference: null, and out of the total
    assert by_endpoint[a.address]["scores"] == {"requests": 0.5, "tokens": 1.0, "short-prefixes": None}
    assert by_endpoint[b.address]["scores"] == {"requests": 1.0, "tokens": 0.0, "short-prefixes": None}
    assert by_endpoint[a.address]["total"] == 2.5 and by_endpoint[b.address]["total"] == 1.0


def test_a_decision_keeps_the_pick_and_runner_up_not_the_whole_pool() -> None:
    pool = pool_of(*({"waiting": float(i)} for i in range(12)))
    doc = epp({"type": "queue-scorer", "parameters": {"minSpan": 0}}, picker={"maxNumOfEndpoints": 1})
    sched = Scheduler.from_config(Config.from_document(doc), pool, clock=lambda: NOW)
    assert sched.schedule(InferenceRequest(model="m"), pool.endpoints) is not None
    (decision,) = decisions_view(sched)["decisions"]
    assert decision["candidates"] == 12 and decision["reason"] == "queue-scorer"
    rows = [(row["endpoint"], row["scores"]["queue-scorer"]) for row in decision["considered"]]
    assert rows == [(pool.endpoints[0].address, 1.0), (pool.endpoints[1].address, 1 - 1 / 11)]
    assert sched.schedule(InferenceRequest(model="m"), pool.endpoints[5:6]) is not None
    alone = decisions_view(sched)["decisions"][0]
    assert alone["candidates"] == 1 and alone["reason"] == "only-candidate"
    assert alone["considered"] == [  # one candidate: the queue scorer has no preference
        {"endpoint": pool.endpoints[5].address, "total": 0.0, "scores": {"queue-scorer": None}}
    ]


def test_the_last_decisions_are_kept_newest_first_and_bounded() -> None:
    _, sched = scheduled(DECISIONS_KEPT + 5)
    models = [d["model"] for d in decisions_view(sched)["decisions"]]
    assert len(models) == DECISIONS_KEPT
    assert models[0] == f"m{DECISIONS_KEPT + 4}" and models[-1] == "m5"


def test_endpoint_view_shows_state_and_prefix_blocks_per_instance() -> None:
    pool, sched = scheduled(1)
    rows = {row["address"]: row for row in endpoints_view(pool, sched, stale_after=1e9, now=NOW)["endpoints"]}
    a, b = pool.endpoints
    assert rows[a.address]["prefix_blocks"] == {"short-prefixes": 4}  # 64 characters, 16 per block
    assert rows[b.address]["prefix_blocks"] == {"short-prefixes": 0}
    assert rows[b.address]["inflight_prompt_tokens"] == 9000 and rows[a.address]["freshness"] == "fresh"
    assert (rows[a.address]["prefill_tokens"], rows[b.address]["prefill_tokens"]) == (16, 0)
    stale = endpoints_view(pool, sched, stale_after=1.0, now=NOW + 2)["endpoints"]  # scraped 2 s ago
    assert [row["freshness"] for row in stale] == ["stale", "stale"]
