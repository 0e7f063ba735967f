"""In-process decision latency: one full scheduling cycle per request, as the ext_proc server runs it.

A cycle is `apply_body` on an OpenAI chat body (orjson parse, prompt prefix join), then
`RequestControl.decide` with the default plugins (filters, queue / KV / in-flight / latency /
prefix / LoRA scorers, max-score picker, holding the load, the prefix index recording the pick,
the decision kept for /debug/decisions). The index is warmed first with requests from groups
sharing long system prompts, decisions are released a while later and each endpoint is "scraped"
in turn (outside the timing), as in the server, so the in-flight scorer and the load guard see
real numbers. `--precise` swaps the prefix scorer for `precise-prefix-cache-scorer` (the
simulator's tokenizer and chat template; no engine publishes, so its index holds what the picks
expect): the cost of tokenizing each prompt as the engine will.

    python -m loadtest bench-decision --out DIR [--precise]   # writes DIR/bench_decision.json
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from loadtest.stack import precise_config
from picker.admission import Admission
from picker.config import Config
from picker.datalayer.endpoint import EngineMetrics
from picker.datalayer.pool import EndpointPool
from picker.request import InferenceRequest, apply_body
from picker.requestcontrol import Decision, RequestControl
from picker.scheduling.scheduler import Scheduler

ENDPOINTS = (8, 64, 256)
PROMPT_KB = (1, 16, 128)
NOW = 1000.0  # a frozen clock: every endpoint stays fresh


@dataclass(slots=True)
class CellResult:
    endpoints: int
    prompt_kb: int
    requests: int
    p50_us: float
    p99_us: float
    p999_us: float  # dominated by rare rebuilds of the index's large dicts (see the report)
    mean_us: float
    max_us: float
    cpu_p50_us: float  # thread CPU time of the cycle: the same minus preemption by other processes
    cpu_p99_us: float
    parse_p50_us: float  # apply_body alone
    schedule_p50_us: float  # RequestControl.decide alone (filters, scorers, picker, holding, learning)
    index_blocks: int  # distinct blocks in the prefix index once warm
    gc_collections: int  # garbage-collector runs during the measured requests


TABLE = (  # result field, column title
    ("endpoints", "endpoints"),
    ("prompt_kb", "prompt KB"),
    ("p50_us", "  p50 us"),
    ("p99_us", "  p99 us"),
    ("p999_us", "p99.9 us"),
    ("mean_us", " mean us"),
    ("max_us", "  max us"),
    ("cpu_p50_us", "cpu p50 us"),
    ("cpu_p99_us", "cpu p99 us"),
    ("parse_p50_us", "parse p50 us"),
    ("schedule_p50_us", "schedule p50 us"),
    ("index_blocks", "index blocks"),
    ("gc_collections", "gc runs"),
)


def bodies(rng: random.Random, prompt_chars: int, groups: int) -> Iterator[bytes]:
    """Chat bodies: one of `groups` system prompts (3/4 of the prompt) plus a fresh question."""
    system_chars = prompt_chars * 3 // 4
    systems = [rng.randbytes(system_chars // 2).hex() for _ in range(groups)]
    question_bytes = (prompt_chars - system_chars) // 2
    while True:
        doc = {
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "messages": [
                {"role": "system", "content": rng.choice(systems)},
                {"role": "user", "content": rng.randbytes(question_bytes).hex()},
            ],
            "max_tokens": 128,
            "stream": True,
        }
        yield orjson.dumps(doc)


def run_cell(
    endpoints: int, prompt_kb: int, warm: int, requests: int, seed: int, precise: bool = False
) -> CellResult:
    rng = random.Random(seed)
    config = Config.from_document(precise_config({})) if precise else Config()
    pool = EndpointPool()
    pool.set_addresses(f"10.0.{i // 250}.{i % 250 + 1}:8000" for i in range(endpoints))
    for ep in pool.endpoints:
        ep.metrics = EngineMetrics(
            waiting=rng.randint(0, 4), kv_usage=rng.uniform(0.1, 0.7), block_size=16, num_gpu_blocks=26000
        )
        ep.scraped_at = NOW
        ep.refresh_load()
    scheduler = Scheduler.from_config(config, pool, clock=lambda: NOW, rng=rng)
    control = RequestControl(pool, scheduler, Admission(config.saturation, config.metrics), config)
    max_prefix_chars = config.limits.max_prefix_chars
    held: collections.deque[Decision] = collections.deque()
    hold_for = 4 * endpoints  # decisions an endpoint stays in flight: ~4 requests each

    source = bodies(rng, prompt_kb * 1024, groups=max(16, endpoints // 2))
    full: list[float] = []
    parse: list[float] = []
    sched: list[float] = []
    cpu: list[float] = []
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    gc_before = 0
    for i in range(warm + requests):
        if i == warm:
            gc_before = sum(s["collections"] for s in gc.get_stats())
        body = next(source)
        c0 = cpu_clock()
        t0 = clock()
        request = InferenceRequest(
            method="POST", path="/v1/chat/completions", content_type="application/json"
        )
        apply_body(request, body, max_prefix_chars)
        t1 = clock()
        decision = control.decide(request)
        t2 = clock()
        c2 = cpu_clock()
        assert isinstance(decision, Decision)
        held.append(decision)
        if len(held) > hold_for:
            control.release(held.popleft(), lived_as_exchange=True)
        scraped = pool.endpoints[i % endpoints]  # one scrape per decision, round robin
        scraped.observe_metrics(scraped.metrics or EngineMetrics(), time.monotonic())
        if i >= warm:
            full.append((t2 - t0) / 1000)
            parse.append((t1 - t0) / 1000)
            sched.append((t2 - t1) / 1000)
            cpu.append((c2 - c0) / 1000)
    gc_runs = sum(s["collections"] for s in gc.get_stats()) - gc_before
    (index,) = scheduler.prefix_indexes().values()
    return CellResult(
        endpoints=endpoints,
        prompt_kb=prompt_kb,
        requests=requests,
        p50_us=round(percentile(full, 50), 1),
        p99_us=round(percentile(full, 99), 1),
        p999_us=round(percentile(full, 99.9), 1),
        mean_us=round(statistics.fmean(full), 1),
        max_us=round(max(full), 1),
        cpu_p50_us=round(percentile(cpu, 50), 1),
        cpu_p99_us=round(percentile(cpu, 99), 1),
        parse_p50_us=round(percentile(parse, 50), 1),
        schedule_p50_us=round(percentile(sched, 50), 1),
        index_blocks=len(index),
        gc_collections=gc_runs,
    )


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--out", type=Path, required=True, help="directory for bench_decision.json")
    parser.add_argument("--warm", type=int, default=3000, help="requests that warm the index per cell")
    parser.add_argument("--requests", type=int, default=3000, help="measured requests per cell")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--endpoints", type=int, nargs="+", default=ENDPOINTS, help="pool sizes to run")
    parser.add_argument("--prompt-kb", type=int, nargs="+", default=PROMPT_KB, help="prompt sizes to run")
    parser.add_argument("--precise", action="store_true", help="precise-prefix-cache-scorer instead")


def main(args: argparse.Namespace) -> int:

    print(" ".join(f"{title:>{len(title)}}" for _, title in TABLE))
    results = []
    for endpoints in args.endpoints:
        for prompt_kb in args.prompt_kb:
            cell = run_cell(endpoints, prompt_kb, args.warm, args.requests, args.seed, args.precise)
            results.append(cell)
            print(" ".join(f"{getattr(cell, key):>{len(title)}}" for key, title in TABLE), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "decision latency: apply_body + RequestControl.decide "
        + ("(precise-prefix-cache-scorer)" if args.precise else "(default config)")
        + ", warm index",
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "warm_requests": args.warm,
        "seed": args.seed,
        "results": [asdict(cell) for cell in results],
    }
    path = args.out / "bench_decision.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0

