"""Trace replay: Mooncake-format records become prompts that share tokens exactly where their hash
ids are equal, sent at the trace's (scaled) arrival times."""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from loadtest import cli
from loadtest.client import Client, ClientJob, Stage
from loadtest.observe import scrape_counters
from loadtest.trace import BLOCK_TOKENS, TraceRecord, load_trace, prompt_text
from loadtest.workloads import TraceReplay, to_dict
from tests.support.fake_vllm import FakeVLLM
from tests.support.tokens import TOKENIZER
from vllm_sim import run_replicas

# Block ids as Mooncake writes them: 0 is everyone's system prompt; 1-2 a conversation's history.
RECORDS = [
    {"timestamp": 0, "input_length": 1536, "output_length": 5, "hash_ids": [0, 1, 2]},
    {"timestamp": 100, "input_length": 1300, "output_length": 0, "hash_ids": [0, 1, 3]},
    {"timestamp": 250, "input_length": 300, "output_length": 2, "hash_ids": [4]},
    {"timestamp": 400, "input_length": 2000, "output_length": 3, "hash_ids": [0, 1, 2, 5]},
    {"timestamp": 900, "input_length": 700, "output_length": 1, "hash_ids": [0, 6]},
    {"timestamp": 950, "input_length": 1200, "output_length": 1, "hash_ids": [0, 1, 2]},  # a short block 2
]


def write_trace(path: Path, records: list[dict[str, object]] = RECORDS) -> Path:
    path.write_bytes(b"".join(orjson.dumps(record) + b"\n" for record in records))
    return path


def shared_blocks(a: TraceRecord, b: TraceRecord) -> int:
    """Leading hash ids the two records have in common."""
    return next(
        (i for i, (x, y) in enumerate(zip(a.hash_ids, b.hash_ids, strict=False)) if x != y),
        min(len(a.hash_ids), len(b.hash_ids)),
    )


def common_prefix(x: list[int], y: list[int]) -> int:
    return next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))


def test_prompts_share_tokens_exactly_where_hash_ids_are_equal(tmp_path: Path) -> None:
    records = load_trace(write_trace(tmp_path / "t.jsonl"))
    tokens = [TOKENIZER.encode(prompt_text(record)).ids for record in records]  # BOS added, as served
    assert [len(t) for t in tokens] == [r.input_length for r in records]
    compared = 0
    for i, a in enumerate(records):
        for j, b in enumerate(records[:i]):
            shared = shared_blocks(a, b)
            for k in range(min(len(a.hash_ids), len(b.hash_ids), shared + 1)):
                x, y = (t[k * BLOCK_TOKENS : (k + 1) * BLOCK_TOKENS] for t in (tokens[i], tokens[j]))
                compared += 1
                if k == shared:  # the first different id: different text from its start
                    assert common_prefix(x, y) < 16, (i, j, k)
                elif len(x) == len(y) == BLOCK_TOKENS:  # equal ids, whole blocks: equal tokens
                    assert x == y, (i, j, k)
                else:  # a prompt's short last block: the same block's start, then a few filler tokens
                    assert common_prefix(x, y) >= min(len(x), len(y)) - 8, (i, j, k)
    assert compared >= 15
    text = prompt_text(records[0])
    assert all(word.strip(".").isalpha() for word in text.split())  # words, not hex
    assert 4.2 < len(text) / records[0].input_length < 4.7


def test_records_are_selected_by_count_or_window_and_bad_lines_are_named(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t.jsonl")
    assert [r.timestamp_ms for r in load_trace(path, first=2)] == [0, 100]
    assert [r.timestamp_ms for r in load_trace(path, start_s=0.1, end_s=0.4)] == [100, 250]
    assert len(load_trace(path)) == len(RECORDS)
    assert [r.timestamp_ms for r in load_trace(path, start_s=0.2, first=1)] == [250]
    bad = write_trace(
        tmp_path / "bad.jsonl", [*RECORDS[:2], {"timestamp": 1, "input_length": 600, "hash_ids": [0]}]
    )
    with pytest.raises(ValueError, match=r"bad.jsonl:3: not a Mooncake trace record"):
        load_trace(bad)
    short = write_trace(tmp_path / "short.jsonl", [{**RECORDS[0], "hash_ids": [0, 1]}])
    with pytest.raises(ValueError, match=r"short.jsonl:1: input_length 1536 needs 3 hash ids"):
        load_trace(short)


def test_the_cli_replays_the_selected_records(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser, "run")
    path = write_trace(tmp_path / "t.jsonl")
    args = parser.parse_args(
        ["--workload", "trace", "--trace", str(path), "--trace-window", "0.1:", "--time-scale", "0.5"]
    )
    plan = cli.plan_from_args(argparse.Namespace(**vars(args), command="run"))
    assert plan.workload == TraceReplay(str(path), 0.5, None, 0.1, None) and plan.requests == 5
    with pytest.raises(ValueError, match="needs --trace"):
        cli.plan_from_args(
            argparse.Namespace(**vars(parser.parse_args(["--workload", "trace"])), command="run")
        )


async def recording_replica(
    fake_vllm: Callable[..., Awaitable[list[FakeVLLM]]],
) -> tuple[FakeVLLM, list[tuple[float, int]]]:
    """A fake replica that notes when each request came and its max_tokens, and refuses it (429)."""
    arrivals: list[tuple[float, int]] = []

    async def record(request: web.Request) -> web.Response:
        body = await request.json()
        arrivals.append((time.monotonic(), body["max_tokens"]))
        return web.json_response({"error": "no"}, status=429)

    (replica,) = await fake_vllm(1, completion=record)
    return replica, arrivals


async def test_requests_arrive_at_the_scaled_trace_times(
    fake_vllm: Callable[..., Awaitable[list[FakeVLLM]]], tmp_path: Path
) -> None:
    replica, arrivals = await recording_replica(fake_vllm)
    workload = TraceReplay(str(write_trace(tmp_path / "t.jsonl")), time_scale=0.5)
    job = ClientJob(
        index=0, shares=[8], targets=[replica.url], model="m", workload=to_dict(workload), seed=0,
        result_path=str(tmp_path / "r.json"), max_requests=workload.min_requests,
    )  # fmt: skip
    async with aiohttp.ClientSession() as http:
        result = await Client(job, http).run()
    offsets = [at - arrivals[0][0] for at, _ in arrivals]
    assert offsets == pytest.approx([0.0, 0.05, 0.125, 0.2, 0.45, 0.475], abs=0.03)  # trace ms x 0.5
    assert result.ended - result.started >= 0.475
    assert [tokens for _, tokens in arrivals] == [5, 1, 2, 3, 1, 1]  # output_length (at least 1)


async def test_replay_through_the_simulator_hits_exactly_the_shared_blocks(tmp_path: Path) -> None:
    # The first five records: every block an earlier request shares is whole in it.
    workload = TraceReplay(str(write_trace(tmp_path / "t.jsonl")), time_scale=0.01, first=5)
    records = load_trace(workload.path, first=5)
    async with run_replicas(1, speed=50.0) as (replica,):
        job = ClientJob(
            index=0, shares=[1], targets=[f"http://{replica.address}"], model=replica.config.model_name,
            workload=to_dict(workload), seed=0, result_path=str(tmp_path / "r.json"), max_requests=5,
        )  # fmt: skip
        async with aiohttp.ClientSession() as http:
            result = await Client(job, http).run()
        counters = (await scrape_counters([replica.address]))[replica.address]
    assert result.completed == 5 and result.input_tokens == sum(r.input_length for r in records)
    # One at a time (concurrency 1): each request finds the blocks an earlier one shared with it.
    expected = sum(
        max((shared_blocks(r, earlier) for earlier in records[:i]), default=0) * BLOCK_TOKENS
        for i, r in enumerate(records)
    )
    assert expected == 2 * 512 + 3 * 512 + 512  # requests 2, 4 and 5 (0-based: 1, 3, 4)
    assert counters["vllm:prefix_cache_hits_total"] == expected


async def test_a_ladder_stage_rescales_the_trace_to_its_rate_and_goes_on_from_the_last_one(
    fake_vllm: Callable[..., Awaitable[list[FakeVLLM]]], tmp_path: Path
) -> None:
    replica, arrivals = await recording_replica(fake_vllm)
    workload = TraceReplay(str(write_trace(tmp_path / "t.jsonl")))
    assert workload.mean_rate == pytest.approx(5 / 0.95)  # 6 arrivals over 950 ms
    rate = workload.mean_rate * 2  # twice as fast: every gap halved
    job = ClientJob(
        index=0, shares=[8], targets=[replica.url], model="m", workload=to_dict(workload), seed=0,
        result_path=str(tmp_path / "r.json"), stages=[Stage(rate, max_requests=n) for n in (2, 4)],
    )  # fmt: skip
    async with aiohttp.ClientSession() as http:
        client = Client(job, http)
        first = await client.run(job.stages[0], 0)
        arrivals_first, arrivals[:] = list(arrivals), []
        second = await client.run(job.stages[1], 1)
    assert (first.errors.total(), second.errors.total()) == (2, 4)
    assert [tokens for _, tokens in arrivals_first + arrivals] == [5, 1, 2, 3, 1, 1]  # on from the last
    offsets = [at - arrivals[0][0] for at, _ in arrivals]
    assert offsets == pytest.approx([0.0, 0.075, 0.325, 0.35], abs=0.03)  # trace ms from record 3, x 0.5
