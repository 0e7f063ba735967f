"""The replica over HTTP: OpenAI API shapes, prefix caching, metrics, errors and disconnects."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.sim.engine import SimRequest, Status
from loadtest.sim.profiles import PROFILES
from loadtest.sim.server import REPLICA_HEADER, Replica, SimConfig
from tests.sim.conftest import FAST


def sdk(replica: Replica) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key="unused", base_url=f"http://{replica.address}/v1", max_retries=0)


async def scrape(http: httpx.AsyncClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = await http.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    wanted = {"model_name": "sim-model", "engine": "0", **labels}
    return samples[(name, frozenset(wanted.items()))]


async def test_streaming_chat_through_the_openai_sdk(replica: Replica) -> None:
    stream = await sdk(replica).chat.completions.create(
        model="sim-model",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text) == 12 * 4
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == len("user\nhello\nassistant\n") // 4 + 1


async def test_completion_without_streaming(replica: Replica) -> None:
    result = await sdk(replica).completions.create(model="sim-model", prompt="abcd" * 50, max_tokens=5)
    assert result.object == "text_completion" and result.model == "sim-model"
    assert len(result.choices[0].text) == 20 and result.choices[0].finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (50, 5)


async def test_chat_without_max_tokens_stops_at_the_default(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == SimConfig().default_max_tokens


async def test_responses_name_the_replica(replica: Replica, http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert response.headers[REPLICA_HEADER] == replica.address


async def test_repeated_prompt_reports_cached_tokens(http: httpx.AsyncClient) -> None:
    request = {"model": "sim-model", "prompt": "shared system prompt " * 40, "max_tokens": 2}
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
    async with http.stream(
        "POST", "/v1/completions", json={"prompt": "p" * 400, "max_tokens": 4000 - 100, "stream": True}
    ) as response:
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
    info = value(
        idle,
        "vllm:cache_config_info",
        block_size="16",
        cache_dtype="auto",
        enable_prefix_caching="True",
        gpu_memory_utilization="0.9",
        num_cpu_blocks="0",
        num_gpu_blocks="512",
    )
    assert info == 1


async def test_latency_histograms_and_counters(http: httpx.AsyncClient) -> None:
    for _ in range(3):
        await http.post("/v1/completions", json={"prompt": "q" * 40, "max_tokens": 4})
    samples = await scrape(http)
    assert value(samples, "vllm:time_to_first_token_seconds_count") == 3
    assert value(samples, "vllm:inter_token_latency_seconds_count") == 9
    assert value(samples, "vllm:e2e_request_latency_seconds_count") == 3
    assert value(samples, "vllm:request_queue_time_seconds_count") == 3
    assert value(samples, "vllm:generation_tokens_total") == 12
    assert value(samples, "vllm:prompt_tokens_total") == 30
    assert value(samples, "vllm:request_success_total", finished_reason="length") == 3


async def test_lora_adapters_are_served_and_reported(replica: Replica, http: httpx.AsyncClient) -> None:
    models = (await http.get("/v1/models")).json()["data"]
    assert [(m["id"], m["parent"]) for m in models] == [("sim-model", None), ("adapter-a", "sim-model")]
    async with http.stream(
        "POST",
        "/v1/completions",
        json={"model": "adapter-a", "prompt": "x", "max_tokens": 3000, "stream": True},
    ) as response:
        first = await anext(response.aiter_lines())
        assert '"model":"adapter-a"' in first
        samples = await scrape(http)
    (info,) = [labels for name, labels in samples if name == "vllm:lora_requests_info"]
    assert dict(info) == {"max_lora": "1", "running_lora_adapters": "adapter-a", "waiting_lora_adapters": ""}


async def test_client_disconnect_aborts_a_stream(replica: Replica, http: httpx.AsyncClient) -> None:
    async with http.stream(
        "POST", "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 3000, "stream": True},
    ) as response:  # fmt: skip
        await anext(response.aiter_lines())
        (sim,) = replica.engine.running
    await asyncio.wait_for(sim.ended.wait(), 5)
    assert sim.status is Status.ABORTED and len(sim.generated) < 3000
    assert replica.engine.kv.usage == 0


async def test_client_disconnect_aborts_a_non_streaming_request(
    replica: Replica, monkeypatch: pytest.MonkeyPatch
) -> None:
    submitted: asyncio.Queue[SimRequest] = asyncio.Queue()
    submit = replica.engine.submit

    def spy(*args: Any, **kwargs: Any) -> SimRequest:
        request = submit(*args, **kwargs)
        submitted.put_nowait(request)
        return request

    monkeypatch.setattr(replica.engine, "submit", spy)
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
        ("/v1/completions", b'{"model": "other", "prompt": "x"}', 404, "does not exist"),
        ("/v1/chat/completions", b'{"prompt": "x"}', 400, "'messages' is required"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "n": 2}', 400, "n=1"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 4096}', 400, "maximum context length is 4096"),
    ],
)
async def test_invalid_requests_get_openai_errors(
    http: httpx.AsyncClient, path: str, body: bytes, status: int, fragment: str
) -> None:
    response = await http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert fragment in response.json()["error"]["message"]


async def test_sdk_raises_not_found_for_an_unknown_model(replica: Replica) -> None:
    with pytest.raises(openai.NotFoundError):
        await sdk(replica).completions.create(model="missing", prompt="x", max_tokens=1)


async def test_health(http: httpx.AsyncClient) -> None:
    assert (await http.get("/health")).status_code == 200


async def test_stop_closes_open_streams_promptly() -> None:
    replica = Replica(SimConfig(profile=FAST))
    await replica.start()
    request = {"prompt": "x", "max_tokens": 3000, "stream": True}
    try:
        async with httpx.AsyncClient(base_url=f"http://{replica.address}", timeout=10) as http:
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
    config = SimConfig(profile=profile, served_model_name="sim-model")
    async with Replica(config) as replica, httpx.AsyncClient(base_url=f"http://{replica.address}") as http:
        await http.post("/v1/completions", json={"prompt": "t" * 4000, "max_tokens": 1})
        samples = await scrape(http)
    ttft = value(samples, "vllm:time_to_first_token_seconds_sum")
    assert expected <= ttft < expected + 0.05
