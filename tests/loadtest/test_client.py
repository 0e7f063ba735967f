"""The load client against simulated replicas, and how it classifies failures."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from loadtest.client import Client, ClientJob, ClientResult, Stage, request_body, stream_request
from loadtest.observe import scrape_counters
from loadtest.processes import free_port
from loadtest.workloads import MultiTurn, Session, SharedPrefix, Uniform, to_dict
from tests.support.fake_vllm import FakeVLLM, Handler
from tests.support.tokens import count_tokens
from vllm_sim import run_replicas


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


@pytest.fixture
def serve(fake_vllm: Callable[..., Awaitable[list[FakeVLLM]]]) -> Callable[[Handler], Awaitable[str]]:
    """Factory: a fake vLLM whose inference requests `handler` answers; returns its base URL."""

    async def start(handler: Handler) -> str:
        (replica,) = await fake_vllm(1, completion=handler)
        return replica.url

    return start


async def run_job(job: ClientJob) -> ClientResult:
    """Run one client job to its end in a fresh session; return its result."""
    async with aiohttp.ClientSession() as http:
        return await Client(job, http).run()


def completion(max_tokens: int = 8) -> dict[str, object]:
    return request_body("m", Session(("hello " * 20,), (max_tokens,), chat=False), 0, [])


async def test_a_streamed_chat_is_timed_per_chunk(http: aiohttp.ClientSession) -> None:
    async with run_replicas(1, speed=50.0) as replicas:
        body = request_body(replicas[0].config.model_name, Session(("question " * 30,), (12,)), 0, [])
        outcome = await stream_request(http, f"http://{replicas[0].address}/v1/chat/completions", body)
    assert outcome.error is None
    assert outcome.replica == "0"
    assert outcome.output_tokens == 12 and outcome.prompt_tokens > 60
    assert outcome.ttft is not None and 0 < outcome.ttft < outcome.e2e
    assert 1 <= len(outcome.itl) <= 11 and sum(outcome.itl) <= outcome.e2e - outcome.ttft
    assert count_tokens(outcome.text, special=False) == 12  # the text is the tokens it counts


async def test_multi_turn_resends_answers_so_later_turns_hit_the_cache(tmp_path: Path) -> None:
    workload = to_dict(MultiTurn(turns=3, first_tokens=200, turn_tokens=20, output_tokens=16))
    async with run_replicas(1, speed=50.0) as replicas:
        replica = replicas[0]
        job = ClientJob(
            index=0, shares=[2], targets=[f"http://{replica.address}"], model=replica.config.model_name,
            workload=workload, seed=3, result_path=str(tmp_path / "r.json"), max_requests=9,
        )  # fmt: skip
        result = await run_job(job)
        page = (await scrape_counters([replica.address]))[replica.address]
    assert result.completed == 9 and not result.errors
    assert result.replicas == {"0": 9}
    # Turns 2 and 3 of each conversation find at least the first turn's 200 prompt tokens cached.
    assert page["vllm:prefix_cache_hits_total"] >= 6 * 192


@pytest.mark.parametrize("kind", ["http", "no-done", "cut", "slow", "error-event", "garbage"])
async def test_failures_are_classified(kind: str, serve, tmp_path: Path) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        if kind == "http":
            return web.json_response({"error": "busy"}, status=503)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": [{"index": 0, "text": " abc"}]}\n\n')
        if kind == "error-event":
            await response.write(b'data: {"error": {"message": "engine died", "code": 500}}\n\n')
        elif kind == "garbage":
            await response.write(b"data: <html>\n\n")
        elif kind == "cut":
            assert request.transport is not None
            request.transport.close()
        elif kind == "slow":
            await asyncio.Event().wait()  # hangs until the client gives up
        await response.write_eof()
        return response

    url = await serve(handler)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as http:
        outcome = await stream_request(http, f"{url}/v1/completions", completion())
    expected = {
        "http": "http_503", "no-done": "truncated", "cut": "truncated", "slow": "timeout",
        "error-event": "stream_error", "garbage": "malformed",
    }  # fmt: skip
    assert outcome.error == expected[kind]


async def test_nothing_listening_is_a_connection_error(http: aiohttp.ClientSession) -> None:
    outcome = await stream_request(http, f"http://127.0.0.1:{free_port()}/v1/completions", completion())
    assert outcome.error == "connection"


async def test_errors_are_counted_and_the_run_still_ends(serve, tmp_path: Path) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": "no"}, status=429)

    url = await serve(refuse)
    workload = to_dict(Uniform(input_tokens=8, output_tokens=2))
    job = ClientJob(
        index=0, shares=[3], targets=[url], model="m", workload=workload, seed=0,
        result_path=str(tmp_path / "r.json"), max_requests=7,
    )  # fmt: skip
    result = await run_job(job)
    assert result.completed == 0 and result.errors == {"http_429": 7}
    assert not result.ttft


async def test_ramp_up_starts_each_worker_at_its_slot_across_clients(serve, tmp_path: Path) -> None:
    arrivals: list[float] = []

    async def record(request: web.Request) -> web.Response:
        arrivals.append(time.monotonic())
        await asyncio.sleep(0.3)  # busy long enough that the other worker takes the other session
        return web.json_response({"error": "no"}, status=429)

    url = await serve(record)
    job = ClientJob(
        index=1, shares=[2, 2], targets=[url], model="m", workload=to_dict(Uniform(input_tokens=8)), seed=0,
        result_path=str(tmp_path / "r.json"), max_requests=4, ramp_up=0.4,
    )  # fmt: skip
    result = await run_job(job)
    # Client 1 runs the 3rd and 4th of 4 workers: they start 0.2 s and 0.3 s into the run.
    offsets = sorted(t - result.started for t in arrivals)
    assert len(offsets) == result.errors.total() == 2
    assert offsets[0] == pytest.approx(0.2, abs=0.05) and offsets[1] == pytest.approx(0.3, abs=0.05)


async def test_shared_prefix_warm_up_primes_every_prefix_before_the_measured_run(tmp_path: Path) -> None:
    workload = SharedPrefix(groups=3, prefix_tokens=256, question_tokens=16, output_tokens=4)
    async with run_replicas(1, speed=50.0) as replicas:
        replica = replicas[0]
        job = ClientJob(
            index=0, shares=[2], targets=[f"http://{replica.address}"], model=replica.config.model_name,
            workload=to_dict(workload), seed=5, result_path=str(tmp_path / "r.json"), max_requests=6,
        )  # fmt: skip
        async with aiohttp.ClientSession() as http:
            client = Client(job, http)
            await client.warm_up()
            primed = (await scrape_counters([replica.address]))[replica.address]
            result = await client.run()
        after = (await scrape_counters([replica.address]))[replica.address]
    assert primed["vllm:prefix_cache_queries_total"] >= 3 * 256  # each group's prefix once
    assert result.completed == 6  # warm-up requests are not counted
    # Every measured request finds its group's prefix (whole 16-token blocks) already cached.
    hits = after["vllm:prefix_cache_hits_total"] - primed["vllm:prefix_cache_hits_total"]
    assert hits >= 6 * 240


async def refusing_replica(serve: Callable[[Handler], Awaitable[str]]) -> tuple[str, list[float]]:
    """A replica that answers every request 429 at once; its URL and the requests' arrival times."""
    arrivals: list[float] = []

    async def record(request: web.Request) -> web.Response:
        arrivals.append(time.monotonic())
        return web.json_response({"error": "no"}, status=429)

    return await serve(record), arrivals


async def test_open_loop_arrivals_follow_the_seeded_poisson_schedule(serve, tmp_path: Path) -> None:
    url, arrivals = await refusing_replica(serve)
    job = ClientJob(
        index=0, shares=[50], targets=[url], model="m", workload=to_dict(Uniform(input_tokens=8)), seed=4,
        result_path=str(tmp_path / "r.json"), max_requests=8, request_rate=20.0,
    )  # fmt: skip
    result = await run_job(job)
    rng = random.Random("arrivals-4-0")
    expected = list(itertools.accumulate(rng.expovariate(20.0) for _ in range(7)))
    measured = [t - arrivals[0] for t in arrivals[1:]]
    assert result.errors.total() == 8
    assert measured == pytest.approx(expected, abs=0.03)  # not a burst: each at its arrival time


async def test_a_timed_window_offers_exactly_its_rate_split_over_the_clients(serve, tmp_path: Path) -> None:
    url, arrivals = await refusing_replica(serve)
    stage = Stage(rate=40.0, duration=0.5)  # 20 requests in all, whatever Poisson's draw
    counts = []
    for index in (0, 1):
        job = ClientJob(
            index=index, shares=[3, 1], targets=[url], model="m", workload=to_dict(Uniform(input_tokens=8)),
            seed=4, result_path=str(tmp_path / f"r{index}.json"), stages=[stage],
        )  # fmt: skip
        arrivals.clear()
        async with aiohttp.ClientSession() as http:
            result = await Client(job, http).run(stage, 0)
        counts.append(result.errors.total())
        assert arrivals[-1] - arrivals[0] < 0.5  # all within the window
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        assert max(gaps) > 2 * min(gaps) + 0.005  # Poisson's bursts, not a metronome
    assert counts == [15, 5]


async def test_open_loop_never_exceeds_the_concurrency_cap(serve, tmp_path: Path) -> None:
    in_flight = peak = 0

    async def hold(request: web.Request) -> web.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.1)  # service time: arrivals (100/s) outpace 2 slots
        in_flight -= 1
        return web.json_response({"error": "no"}, status=429)

    url = await serve(hold)
    job = ClientJob(
        index=0, shares=[2], targets=[url], model="m", workload=to_dict(Uniform(input_tokens=8)), seed=0,
        result_path=str(tmp_path / "r.json"), max_requests=8, request_rate=100.0,
    )  # fmt: skip
    result = await run_job(job)
    assert result.errors.total() == 8 and peak == 2
    assert result.ended - result.started >= 0.4  # 8 requests through 2 slots of 0.1 s
