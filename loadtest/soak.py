"""`python -m loadtest soak`: steady load for minutes; the picker's memory and descriptors must stay flat.

The chaos stack (one simulator process per replica, the picker, the real Envoy) under the chaos
runner's closed-loop load, with no faults. Every `--interval` seconds it samples each process's
RSS and open file descriptors and the picker's open streams; the report compares the first
sample after warm-up with the last one and fits a slope, then checks that the picker's in-flight
state drains to zero once the load stops.

    python -m loadtest soak --minutes 10 [--interval 10] [--concurrency 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil

from loadtest.chaos import ChaosPlan, Run, steady_load

WARMUP_SAMPLES = 2  # the first samples include start-up growth (imports, caches, connections)


@dataclass(slots=True)
class Sample:
    seconds: float
    requests: int
    failed: int
    rss_mb: dict[str, float]
    fds: dict[str, int]
    picker_streams_open: float


def measure(pids: dict[str, int]) -> tuple[dict[str, float], dict[str, int]]:
    rss, fds = {}, {}
    for role, pid in pids.items():
        process = psutil.Process(pid)
        rss[role] = round(process.memory_info().rss / 2**20, 1)
        fds[role] = process.num_fds()
    return rss, fds


def summary(samples: Sequence[Sample]) -> dict[str, dict[str, float]]:
    """Per process: RSS and FDs after warm-up vs at the end, and the RSS slope in MB per minute."""
    steady = samples[WARMUP_SAMPLES:] if len(samples) > WARMUP_SAMPLES + 1 else samples
    first, last = steady[0], steady[-1]
    out: dict[str, dict[str, float]] = {}
    for role in first.rss_mb:
        minutes = [s.seconds / 60 for s in steady]
        rss = [s.rss_mb[role] for s in steady]
        slope = statistics.linear_regression(minutes, rss).slope if len(steady) > 1 else 0.0
        out[role] = {
            "rss_start_mb": first.rss_mb[role],
            "rss_end_mb": last.rss_mb[role],
            "rss_max_mb": max(rss),
            "rss_slope_mb_per_min": round(slope, 3),
            "fds_start": first.fds[role],
            "fds_end": last.fds[role],
            "fds_max": max(s.fds[role] for s in steady),
        }
    return out


async def soak(plan: ChaosPlan, minutes: float, interval: float) -> dict[str, object]:
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx.AsyncClient(timeout=10.0))
        run = Run(plan, stack, http)
        model = await run.start()
        assert run.envoy is not None and run.picker.process is not None
        pids = {"picker": run.picker.process.pid, "envoy": run.envoy.pid}
        load = steady_load(plan, run.envoy.url, model, run.t0)
        traffic = asyncio.create_task(load.run())
        samples: list[Sample] = []
        started = time.monotonic()
        try:
            while (elapsed := time.monotonic() - started) < minutes * 60:
                await asyncio.sleep(min(interval, minutes * 60 - elapsed))
                rss, fds = measure(pids)
                picker = await run.picker_samples()
                records = load.records
                sample = Sample(
                    seconds=round(time.monotonic() - started, 1),
                    requests=len(records),
                    failed=sum(1 for r in records if r.error),
                    rss_mb=rss,
                    fds=fds,
                    picker_streams_open=picker.get("picker_extproc_streams_open", 0.0),
                )
                samples.append(sample)
                print(json.dumps(asdict(sample)), flush=True)
        finally:
            load.stop.set()
            await asyncio.gather(traffic, return_exceptions=True)
        drained = await run.drained()
        rss, fds = measure(pids)
    return {
        "minutes": minutes,
        "concurrency": plan.concurrency,
        "requests": len(load.records),
        "failed": sum(1 for r in load.records if r.error),
        "processes": summary(samples),
        "picker after the load": drained | {"rss_mb": rss["picker"], "fds": fds["picker"]},
        "samples": [asdict(s) for s in samples],
    }


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--replicas", type=int, default=3)
    default_out = Path("results") / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    parser.add_argument("--out", type=Path, default=default_out)


def main(args: argparse.Namespace) -> None:
    plan = ChaosPlan(out=args.out, replicas=args.replicas, concurrency=args.concurrency)
    args.out.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(soak(plan, args.minutes, args.interval))
    (args.out / "soak.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    print(f"written: {args.out / 'soak.json'}")
