"""Fixtures and helpers: simulated replicas on free ports, scraped and timed over HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vllm_sim.engine import SimRequest
from vllm_sim.profiles import Profile, StepCost
from vllm_sim.server import Replica, SimConfig, run_replicas

MODEL = "sim-model"
FAST = Profile(
    name="fast-test",
    model=MODEL,
    cost=StepCost(1.0, 0.001, 0.01, 0.001),  # ~1 ms steps
    num_gpu_blocks=512,
    max_num_batched_tokens=2048,
    max_num_seqs=64,
    max_model_len=4096,
)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
async def replica() -> AsyncIterator[Replica]:
    async with run_replicas(profiles=FAST, config=SimConfig(lora_adapters=("adapter-a",))) as (running,):
        yield running


@pytest.fixture
async def http(replica: Replica) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(replica) as client:
        yield client


def client_for(replica: Replica) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://{replica.address}", timeout=30)


async def scrape(http: httpx.AsyncClient) -> Samples:
    response = await http.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, model: str = MODEL, **labels: str) -> float:
    wanted = {"model_name": model, "engine": "0", **labels}
    return samples[(name, frozenset(wanted.items()))]


def spy_on_submissions(replica: Replica, monkeypatch: pytest.MonkeyPatch) -> asyncio.Queue[SimRequest]:
    """Queue every request the replica's engine accepts, as it is submitted."""
    submitted: asyncio.Queue[SimRequest] = asyncio.Queue()
    submit = replica.engine.submit

    def spy(*args: Any, **kwargs: Any) -> SimRequest:
        request = submit(*args, **kwargs)
        submitted.put_nowait(request)
        return request

    monkeypatch.setattr(replica.engine, "submit", spy)
    return submitted


async def timed_completion(http: httpx.AsyncClient, **body: Any) -> tuple[float, dict[str, Any]]:
    """Stream a completion; return the client-side time to first token and the usage."""
    request = {**body, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    ttft = None
    usage: dict[str, Any] = {}
    async with http.stream("POST", "/v1/completions", json=request) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = orjson.loads(line[6:])
            if ttft is None and event["choices"] and event["choices"][0]["text"]:
                ttft = time.perf_counter() - started
            usage = event.get("usage") or usage
    assert ttft is not None
    return ttft, usage
