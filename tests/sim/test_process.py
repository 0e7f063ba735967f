"""`python -m vllm_sim` in a child process, through SimProcess."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from loadtest.processes import SimProcess
from vllm_sim import REPLICA_HEADER
from vllm_sim.cli import kv_events_from_args, parse_args, profiles_from_args


async def test_child_process_serves_each_replica_and_exits_cleanly_on_sigterm() -> None:
    sim = SimProcess("--port", "0", "--profiles", "fast,slow", "--speed", "100", "--model", "m")
    async with sim:
        assert len(set(sim.addresses)) == 2 and sim.profiles == ["h100-8b", "l40s-8b"]
        process = sim.process
        assert process is not None
        async with httpx.AsyncClient(timeout=10) as http:
            for index, address in enumerate(sim.addresses):
                response = await http.post(
                    f"http://{address}/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2}
                )
                assert response.status_code == 200
                assert response.headers[REPLICA_HEADER] == str(index)
    assert process.returncode == 0
    host, port = sim.addresses[0].rsplit(":", 1)
    with pytest.raises(OSError):
        await asyncio.open_connection(host, int(port))


async def test_a_child_that_cannot_start_is_reported() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:  # the simulator cannot bind this port
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="exited with 1"):
            async with SimProcess("--port", str(port)):
                pass


def test_bad_arguments_are_rejected_before_starting() -> None:
    with pytest.raises(ValueError, match="invalid simulator arguments"):
        SimProcess("--profiles", "fast,nonesuch")
    with pytest.raises(ValueError):
        SimProcess("--replicas", "3", "--profiles", "fast,slow")


def test_replica_count_follows_profiles_and_capacity_flags_apply_to_each() -> None:
    args = parse_args(["--profiles", "slow,fast,slow", "--num-gpu-blocks", "64", "--max-num-seqs", "4"])
    assert args.replicas == 3
    profiles = profiles_from_args(args)
    assert [p.name for p in profiles] == ["l40s-8b", "h100-8b", "l40s-8b"]
    assert {(p.num_gpu_blocks, p.max_model_len, p.max_num_seqs) for p in profiles} == {(64, 64 * 16, 4)}
    assert profiles[0].max_num_batched_tokens == 2048  # the rest of the profile is kept


def test_kv_event_ports_count_up_per_replica() -> None:
    args = ["--replicas", "3", "--kv-events-port", "5557", "--kv-events-replay-port", "6557"]
    events = kv_events_from_args(parse_args([*args, "--kv-events-encoding", "map"]))
    assert events is not None and events.encoding == "map"
    assert [(e.port, e.replay_port) for e in map(events.offset, range(3))] == [
        (5557, 6557), (5558, 6558), (5559, 6559)
    ]  # fmt: skip
    assert kv_events_from_args(parse_args(["--replicas", "2"])) is None  # off by default
    with pytest.raises(SystemExit):
        parse_args(["--kv-events-encoding", "json"])
