"""The reasons for latency a real vLLM has, observed from outside over HTTP (issue 3's list)."""

from __future__ import annotations

import asyncio
import random

import pytest

from loadtest.text import sized_text
from tests.sim.conftest import client_for, scrape, spy_on_submissions, timed_completion, value
from vllm_sim.server import run_replicas

SMALL_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def text(tokens: int, seed: int) -> str:
    """Distinct text of `tokens` tokens (BOS included) per seed: no block is shared between seeds."""
    return sized_text(random.Random(seed), tokens - 1)


async def test_shared_prefix_cuts_ttft_and_counts_hits() -> None:
    shared = text(3000, 1)  # a 3000-token system prompt: ~97 ms of H100 prefill
    async with run_replicas(profiles="h100-8b") as (replica,), client_for(replica) as http:
        cold, _ = await timed_completion(http, prompt=shared + " first question", max_tokens=2)
        warm, usage = await timed_completion(http, prompt=shared + " second question", max_tokens=2)
        samples = await scrape(http)
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 2992
    assert value(samples, "vllm:prefix_cache_hits_total", SMALL_MODEL) >= 2992
    assert warm < cold / 3, (cold, warm)


async def test_enough_distinct_prompts_evict_an_old_prefix() -> None:
    # The small profile caches 4096 tokens; four more 2000-token prompts push the first one out.
    first = text(2000, 0)
    async with run_replicas(profiles="small") as (replica,), client_for(replica) as http:
        await timed_completion(http, prompt=first, max_tokens=1)
        hit_ttft, hit = await timed_completion(http, prompt=first, max_tokens=1)
        for seed in range(1, 5):
            await timed_completion(http, prompt=text(2000, seed), max_tokens=1)
        evicted_ttft, evicted = await timed_completion(http, prompt=first, max_tokens=1)
    assert hit["prompt_tokens_details"]["cached_tokens"] >= 1984
    assert evicted["prompt_tokens_details"]["cached_tokens"] == 0
    assert evicted_ttft > 3 * hit_ttft, (hit_ttft, evicted_ttft)


async def test_requests_beyond_max_num_seqs_queue_and_all_complete(monkeypatch: pytest.MonkeyPatch) -> None:
    count, max_tokens = 12, 300  # the small profile runs 8 sequences at once
    async with run_replicas(profiles="small", speed=5) as (replica,), client_for(replica) as http:
        submitted = spy_on_submissions(replica, monkeypatch)
        bodies = [{"prompt": text(50, i), "max_tokens": max_tokens} for i in range(count)]
        requests = [asyncio.create_task(http.post("/v1/completions", json=body)) for body in bodies]
        for _ in range(count):
            await asyncio.wait_for(submitted.get(), 10)
        busy = await scrape(http)
        responses = await asyncio.gather(*requests)
        done = await scrape(http)
    assert value(busy, "vllm:num_requests_running", SMALL_MODEL) == 8
    assert value(busy, "vllm:num_requests_waiting", SMALL_MODEL) == count - 8
    assert [r.json()["usage"]["completion_tokens"] for r in responses] == [max_tokens] * count
    assert value(done, "vllm:request_success_total", SMALL_MODEL, finished_reason="length") == count
    assert value(done, "vllm:num_requests_waiting", SMALL_MODEL) == 0


async def test_kv_pressure_preempts_and_every_request_still_completes() -> None:
    # 8 sequences growing to 400 + 300 tokens need 352 blocks; the small profile has 256.
    async with run_replicas(profiles="small", speed=10) as (replica,), client_for(replica) as http:
        bodies = [{"prompt": text(400, i), "max_tokens": 300} for i in range(8)]
        responses = await asyncio.gather(*(http.post("/v1/completions", json=body) for body in bodies))
        samples = await scrape(http)
    assert [r.json()["usage"]["completion_tokens"] for r in responses] == [300] * 8
    assert value(samples, "vllm:num_preemptions_total", SMALL_MODEL) > 0
    assert replica.engine.kv.usage == 0


async def test_slow_profile_is_measurably_slower_than_fast() -> None:
    request = {"prompt": text(1000, 3), "max_tokens": 20}
    async with run_replicas(2, profiles=["fast", "slow"], speed=2) as replicas:
        timings = []
        for replica in replicas:
            async with client_for(replica) as http:
                loop = asyncio.get_running_loop()
                started = loop.time()
                response = await http.post("/v1/completions", json=request)
                assert response.status_code == 200
                timings.append(loop.time() - started)
    fast, slow = timings
    # Model: ~160 ms on H100 vs ~575 ms on L40S (before the 2x speed-up).
    assert slow > 2 * fast, timings
