"""How many streamed tokens per second one simulator process delivers, and at what CPU cost.

`python -m loadtest sim-bench [--replicas 8] [--streams 64] [--duration 10] [--out FILE]` starts
the simulator as a child process pinned to one core (the client runs on the others), keeps
`--streams` streaming completions open across the replicas for `--duration` seconds and prints
JSON: tokens and SSE events per second received by the clients, and the simulator's CPU use.
`tokens_per_sim_cpu_second` is the throughput one fully used core would carry; tokens are
counted as words received, since the simulator samples whole-word tokens. Then, with the load
gone, it scrapes one replica's `/metrics` `--scrapes` times: the page's size and the simulator's
CPU per scrape (rendering plus HTTP), what a picker's scrape interval costs each replica.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import orjson
import psutil

from loadtest.processes import SimProcess
from loadtest.text import sized_text


@dataclass(slots=True)
class Tally:
    tokens: int = 0
    events: int = 0
    requests: int = 0
    counting: bool = False  # only the measurement window counts


@dataclass(slots=True)
class BenchResult:
    replicas: int
    streams: int
    profile: str
    speed: float
    duration_s: float
    tokens: int
    events: int
    requests: int
    tokens_per_s: float
    events_per_s: float
    sim_cpu_util: float  # share of one core the simulator process used
    tokens_per_sim_cpu_second: float
    client_cpu_util: float
    sim_pinned_to_one_core: bool
    sim_cpu_ms_per_1000_tokens: float
    metrics_page_bytes: int
    metrics_scrape_sim_cpu_ms: float


async def _stream_forever(session: aiohttp.ClientSession, url: str, body: bytes, tally: Tally) -> None:
    headers = {"content-type": "application/json"}
    while True:
        async with session.post(url, data=body, headers=headers) as response:
            response.raise_for_status()
            async for line in response.content:
                if not line.startswith(b"data: {") or not tally.counting:
                    continue
                choices = orjson.loads(line[6:])["choices"]
                tally.events += 1
                if choices:
                    tally.tokens += len(choices[0]["text"].split())
        if tally.counting:
            tally.requests += 1


def _pin(pid: int, cpus: set[int]) -> bool:
    try:
        os.sched_setaffinity(pid, cpus)
    except (AttributeError, OSError):  # not Linux, or not allowed
        return False
    return True


async def run(args: argparse.Namespace) -> BenchResult:
    sim_args = ["--port", "0", "--replicas", str(args.replicas), "--profile", args.profile]
    async with SimProcess(*sim_args, "--speed", str(args.speed)) as sim:
        assert sim.pid is not None
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        pinned = len(cpus) > 1 and _pin(sim.pid, {cpus[0]}) and _pin(0, set(cpus[1:]))
        sim_process = psutil.Process(sim.pid)
        prompt = sized_text(random.Random(0), args.prompt_tokens)
        body = orjson.dumps({"prompt": prompt, "max_tokens": args.max_tokens, "stream": True})
        tally = Tally()
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            workers = [
                asyncio.create_task(
                    _stream_forever(
                        session, f"http://{sim.addresses[i % args.replicas]}/v1/completions", body, tally
                    )
                )
                for i in range(args.streams)
            ]
            try:
                await asyncio.sleep(args.warmup)  # let every stream start and batches fill
                sim_cpu = sum(sim_process.cpu_times()[:2])
                client_cpu = time.process_time()
                started = time.perf_counter()
                tally.counting = True
                await asyncio.sleep(args.duration)
                tally.counting = False
                elapsed = time.perf_counter() - started
                sim_cpu = sum(sim_process.cpu_times()[:2]) - sim_cpu
                client_cpu = time.process_time() - client_cpu
            finally:
                for worker in workers:
                    worker.cancel()
                for worker in workers:
                    with contextlib.suppress(asyncio.CancelledError):
                        await worker
            page_bytes, scrape_cpu = await _scrape_cost(session, sim.addresses[0], sim_process, args.scrapes)
    return BenchResult(
        replicas=args.replicas,
        streams=args.streams,
        profile=args.profile,
        speed=args.speed,
        duration_s=round(elapsed, 3),
        tokens=tally.tokens,
        events=tally.events,
        requests=tally.requests,
        tokens_per_s=round(tally.tokens / elapsed, 1),
        events_per_s=round(tally.events / elapsed, 1),
        sim_cpu_util=round(sim_cpu / elapsed, 3),
        tokens_per_sim_cpu_second=round(tally.tokens / sim_cpu, 1) if sim_cpu else 0.0,
        client_cpu_util=round(client_cpu / elapsed, 3),
        sim_pinned_to_one_core=pinned,
        sim_cpu_ms_per_1000_tokens=round(1e6 * sim_cpu / tally.tokens, 2) if tally.tokens else 0.0,
        metrics_page_bytes=page_bytes,
        metrics_scrape_sim_cpu_ms=round(1000 * scrape_cpu, 3),
    )


async def _scrape_cost(
    session: aiohttp.ClientSession, address: str, sim_process: psutil.Process, scrapes: int
) -> tuple[int, float]:
    """The size of one replica's /metrics page and the simulator's CPU seconds per scrape."""
    before = sum(sim_process.cpu_times()[:2])
    for _ in range(scrapes):
        async with session.get(f"http://{address}/metrics") as response:
            page = await response.read()
    return len(page), (sum(sim_process.cpu_times()[:2]) - before) / scrapes


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams in all")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--profile", default="h100-8b")
    parser.add_argument("--speed", type=float, default=1.0)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--scrapes", type=int, default=200, help="/metrics scrapes timed at the end")
    parser.add_argument("--out", type=Path, help="also write the JSON here")


def main(args: argparse.Namespace) -> int:
    result = orjson.dumps(asdict(asyncio.run(run(args))), option=orjson.OPT_INDENT_2)
    print(result.decode())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(result + b"\n")
    return 0

