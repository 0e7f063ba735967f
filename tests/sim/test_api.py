"""The replica's HTTP surface: OpenAI API shapes, metrics exposition, errors and disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator

import aiohttp
import httpx
import openai
import pytest

from picker.datalayer.metrics import parse_metrics
from tests.sim.conftest import (
    FAST,
    MODEL,
    client_for,
    scrape,
    spy_on_submissions,
    value,
)
from tests.support.tokens import count_tokens, llama3_chat
from vllm_sim.engine import Status
from vllm_sim.profiles import PROFILES
from vllm_sim.server import REPLICA_HEADER, Replica, SimConfig, run_replicas


@pytest.fixture
async def sdk(replica: Replica) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official client, closed after the test: left to the garbage collector, it schedules
    its own close on whatever event loop is running then (another test's, or a closed one)."""
    base_url = f"http://{replica.address}/v1"
    async with openai.AsyncOpenAI(api_key="unused", base_url=base_url, max_retries=0) as client:
        yield client


async def test_streaming_chat_through_the_openai_sdk(replica: Replica, sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert count_tokens(text, special=False) == 12
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == count_tokens(llama3_chat(("user", "hello")), special=False)


async def test_completion_without_streaming(replica: Replica, sdk: openai.AsyncOpenAI) -> None:
    prompt = "the state of the world is good and we know it " * 5
    result = await sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=5)
    assert result.object == "text_completion" and result.model == MODEL
    assert count_tokens(result.choices[0].text, special=False) == 5
    assert result.choices[0].finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (count_tokens(prompt), 5)


async def test_chat_without_max_tokens_stops_at_the_default(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == SimConfig().default_max_tokens


async def test_min_tokens_draws_a_seeded_length_and_ends_with_stop(http: httpx.AsyncClient) -> None:
    request = {"prompt": "x", "max_tokens": 400, "min_tokens": 10, "seed": 7}
    lengths = set()
    for _ in range(2):
        body = (await http.post("/v1/completions", json=request)).json()
        lengths.add(body["usage"]["completion_tokens"])
        assert body["choices"][0]["finish_reason"] == "stop"
    (length,) = lengths  # the same seed gives the same length
    assert 10 <= length < 400


async def test_every_response_names_its_replica() -> None:
    async with run_replicas(2, profiles=FAST) as replicas:
        for index, replica in enumerate(replicas):
            async with client_for(replica) as http:
                for response in (
                    await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}),
                    await http.post("/v1/completions", content=b"{"),
                    await http.get("/metrics"),
                ):
                    assert response.headers[REPLICA_HEADER] == str(index)


async def test_run_replicas_wants_one_profile_per_replica() -> None:
    with pytest.raises(ValueError, match="2 profiles given for 3 replicas"):
        async with run_replicas(3, profiles=["fast", "slow"]):
            pass


async def test_repeated_prompt_reports_cached_tokens(http: httpx.AsyncClient) -> None:
    request = {"prompt": "shared system prompt " * 40, "max_tokens": 2}
    first = (await http.post("/v1/completions", json=request)).json()["usage"]
    second = (await http.post("/v1/completions", json=request)).json()["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["prompt_tokens_details"]["cached_tokens"] == (second["prompt_tokens"] - 1) // 16 * 16
    samples = await scrape(http)
    assert value(samples, "vllm:prefix_cache_hits_total") == second["prompt_tokens_details"]["cached_tokens"]
    assert value(samples, "vllm:prefix_cache_queries_total") == 2 * first["prompt_tokens"]


async def test_next_chat_turn_reuses_the_previous_answer(http: httpx.AsyncClient) -> None:
    question = "What is a KV cache? " * 8
    turn1 = [{"role": "user", "content": question}]
    first = (await http.post("/v1/chat/completions", json={"messages": turn1, "max_tokens": 40})).json()
    answer = first["choices"][0]["message"]["content"]
    turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "Why?"}]
    second = (await http.post("/v1/chat/completions", json={"messages": turn2, "max_tokens": 1})).json()
    # The cache holds the first prompt and most of the answer, not just the first prompt.
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > first["usage"]["prompt_tokens"]


async def test_metrics_follow_a_request_in_flight(replica: Replica, http: httpx.AsyncClient) -> None:
    request = {"prompt": "p" * 400, "max_tokens": 3000, "stream": True}
    async with http.stream("POST", "/v1/completions", json=request) as response:
        assert response.status_code == 200
        await anext(response.aiter_lines())
        busy = await scrape(http)
        assert value(busy, "vllm:num_requests_running") == 1
        assert value(busy, "vllm:num_requests_waiting") == 0
        assert value(busy, "vllm:kv_cache_usage_perc") > 0
        (sim,) = replica.engine.running
    await asyncio.wait_for(sim.ended.wait(), 5)
    idle = await scrape(http)
    assert value(idle, "vllm:num_requests_running") == 0
    assert value(idle, "vllm:kv_cache_usage_perc") == 0
    assert value(idle, "vllm:request_success_total", finished_reason="abort") == 1
    (info,) = [dict(labels) for name, labels in idle if name == "vllm:cache_config_info"]
    assert info["engine"] == "0" and "model_name" not in info  # as vLLM labels it
    assert (info["block_size"], info["num_gpu_blocks"]) == ("16", "512")
    assert info["enable_prefix_caching"] == "True"


async def test_latency_histograms_and_counters(http: httpx.AsyncClient) -> None:
    prompt = "q" * 40
    for _ in range(3):
        await http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4})
    samples = await scrape(http)
    assert value(samples, "vllm:time_to_first_token_seconds_count") == 3
    assert value(samples, "vllm:inter_token_latency_seconds_count") == 9
    assert value(samples, "vllm:e2e_request_latency_seconds_count") == 3
    assert value(samples, "vllm:request_queue_time_seconds_count") == 3
    assert value(samples, "vllm:generation_tokens_total") == 12
    assert value(samples, "vllm:prompt_tokens_total") == 3 * count_tokens(prompt)
    assert value(samples, "vllm:request_success_total", finished_reason="length") == 3


async def test_lora_adapters_are_served_and_reported(http: httpx.AsyncClient) -> None:
    models = (await http.get("/v1/models")).json()["data"]
    assert [(m["id"], m["parent"]) for m in models] == [(MODEL, None), ("adapter-a", MODEL)]
    request = {"model": "adapter-a", "prompt": "x", "max_tokens": 3000, "stream": True}
    async with http.stream("POST", "/v1/completions", json=request) as response:
        first = await anext(response.aiter_lines())
        assert '"model":"adapter-a"' in first
        samples = await scrape(http)
    (info,) = [labels for name, labels in samples if name == "vllm:lora_requests_info"]
    assert dict(info) == {"max_lora": "1", "running_lora_adapters": "adapter-a", "waiting_lora_adapters": ""}


async def test_client_disconnect_aborts_a_stream(replica: Replica, http: httpx.AsyncClient) -> None:
    request = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3000, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=request) as response:
        await anext(response.aiter_lines())
        (sim,) = replica.engine.running
    await asyncio.wait_for(sim.ended.wait(), 5)
    assert sim.status is Status.ABORTED and len(sim.generated) < 3000
    assert replica.engine.kv.usage == 0


async def test_client_disconnect_aborts_a_non_streaming_request(
    replica: Replica, monkeypatch: pytest.MonkeyPatch
) -> None:
    submitted = spy_on_submissions(replica, monkeypatch)
    host, port = replica.address.rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port))
    body = b'{"prompt": "x", "max_tokens": 3000}'
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    sim = await asyncio.wait_for(submitted.get(), 5)
    await asyncio.wait_for(sim.progress.wait(), 5)  # generating: the request holds KV blocks
    assert replica.engine.kv.usage > 0
    writer.close()
    await writer.wait_closed()
    await asyncio.wait_for(sim.ended.wait(), 5)
    assert sim.status is Status.ABORTED and replica.engine.kv.usage == 0


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/v1/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/completions", b"[1, 2]", 400, "must be a JSON object"),
        ("/v1/completions", b'{"model": "other", "prompt": "x"}', 404, "does not exist"),
        ("/v1/chat/completions", b'{"prompt": "x"}', 400, "'messages' is required"),
        ("/v1/chat/completions", b'{"messages": "hi"}', 400, "'messages' must be an array"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 5, "min_tokens": 6}', 400, "min_tokens"),
        ("/v1/completions", b'{"prompt": "x", "n": 2}', 400, "n=1"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 4096}', 400, "maximum context length is 4096"),
    ],
)
async def test_invalid_requests_get_openai_errors(
    http: httpx.AsyncClient, path: str, body: bytes, status: int, fragment: str
) -> None:
    response = await http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    assert fragment in response.json()["error"]["message"]


async def test_sdk_raises_not_found_for_an_unknown_model(replica: Replica, sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        await sdk.completions.create(model="missing", prompt="x", max_tokens=1)


async def test_health(http: httpx.AsyncClient) -> None:
    assert (await http.get("/health")).status_code == 200


async def test_stop_closes_open_streams_promptly() -> None:
    replica = Replica(SimConfig(profile=FAST))
    await replica.start()
    request = {"prompt": "x", "max_tokens": 3000, "stream": True}
    try:
        async with client_for(replica) as http:
            async with http.stream("POST", "/v1/completions", json=request) as response:
                await anext(response.aiter_lines())
                started = time.monotonic()
                await replica.stop()
                assert time.monotonic() - started < 2
            with pytest.raises(httpx.ConnectError):
                await http.get("/health")
    finally:
        await replica.stop()


async def test_h100_profile_ttft_matches_its_step_model() -> None:
    """Wall-clock calibration: a cold 1000-token prompt takes one ~36.5 ms prefill step."""
    profile = PROFILES["h100-8b"]
    expected = profile.cost.seconds(1000, 0, 1000)
    async with run_replicas(profiles=profile, model=MODEL) as (replica,), client_for(replica) as http:
        await http.post("/v1/completions", json={"prompt": "t" * 4000, "max_tokens": 1})
        samples = await scrape(http)
    ttft = value(samples, "vllm:time_to_first_token_seconds_sum")
    assert expected <= ttft < expected + 0.05


async def test_clients_leaving_at_any_moment_leave_no_errors_and_no_load(
    replica: Replica, caplog: pytest.LogCaptureFixture
) -> None:
    """Disconnects land before the headers, between chunks or mid-write; none is a server error."""
    rng = random.Random(3)
    request = {"prompt": "x" * 40, "max_tokens": 200, "stream": True}

    async def leave_early(session: aiohttp.ClientSession) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(rng.uniform(0, 0.15)):
                async with session.post(f"http://{replica.address}/v1/completions", json=request) as r:
                    async for _ in r.content:
                        pass

    with caplog.at_level(logging.ERROR, logger="aiohttp"):
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(leave_early(session) for _ in range(150)))
        async with client_for(replica) as http:  # served after all the others: they are settled
            response = await http.post("/v1/completions", json={"prompt": "y", "max_tokens": 1})
            assert response.status_code == 200
    assert [r.getMessage() for r in caplog.records] == []
    assert replica.engine.running == [] and not replica.engine.waiting and replica.engine.kv.usage == 0


async def test_the_pickers_metrics_parser_reads_the_page() -> None:
    """Contract with picker.datalayer.metrics: load, KV capacity and LoRA state all come across."""
    config = SimConfig(lora_adapters=("a", "b"), max_loras=1)
    async with run_replicas(profiles="small", config=config) as (replica,), client_for(replica) as http:
        first = {"model": "a", "prompt": "x" * 800, "max_tokens": 3000, "stream": True}
        second = {**first, "model": "b"}
        async with (
            http.stream("POST", "/v1/completions", json=first) as a,
            http.stream("POST", "/v1/completions", json=second),
        ):
            await anext(a.aiter_lines())
            metrics = parse_metrics((await http.get("/metrics")).content)
    assert (metrics.running, metrics.waiting) == (1, 1)  # one adapter per batch: b waits
    assert metrics.kv_usage > 0
    assert (metrics.block_size, metrics.num_gpu_blocks, metrics.max_lora) == (16, 256, 1)
    assert (metrics.running_loras, metrics.waiting_loras) == ({"a"}, {"b"})


async def test_cache_probe_reports_the_hit_a_request_would_get_and_the_queue(
    replica: Replica, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = "the same long shared prefix " * 40
    probe = {"model": MODEL, "prompt": prompt}
    cold = (await http.post("/sim/cache_probe", json=probe)).json()
    assert cold["cached_tokens"] == 0 and cold["running"] == cold["waiting"] == 0
    assert cold["prompt_tokens"] == (await http.post("/tokenize", json=probe)).json()["count"]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    usage = (await http.post("/v1/completions", json=body)).json()["usage"]
    warm = (await http.post("/sim/cache_probe", json=probe)).json()
    assert warm["cached_tokens"] == usage["prompt_tokens"] // 16 * 16 > 0  # whole blocks, as admitted
    assert warm["estimated_ttft_ms"] < cold["estimated_ttft_ms"]  # less to prefill
    submitted = spy_on_submissions(replica, monkeypatch)
    async with asyncio.TaskGroup() as started:  # a long request queued ahead makes the estimate grow
        started.create_task(
            http.post("/v1/completions", json={"model": MODEL, "prompt": "other " * 1500, "max_tokens": 200})
        )
        await submitted.get()
        busy = (await http.post("/sim/cache_probe", json=probe)).json()
        assert busy["running"] + busy["waiting"] == 1
        assert busy["estimated_ttft_ms"] > warm["estimated_ttft_ms"]
    missing = await http.post("/sim/cache_probe", json={"model": "no-such-model", "prompt": "x"})
    assert missing.status_code == 404
