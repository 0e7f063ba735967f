"""Saturation detection and shedding of sheddable requests."""

from __future__ import annotations

import pytest

from picker.admission import Admission
from picker.config import MetricsConfig, SaturationConfig
from picker.datalayer.endpoint import Endpoint, EngineMetrics

NOW = 1000.0


def admission(**saturation: float) -> Admission:
    return Admission(SaturationConfig(**saturation), MetricsConfig(stale_after=2.0), lambda: NOW)


def endpoint(waiting: float = 0.0, kv: float = 0.0, scraped_at: float = NOW) -> Endpoint:
    return Endpoint("10.0.0.1:8000", EngineMetrics(waiting=waiting, kv_usage=kv), scraped_at=scraped_at)


def test_endpoint_saturation_is_the_worse_of_queue_and_kv() -> None:
    adm = admission(queue_threshold=5, kv_threshold=0.8)
    assert adm.endpoint_saturation(endpoint(waiting=2, kv=0.2), NOW) == pytest.approx(0.4)
    assert adm.endpoint_saturation(endpoint(waiting=1, kv=0.6), NOW) == pytest.approx(0.75)
    assert adm.endpoint_saturation(endpoint(waiting=5), NOW) == 1.0
    assert adm.endpoint_saturation(endpoint(kv=0.8), NOW) == 1.0
    assert adm.endpoint_saturation(endpoint(waiting=50), NOW) == 1.0  # capped


def test_stale_or_unknown_endpoints_count_as_saturated() -> None:
    adm = admission()
    assert adm.endpoint_saturation(endpoint(scraped_at=NOW - 2.5), NOW) == 1.0
    assert adm.endpoint_saturation(Endpoint("10.0.0.2:8000"), NOW) == 1.0
    failing = endpoint()
    failing.consecutive_failures = 3
    assert adm.endpoint_saturation(failing, NOW) == 1.0


def test_a_request_is_refused_only_when_the_pool_is_saturated() -> None:
    adm = admission(queue_threshold=5, kv_threshold=0.8, retry_after_seconds=3)
    busy = [endpoint(waiting=6), endpoint(kv=0.9)]
    assert adm.check([endpoint(waiting=4), endpoint(kv=0.5)]) is None
    assert adm.check([*busy, endpoint(waiting=4.9)]) is None
    rejection = adm.check(busy)
    assert rejection is not None
    assert (rejection.status, rejection.retry_after) == (429, 3)
    assert "saturated" in rejection.message


def test_stale_pool_sheds_but_one_fresh_idle_endpoint_admits() -> None:
    adm = admission()
    stale = [endpoint(scraped_at=NOW - 10), endpoint(scraped_at=NOW - 10)]
    assert adm.check(stale) is not None
    assert adm.pool_saturation([*stale, endpoint(), endpoint()]) == pytest.approx(0.5)
    assert adm.check([*stale, endpoint()]) is None


def test_one_runaway_endpoint_does_not_shed_what_idle_peers_can_serve() -> None:
    adm = admission(queue_threshold=5)
    assert adm.check([endpoint(waiting=500), endpoint(), endpoint()]) is None


def test_no_candidates_is_left_to_the_scheduler() -> None:
    assert admission().check([]) is None


def test_thresholds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="thresholds"):
        admission(queue_threshold=0)
