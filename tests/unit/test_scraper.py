"""Scraper against fake vLLM replicas on 127.0.0.1 whose /metrics can fail on demand."""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import pytest

from picker.config import MetricsConfig
from picker.datalayer.endpoint import Endpoint, Freshness
from picker.datalayer.pool import EndpointPool
from picker.datalayer.scraper import Scraper
from picker.telemetry import REGISTRY
from tests.support.fake_vllm import METRICS_FAULTS, FakeVLLM

pytestmark = pytest.mark.timeout(20)

CONFIG = MetricsConfig(scrape_interval=0.02, stale_after=2.0, timeout=1.0)


def metrics_page(waiting: int, kv: float) -> bytes:
    return (
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 2.0\n'
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
        "# TYPE vllm:num_requests_waiting gauge\n"
        f'vllm:num_requests_waiting{{engine="0",model_name="m"}} {waiting}.0\n'
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        f'vllm:kv_cache_usage_perc{{engine="0",model_name="m"}} {kv}\n'
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
        "# TYPE vllm:cache_config_info gauge\n"
        'vllm:cache_config_info{block_size="32",engine="0",num_gpu_blocks="1000"} 1.0\n'
    ).encode()


def misbehave(replica: FakeVLLM, mode: str) -> None:
    """How the replica's next /metrics answers go: ok | 500 | garbage | hang | huge."""
    replica.metrics_status = 500 if mode == "500" else 200
    replica.metrics_fault = mode if mode in METRICS_FAULTS else None


StartReplicas = Callable[[int], Awaitable[list[FakeVLLM]]]


@pytest.fixture
def replicas(fake_vllm: Callable[..., Awaitable[list[FakeVLLM]]]) -> StartReplicas:
    async def start(count: int) -> list[FakeVLLM]:
        return [
            replica
            for i in range(count)
            for replica in await fake_vllm(1, metrics_page=metrics_page(waiting=i + 1, kv=0.1 * (i + 1)))
        ]

    return start


@pytest.fixture
async def pool() -> AsyncIterator[EndpointPool]:
    pool = EndpointPool()
    yield pool
    pool.set_addresses([])  # drops the test's gauge series


@pytest.fixture
async def scraper(pool: EndpointPool) -> AsyncIterator[Scraper]:
    scraper = Scraper(pool, CONFIG, max_page_bytes=64 * 1024)
    yield scraper
    await scraper.aclose()


def routable(address: str) -> float | None:
    return REGISTRY.get_sample_value("picker_endpoint_routable", {"endpoint": address})


def age(address: str) -> float | None:
    return REGISTRY.get_sample_value("picker_endpoint_metrics_age_seconds", {"endpoint": address})


def errors(address: str, kind: str) -> float | None:
    return REGISTRY.get_sample_value("picker_scrape_errors_total", {"endpoint": address, "kind": kind})


def fresh(endpoint: Endpoint) -> bool:
    return endpoint.freshness(time.monotonic(), CONFIG.stale_after) is Freshness.FRESH


def closed_port_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"  # nothing listens once it is closed


async def test_success_records_metrics_and_gauges(
    replicas: StartReplicas, pool: EndpointPool, scraper: Scraper
) -> None:
    a, b = await replicas(2)
    pool.set_addresses([a.address, b.address])
    seen: list[str] = []
    scraper.on_scraped(lambda endpoint: seen.append(endpoint.address))
    before = time.monotonic()

    await scraper.scrape_once()

    ep_a, ep_b = pool.get(a.address), pool.get(b.address)
    assert ep_a is not None and ep_b is not None and ep_a.metrics and ep_b.metrics
    assert (ep_a.metrics.waiting, ep_a.metrics.running, ep_a.metrics.block_size) == (1, 2, 32)
    assert ep_b.metrics.waiting == 2 and ep_b.metrics.kv_usage == pytest.approx(0.2)
    assert ep_a.scraped_at >= before and fresh(ep_a) and fresh(ep_b)
    assert sorted(seen) == sorted([a.address, b.address])
    assert routable(a.address) == 1.0
    assert 0.0 <= (age(a.address) or -1) < CONFIG.stale_after


@pytest.mark.parametrize(("mode", "kind"), [("500", "status"), ("garbage", "parse"), ("huge", "parse")])
async def test_failure_marks_only_that_endpoint_unfresh_until_it_recovers(
    replicas: StartReplicas,
    pool: EndpointPool,
    scraper: Scraper,
    mode: str,
    kind: str,
) -> None:
    bad, good = await replicas(2)
    pool.set_addresses([bad.address, good.address])
    await scraper.scrape_once()
    ep_bad, ep_good = pool.get(bad.address), pool.get(good.address)
    assert ep_bad is not None and ep_good is not None
    kept, good_at = ep_bad.metrics, ep_good.scraped_at
    seen: list[str] = []
    scraper.on_scraped(lambda endpoint: seen.append(endpoint.address))

    misbehave(bad, mode)
    await scraper.scrape_once()
    assert ep_bad.consecutive_failures == 1 and not fresh(ep_bad)
    assert ep_bad.metrics is kept  # last good numbers stay, but no longer count
    assert errors(bad.address, kind) == 1.0 and routable(bad.address) == 0.0
    assert fresh(ep_good) and ep_good.scraped_at > good_at and errors(good.address, kind) is None
    assert seen == [good.address]

    await scraper.scrape_once()
    assert ep_bad.consecutive_failures == 2 and errors(bad.address, kind) == 2.0

    misbehave(bad, "ok")
    await scraper.scrape_once()
    assert fresh(ep_bad) and ep_bad.consecutive_failures == 0 and routable(bad.address) == 1.0


async def test_timeout_and_refused_connection_are_failures(
    replicas: StartReplicas, pool: EndpointPool
) -> None:
    (hung,) = await replicas(1)
    misbehave(hung, "hang")
    refused = closed_port_address()
    pool.set_addresses([hung.address, refused])
    scraper = Scraper(pool, MetricsConfig(timeout=0.2))
    try:
        await scraper.scrape_once()
        for address, kind in ((hung.address, "timeout"), (refused, "connect")):
            endpoint = pool.get(address)
            assert endpoint is not None and endpoint.consecutive_failures == 1
            assert errors(address, kind) == 1.0
            assert age(address) == math.inf  # never scraped successfully

        # The endpoint's one connection slot was freed by the abandoned request.
        misbehave(hung, "ok")
        await scraper.scrape_once()
        recovered = pool.get(hung.address)
        assert recovered is not None and fresh(recovered)
    finally:
        await scraper.aclose()


async def test_hanging_endpoint_does_not_starve_the_others(
    replicas: StartReplicas, pool: EndpointPool
) -> None:
    hung, *healthy = await replicas(3)
    misbehave(hung, "hang")
    pool.set_addresses([hung.address] + [r.address for r in healthy])
    # The hanging scrape outlives the test; a round-based scraper would never start round 2.
    scraper = Scraper(pool, MetricsConfig(scrape_interval=0.02, timeout=60.0))
    rounds: Counter[str] = Counter()
    enough = asyncio.Event()

    def count(endpoint: Endpoint) -> None:
        rounds[endpoint.address] += 1
        if all(rounds[r.address] >= 10 for r in healthy):
            enough.set()

    scraper.on_scraped(count)
    task = asyncio.create_task(scraper.run())
    try:
        async with asyncio.timeout(5):  # 10 intervals are 0.2 s; generous for a busy machine
            await enough.wait()
        assert hung.scrapes == 1  # no pile-up: the stuck scrape is not restarted every tick
        stuck = pool.get(hung.address)
        assert stuck is not None and stuck.metrics is None and not fresh(stuck)
        assert all(fresh(endpoint) for endpoint in pool.endpoints if endpoint is not stuck)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("scrape ")]


async def test_first_round_waits_for_a_synced_pool_and_every_endpoint(
    replicas: StartReplicas, pool: EndpointPool, scraper: Scraper
) -> None:
    ok, down = await replicas(2)
    misbehave(down, "500")
    await scraper.scrape_once()  # discovery has not spoken yet
    pool.set_addresses([])
    await scraper.scrape_once()  # synced, but nothing to route to
    assert not scraper.first_round.is_set()

    task = asyncio.create_task(scraper.run())
    try:
        pool.set_addresses([ok.address, down.address])
        async with asyncio.timeout(5):
            await scraper.first_round.wait()
        ep_ok, ep_down = pool.get(ok.address), pool.get(down.address)
        assert ep_ok is not None and ep_ok.metrics is not None
        assert ep_down is not None and ep_down.consecutive_failures >= 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_removed_endpoint_loses_its_series_connection_and_scrape(
    replicas: StartReplicas, pool: EndpointPool, scraper: Scraper
) -> None:
    kept, failing, healthy, hung = await replicas(4)
    misbehave(failing, "500")
    pool.set_addresses([kept.address, failing.address, healthy.address])
    await scraper.scrape_once()
    assert routable(failing.address) == 0.0 and errors(failing.address, "status") == 1.0
    assert routable(healthy.address) == 1.0 and healthy.scrape_connections

    pool.set_addresses([kept.address, hung.address])
    for gone in (failing.address, healthy.address):
        assert routable(gone) is None and age(gone) is None
    assert errors(failing.address, "status") is None
    assert routable(kept.address) == 1.0
    # The kept-alive connection to the departed healthy endpoint is closed too. aiohttp signals
    # no event for that: poll, bounded.
    async with asyncio.timeout(2):
        while not all(conn.is_closing() for conn in healthy.scrape_connections):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert not any(conn.is_closing() for conn in kept.scrape_connections)

    misbehave(hung, "hang")
    scraping = asyncio.create_task(scraper.scrape_once())
    await hung.wait_scrapes(1)
    pool.set_addresses([kept.address])
    async with asyncio.timeout(2):  # the hanging scrape is cancelled, not left to time out
        await scraping
    assert routable(hung.address) is None and errors(hung.address, "timeout") is None


def model_list(*cards: tuple[str, str | None]) -> bytes:
    """A vLLM `/v1/models` answer: base models have no parent, adapters name theirs."""
    data = [{"id": name, "object": "model", "root": name, "parent": parent} for name, parent in cards]
    return orjson.dumps({"object": "list", "data": data})


async def test_models_come_with_the_first_scrape_then_every_interval_on_one_connection(
    replicas: StartReplicas, pool: EndpointPool
) -> None:
    (replica,) = await replicas(1)
    replica.models_page = model_list(("llama", None), ("tuned", "llama"))
    pool.set_addresses([replica.address])
    endpoint = pool.get(replica.address)
    assert endpoint is not None and endpoint.models is None  # unknown until it tells
    rarely = Scraper(pool, MetricsConfig(models_interval=3600.0))
    try:
        await rarely.scrape_once()
        assert endpoint.models == {"llama": None, "tuned": "llama"}
        replica.models_page = model_list(("llama", None))
        await rarely.scrape_once()
        assert replica.model_fetches == 1 and "tuned" in endpoint.models  # not due yet
    finally:
        await rarely.aclose()
    always = Scraper(pool, MetricsConfig(models_interval=0.0))
    try:
        await always.scrape_once()
        assert endpoint.models == {"llama": None}
        replica.lists_models = False  # the server lost the route: nothing can be concluded
        await always.scrape_once()
        assert endpoint.models is None and fresh(endpoint)
        replica.lists_models, replica.models_page = True, b'{"object": "list", "data": "nope"}'
        await always.scrape_once()
        assert endpoint.models is None and replica.model_fetches == 4
        assert len(replica.scrape_connections) == 2  # one per scraper: the 404 kept the connection
        assert replica.requests == []  # polls, not traffic
    finally:
        await always.aclose()
