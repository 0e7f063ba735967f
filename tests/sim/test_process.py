"""`python -m loadtest.sim` in a child process, through SimProcess."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from loadtest.sim import REPLICA_HEADER, SimProcess
from loadtest.sim.__main__ import config_from_args, parse_args


async def test_child_process_serves_each_replica_on_its_own_port_and_exits_on_stop() -> None:
    sim = SimProcess("--replicas", "2", "--time-scale", "0.01", "--model", "m")
    async with sim:
        assert len(sim.addresses) == 2 and len(set(sim.addresses)) == 2
        process = sim.process
        assert process is not None
        async with httpx.AsyncClient(timeout=10) as http:
            for address in sim.addresses:
                response = await http.post(
                    f"http://{address}/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2}
                )
                assert response.status_code == 200
                assert response.headers[REPLICA_HEADER] == address
    assert process.returncode == 0  # SIGTERM is a clean shutdown
    host, port = sim.addresses[0].rsplit(":", 1)
    with pytest.raises(OSError):
        await asyncio.open_connection(host, int(port))


async def test_a_child_that_cannot_start_is_reported() -> None:
    with pytest.raises(RuntimeError, match="exited with 2"):
        async with SimProcess("--profile", "no-such-profile"):
            pass


def test_num_gpu_blocks_override_caps_the_context_length() -> None:
    config = config_from_args(parse_args(["--profile", "l40s-8b", "--num-gpu-blocks", "64", "--lora", "a,b"]))
    assert config.profile.num_gpu_blocks == 64 and config.profile.max_model_len == 64 * 16
    assert config.profile.max_num_batched_tokens == 2048  # the rest of the profile is kept
    assert config.lora_adapters == ("a", "b")
