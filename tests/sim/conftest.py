"""Fixtures: a simulated replica on a free port, with a fast profile for quick tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from loadtest.sim.profiles import Profile, StepCost
from loadtest.sim.server import Replica, SimConfig

FAST = Profile(
    name="fast",
    model="sim-model",
    cost=StepCost(1.0, 0.001, 0.01, 0.001),  # ~1 ms steps
    num_gpu_blocks=512,
    max_num_batched_tokens=2048,
    max_num_seqs=64,
    max_model_len=4096,
)


@pytest.fixture
async def replica() -> AsyncIterator[Replica]:
    async with Replica(SimConfig(profile=FAST, lora_adapters=("adapter-a",))) as running:
        yield running


@pytest.fixture
async def http(replica: Replica) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://{replica.address}", timeout=10) as client:
        yield client
