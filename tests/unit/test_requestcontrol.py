"""Request control: what happens around one decision, in order, and the load it holds."""

from __future__ import annotations

import random
import time

import pytest

from picker.admission import Admission
from picker.config import Config, MetricsConfig
from picker.datalayer.endpoint import MAX_PENDING_AGE, Endpoint, EngineMetrics
from picker.datalayer.pool import EndpointPool
from picker.errors import Refusal
from picker.request import InferenceRequest
from picker.requestcontrol import Decision, RequestControl
from picker.scheduling.scheduler import Scheduler
from tests.unit.conftest import epp

ADDRESSES = ("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000")


def control(config: Config | None = None, **waiting: float) -> RequestControl:
    """Request control over three fresh endpoints; `waiting` by the address's last octet (e1=...)."""
    config = config or Config()
    pool = EndpointPool()
    pool.set_addresses(ADDRESSES)
    for i, endpoint in enumerate(pool.endpoints, start=1):
        endpoint.metrics = EngineMetrics(waiting=waiting.get(f"e{i}", 0.0))
        endpoint.scraped_at = time.monotonic()
    scheduler = Scheduler.from_config(config, pool, rng=random.Random(0))
    return RequestControl(pool, scheduler, Admission(config.saturation, config.metrics), config)


def decided(rc: RequestControl, request: InferenceRequest) -> Decision:
    outcome = rc.decide(request)
    assert isinstance(outcome, Decision), outcome
    return outcome


def test_the_objective_sets_the_priority_and_a_saturated_pool_sheds_only_sheddable_requests() -> None:
    rc = control(Config(objectives={"batch": -1, "chat": 5}), e1=50, e2=50, e3=50)
    shed = rc.decide(InferenceRequest(objective="batch"))
    assert isinstance(shed, Refusal) and shed.status == 429 and shed.retry_after == 1
    kept = decided(rc, InferenceRequest(objective="chat"))
    assert kept.request.priority == 5
    assert decided(rc, InferenceRequest(objective="unknown")).request.priority == 0


def test_the_subset_hint_limits_admission_and_scheduling_alike() -> None:
    rc = control(Config(objectives={"batch": -1}), e1=0, e2=50, e3=50)
    hint = frozenset(ADDRESSES[1:])
    # The idle endpoint is outside the hint: the hinted candidates are saturated, so shed...
    shed = rc.decide(InferenceRequest(objective="batch", subset=hint))
    assert isinstance(shed, Refusal) and shed.status == 429
    # ...and a request that may not be shed goes to a hinted endpoint, never the idle one.
    for _ in range(5):
        assert decided(rc, InferenceRequest(subset=hint)).endpoint.address in hint
    for subset in (frozenset(), frozenset({"192.0.2.1:8000"})):
        refused = rc.decide(InferenceRequest(subset=subset))
        assert isinstance(refused, Refusal) and refused.status == 503


def test_affinity_is_learnt_from_committed_decisions_and_follows_a_fallback_that_served() -> None:
    rc = control(
        Config.from_document(epp({"type": "session-affinity-scorer", "weight": 5}, "inflight-load-scorer"))
    )
    first = decided(rc, InferenceRequest(session_key="s1"))
    assert decided(rc, InferenceRequest(session_key="s1")).endpoint is first.endpoint
    other = next(e for e in rc.pool.endpoints if e is not first.endpoint)
    rc.served_elsewhere(first, other.address)  # the gateway retried on a fallback
    assert first.endpoint is other and other.inflight_requests == 1
    assert decided(rc, InferenceRequest(session_key="s1")).endpoint is other


def test_release_gives_back_what_the_decision_held() -> None:
    rc = control()
    request = InferenceRequest(prompt="x" * 400, prompt_chars=400)
    decision = decided(rc, request)
    endpoint = decision.endpoint
    assert (endpoint.inflight_requests, endpoint.inflight_tokens) == (1, 100)
    rc.release(decision, lived_as_exchange=True)
    assert (endpoint.inflight_requests, endpoint.inflight_tokens) == (0, 0)


def test_a_routed_request_counts_as_load_until_a_scrape_that_began_after_it() -> None:
    endpoint = Endpoint("a:1", EngineMetrics(running=2, waiting=1))
    held = endpoint.hold(400, now=10.0)  # characters: 100 tokens at the prior
    endpoint.release(held, exchange_over=False)  # the stream ended with the request phase (lean)
    assert (endpoint.inflight_requests, endpoint.load, endpoint.load_tokens) == (0, 4.0, 100)
    endpoint.observe_metrics(EngineMetrics(running=3, waiting=1), visible_before=9.99)  # began too early
    assert endpoint.load == 5.0
    endpoint.observe_metrics(EngineMetrics(running=3, waiting=1), visible_before=10.01)
    assert (endpoint.load, endpoint.load_tokens) == (4.0, 0)


def test_an_exchange_known_to_be_over_is_no_load_even_before_the_next_scrape() -> None:
    endpoint = Endpoint("a:1", EngineMetrics(running=2))
    held = endpoint.hold(400, now=10.0)  # characters: 100 tokens at the prior
    assert endpoint.load == 3.0
    endpoint.release(held, exchange_over=True)  # its stream lived as long as the exchange
    assert (endpoint.load, endpoint.load_tokens, endpoint.inflight_requests) == (2.0, 0, 0)
    endpoint.observe_metrics(EngineMetrics(running=2), visible_before=11.0)
    assert endpoint.pending_requests == 0


def test_open_streams_count_when_they_exceed_what_the_scrape_shows() -> None:
    endpoint = Endpoint("a:1", EngineMetrics(running=1))
    for _ in range(3):
        endpoint.hold(10, now=10.0)
    endpoint.observe_metrics(EngineMetrics(running=1), visible_before=11.0)
    assert endpoint.load == 3.0  # the picker's own open exchanges: the scrape lags behind them


def test_pending_load_is_forgotten_when_scrapes_stop_showing_it() -> None:
    endpoint = Endpoint("a:1", EngineMetrics())
    endpoint.hold(40, now=0.0)
    endpoint.hold(40, now=MAX_PENDING_AGE + 1.0)
    assert (len(endpoint.pending), endpoint.pending_requests, endpoint.pending_tokens) == (1, 1, 10)


def test_a_fallback_that_served_takes_the_prefill_off_the_first_choice() -> None:
    rc = control()
    decision = decided(rc, InferenceRequest(prompt="x" * 400, prompt_chars=400))
    first = decision.endpoint
    other = next(e for e in rc.pool.endpoints if e is not first)
    rc.served_elsewhere(decision, other.address)
    assert (first.prefill.tokens, len(first.prefill.entries)) == (0, 0)
    assert other.prefill.tokens == 100
    # A scrape may have taken it off the queue already (its first token counted) before the
    # gateway told: moving it again must not fail.
    other.observe_metrics(EngineMetrics(first_tokens=0.0), visible_before=time.monotonic())
    other.observe_metrics(EngineMetrics(first_tokens=1.0), visible_before=time.monotonic())
    assert other.prefill.tokens == 0
    rc.served_elsewhere(decision, first.address)
    assert (other.prefill.tokens, first.prefill.tokens) == (0, 100)


@pytest.mark.parametrize("lived_as_exchange", [True, False])
def test_release_probes_only_streams_that_lived_as_long_as_their_exchange(lived_as_exchange: bool) -> None:
    rc = control(Config(metrics=MetricsConfig(fast_end_probe=10.0)))
    probed: list[Endpoint] = []
    rc.probe = probed.append
    decision = decided(rc, InferenceRequest())
    rc.release(decision, lived_as_exchange=lived_as_exchange)
    assert probed == ([decision.endpoint] if lived_as_exchange else [])
