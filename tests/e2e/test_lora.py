"""LoRA affinity and model-name routing end to end: simulated vLLM replicas serving adapters
(one adapter per batch), the picker with a LoRA-serving EndpointPickerConfig, the real Envoy."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from loadtest.processes import SimProcess
from tests.unit.test_config import LORA_SERVING  # the reference-style LoRA profile: lora 3, queue 1
from vllm_sim import REPLICA_HEADER

BASE = "base-llm"
ADAPTERS = ("sql", "chat", "code")


@pytest.fixture
async def pool() -> AsyncIterator[list[str]]:
    args = ("--replicas", "3", "--port", "0", "--model", BASE, "--max-loras", "1")
    args += ("--lora-modules", *(f"{name}=/loras/{name}" for name in ADAPTERS))  # vLLM's spelling
    async with SimProcess(*args) as sim:
        yield sim.addresses


def completion(model: str, tokens: int = 4, **extra: Any) -> dict[str, Any]:
    return {"model": model, "prompt": f"a question for {model}", "max_tokens": tokens, **extra}


async def running_loras(client: httpx.AsyncClient, debug: str) -> dict[str, list[str]]:
    rows = (await client.get(debug)).json()["endpoints"]
    return {row["address"]: (row["metrics"] or {}).get("running_loras", []) for row in rows}


async def test_adapter_requests_follow_the_loaded_adapter(pool, picker_server, envoy, client) -> None:
    picker = await picker_server(pool, "--config-text", LORA_SERVING)
    proxy = await envoy("picker", endpoints=pool, picker=[picker.address])
    debug = f"http://127.0.0.1:{picker.metrics_port}/debug/endpoints"
    url = proxy.url + "/v1/completions"
    async with contextlib.AsyncExitStack() as held:
        # A long "sql" generation keeps that adapter running on one replica (its one slot).
        stream = await held.enter_async_context(
            client.stream("POST", url, json=completion("sql", 3000, stream=True))
        )
        assert stream.status_code == 200
        lines = stream.aiter_lines()  # held: a dropped iterator would close the stream
        await anext(lines)
        home = pool[int(stream.headers[REPLICA_HEADER])]
        async with asyncio.timeout(10):  # until a scrape shows it (every 0.1 s): poll the picker
            while (await running_loras(client, debug))[home] != ["sql"]:  # noqa: ASYNC110 (another process)
                await asyncio.sleep(0.05)

        async def served(model: str) -> str:
            response = await client.post(url, json=completion(model))
            assert response.status_code == 200, response.text
            assert response.json()["model"] == model
            return pool[int(response.headers[REPLICA_HEADER])]

        # The adapter already loaded wins (1.0 vs 0.8 for a free slot); the others avoid the
        # replica whose only slot it holds (0), where they would wait for it.
        assert {await served("sql") for _ in range(5)} == {home}
        assert home not in {await served(adapter) for adapter in ("chat", "code") for _ in range(4)}
        # The base model is resident everywhere: adapter slots do not steer it.
        assert len({await served(BASE) for _ in range(12)}) > 1

    # A model nothing serves is refused by the picker, before any replica sees it.
    missing = await client.post(url, json=completion("no-such-adapter"))
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "The model `no-such-adapter` does not exist."
