"""A replica that dies is dropped after one failed request, not after several scrape intervals,
and used again once it is back."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from picker.admission import Admission
from picker.config import Config, MetricsConfig
from picker.datalayer.endpoint import EngineMetrics
from picker.datalayer.pool import EndpointPool
from picker.datalayer.scraper import Scraper
from picker.request import InferenceRequest
from picker.requestcontrol import Decision, RequestControl
from picker.scheduling.scheduler import Scheduler
from tests.faults.conftest import CHAT, chat

pytestmark = pytest.mark.timeout(60)


async def test_probe_marks_a_refused_endpoint_at_once_and_is_bounded(refused_address, fake_vllm) -> None:
    (replica,) = await fake_vllm(1)
    pool = EndpointPool()
    pool.set_addresses([refused_address, replica.address])
    refused, alive = pool.endpoints
    scraper = Scraper(pool, MetricsConfig(scrape_interval=0.2, timeout=30.0))
    try:
        task = scraper.probe(refused)
        assert task is not None
        await task
        assert refused.consecutive_failures == 1
        assert scraper.probe(refused) is None  # one probe per endpoint per scrape interval
        await asyncio.sleep(0.2)
        second = scraper.probe(refused)
        assert second is not None
        await second
        assert refused.consecutive_failures == 2

        # Never a second scrape of an endpoint while one is under way.
        scrape = scraper.probe(alive)
        assert scrape is not None and scraper.probe(alive) is None
        await scrape
        assert alive.metrics is not None and alive.consecutive_failures == 0
    finally:
        await scraper.aclose()


async def test_request_control_probes_only_after_an_exchange_that_ended_fast() -> None:
    config = Config(metrics=MetricsConfig(fast_end_probe=0.5))
    pool = EndpointPool()
    pool.set_addresses(["10.0.0.1:8000"])
    (endpoint,) = pool.endpoints
    endpoint.metrics, endpoint.scraped_at = EngineMetrics(), time.monotonic()
    probed: list[str] = []
    control = RequestControl(
        pool,
        Scheduler.from_config(config, pool),
        Admission(config.saturation, config.metrics),
        config,
        probe=lambda e: probed.append(e.address),
    )
    fast = control.decide(InferenceRequest())
    assert isinstance(fast, Decision)
    control.release(fast, lived_as_exchange=True)
    assert probed == ["10.0.0.1:8000"]
    slow = control.decide(InferenceRequest())
    assert isinstance(slow, Decision)
    slow.decided_at -= 1.0
    control.release(slow, lived_as_exchange=True)
    # A stream that ended with its request phase (lean mode) says nothing about the endpoint.
    lean = control.decide(InferenceRequest())
    assert isinstance(lean, Decision)
    control.release(lean, lived_as_exchange=False)
    assert probed == ["10.0.0.1:8000"] and endpoint.inflight_requests == 0


async def test_killed_replica_is_dropped_after_one_failed_request_and_used_again_when_back(
    fake_vllm, picker_server, envoy, config_file, client: httpx.AsyncClient
) -> None:
    replicas = await fake_vllm(3)
    for other in replicas[1:]:
        other.metrics.waiting = 3  # replica 0 is the picker's choice while it lives
    addresses = [r.address for r in replicas]
    # Scrapes 1 s apart and no staleness: without the fast-end probe the dead replica would
    # stay the best choice, and fail request after request, until the next scrape.
    staleness = {"metricsStalenessThreshold": "60s"}
    config = config_file(metrics={"scrapeInterval": 1.0}, saturationDetector=staleness)
    picker = await picker_server(addresses, "--config-file", config)
    proxy = await envoy("picker", endpoints=addresses, picker=[picker.address])

    async def send(i: int) -> httpx.Response:
        return await client.post(proxy.url + CHAT, json=chat(f"question {i}"))

    assert (await send(0)).headers["x-sim-replica"] == "0"
    await replicas[0].kill()
    statuses = [(r.status_code, r.headers.get("x-sim-replica")) for r in [await send(i) for i in range(10)]]
    failed = [s for s in statuses if s[0] != 200]
    assert len(failed) <= 2, statuses  # the first fails fast (503); its probe drops the replica
    assert all(served in {"1", "2"} for code, served in statuses[len(failed) :] if code == 200)

    await replicas[0].start()
    deadline = time.monotonic() + 5.0  # one scrape interval, with room for a busy machine
    while (await send(99)).headers.get("x-sim-replica") != "0":
        assert time.monotonic() < deadline, "the revived replica was not used again"
