"""The picker learns each simulated replica's characters per token from its own traffic."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from loadtest.processes import SimProcess, poll_until


@pytest.fixture
async def pool() -> AsyncIterator[list[str]]:
    async with SimProcess("--replicas", "2", "--port", "0", "--speed", "20") as sim:
        yield sim.addresses


async def test_characters_per_token_converge_on_what_the_engine_counted(
    pool, picker_server, envoy, client
) -> None:
    picker = await picker_server(pool)
    proxy = await envoy("picker", endpoints=pool, picker=[picker.address])
    rng = random.Random(3)
    # Numbers tokenize at about 2 characters a token, far from the prior of 4.
    prompts = [" ".join(str(rng.randrange(10**6)) for _ in range(300)) for _ in range(40)]

    async def send(prompt: str) -> int:
        body = {"model": "meta-llama/Llama-3.1-8B-Instruct", "prompt": prompt, "max_tokens": 2}
        response = await client.post(proxy.url + "/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return int(response.json()["usage"]["prompt_tokens"])

    tokens = await asyncio.gather(*(send(p) for p in prompts))
    truth = sum(map(len, prompts)) / sum(tokens)
    assert truth < 2.5
    debug = f"http://127.0.0.1:{picker.metrics_port}/debug/endpoints"

    async def calibrated() -> list[float] | None:
        rows = (await client.get(debug)).json()["endpoints"]
        values = [row["chars_per_token"] for row in rows]
        return values if None not in values else None

    for value in await poll_until(calibrated, within=10.0, what="calibration"):
        assert value == pytest.approx(truth, rel=0.1)
