"""`python -m loadtest run|demo`: compare routing modes on simulated replicas, print and write a report.

    python -m loadtest run --workload shared-prefix --modes direct,envoy-rr,picker \\
        --concurrency 8,32,128 [--requests N | --duration S] [--replicas 4] [--profiles a,b] \\
        [--speed X] [--num-gpu-blocks B] [--set name=value ...] [--repeat N] [--ramp-up S] --out DIR
    python -m loadtest run --workload trace --trace mooncake.jsonl [--trace-requests N |
        --trace-window START:END] [--time-scale F] ...   # replay a Mooncake-format trace
    python -m loadtest run --workload shared-prefix --modes envoy-rr,picker,oracle \
        --request-rate 4,6,8,10 --slo-ttft-p90 500 [--duration S | --requests N per stage] ...
        # capacity at an SLO: a rate ladder per mode on one warm stack, after a warm-up stage
    python -m loadtest demo      # the README's first command
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import httpx
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loadtest import report
from loadtest.runner import LADDER_CONCURRENCY, RunPlan, run_ladder, run_plan
from loadtest.stack import DEFAULT_MODES, MODES, PoolSpec
from loadtest.stats import (
    E2E_P99,
    HIT_RATE,
    LADDER,
    OUTPUT_TPS,
    RECOMPUTED,
    TOTAL_TPS,
    TPOT_P50,
    TTFT_P90,
    ModeResult,
    meets_slo,
    ratio,
)
from loadtest.workloads import (
    CachePressure,
    MultiTurn,
    SharedPrefix,
    TraceReplay,
    Uniform,
    Workload,
    with_params,
)

WORKLOADS = ("uniform", "shared-prefix", "cache-pressure", "multi-turn", "heterogeneous", "trace")
DEFAULT_PROFILES = {"heterogeneous": ("h100-8b", "l40s-8b")}  # fast and slow, alternating
TABLE = (  # short terminal headers for the key metrics
    ("out tok/s", OUTPUT_TPS),
    ("total tok/s", TOTAL_TPS),
    ("TTFT p90\nms", TTFT_P90),
    ("TPOT p50\nms", TPOT_P50),
    ("E2E p99\nms", E2E_P99),
    ("prefix\nhits", HIT_RATE),
)

# The demo: shared-prefix on 4 H100-profile replicas whose KV cache is cut to 2,048 blocks (32k
# tokens, 8 of the 4k-token system prompts) so that ~1,300 requests revisit each of the 25 prompts
# ~50 times: the prompts fill 3 replicas' worth of cache, so round-robin keeps evicting them while
# one replica per group holds them all. The simulated clock runs 2x faster; the three modes take
# 15-30 s each plus start-up: about a minute and a half on 2 cores.
DEMO_POOL = PoolSpec(replicas=4, speed=2.0, num_gpu_blocks=2048)
DEMO_WORKLOAD = SharedPrefix(prefix_tokens=4000, question_tokens=400, output_tokens=64)
DEMO_CONCURRENCY = 32
DEMO_REQUESTS = 1280


def build_workload(name: str, pool: PoolSpec, overrides: dict[str, str]) -> Workload:
    """The named workload with `--set` overrides; shared-prefix groups and cache-pressure tiers
    sized to the pool's KV cache unless set."""
    if name == "shared-prefix":
        workload = with_params(SharedPrefix(), overrides)
        assert isinstance(workload, SharedPrefix)
        return workload if "groups" in overrides else workload.sized_for(pool.kv_tokens, pool.replicas)
    if name == "cache-pressure":
        pressure = with_params(CachePressure(), overrides)
        assert isinstance(pressure, CachePressure)
        tiers = {"hot_groups", "warm_groups", "cold_groups"}
        return pressure if tiers & set(overrides) else pressure.sized_for(pool.kv_tokens, pool.replicas)
    if name == "multi-turn":
        return with_params(MultiTurn(), overrides)
    return with_params(Uniform(), overrides)


def trace_workload(args: argparse.Namespace) -> TraceReplay:
    """`--workload trace`: the records `--trace-requests` / `--trace-window` select, at least one."""
    if args.trace is None or not args.trace.is_file():
        raise ValueError(f"--workload trace needs --trace, a Mooncake-format JSONL file (got {args.trace})")
    start, end = args.trace_window or (0.0, None)
    workload = TraceReplay(str(args.trace), args.time_scale, args.trace_requests, start, end)
    if not workload.min_requests:
        raise ValueError(f"no request of {args.trace} falls in the selected window")
    return workload


def _window(text: str) -> tuple[float, float | None]:
    start, _, end = text.partition(":")
    try:
        return float(start or 0), float(end) if end else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END seconds, got {text!r}") from None


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _ints(text: str) -> list[int]:
    try:
        values = [int(item) for item in _list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _rates(text: str) -> list[float]:
    """One rate, or a ladder `4,6,8`: positive numbers, ascending once sorted."""
    try:
        values = [float(item) for item in _list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated rates, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive rates, got {text!r}")
    return sorted(set(values))


def _modes(text: str) -> list[str]:
    modes = _list(text)
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    return modes


def _assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    return name.strip(), value.strip()


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """The options of `run`, or of `demo`."""
    if command == "demo":
        parser.add_argument("--out", type=Path, help="output directory (default results/demo-<time>)")
        parser.add_argument("--requests", type=int, default=DEMO_REQUESTS, help="requests per mode")
        return
    run = parser
    run.add_argument("--workload", choices=WORKLOADS, required=True)
    run.add_argument(
        "--modes", type=_modes, default=list(DEFAULT_MODES), help=f"comma-separated ({', '.join(MODES)})"
    )
    run.add_argument(
        "--concurrency", type=_ints,
        help="one value, or a sweep: 8,32,128 (default 32; a rate ladder: a cap of "
        f"{LADDER_CONCURRENCY} streams, so queueing happens in the replicas, not the client)",
    )  # fmt: skip
    amount = run.add_mutually_exclusive_group()
    amount.add_argument(
        "--requests",
        type=int,
        help="requests per mode, or per ladder stage (default 10 x concurrency; shared-prefix: at "
        "least 10 per group)",
    )
    amount.add_argument(
        "--duration", type=float, help="seconds per mode (or ladder stage) instead of a request count"
    )
    run.add_argument("--replicas", type=int, default=4)
    run.add_argument("--profiles", type=_list, help="simulator profiles, cycled over the replicas")
    run.add_argument("--speed", type=float, default=1.0, help="simulated time runs this much faster")
    run.add_argument("--num-gpu-blocks", type=int, help="override the profiles' KV capacity (blocks)")
    run.add_argument("--clients", type=int, help="client processes (default: by concurrency and cores)")
    run.add_argument(
        "--repeat", type=int, default=1, metavar="N",
        help="measure every mode N times, modes taking turns, and pool the samples (noisy machines)",
    )  # fmt: skip
    run.add_argument(
        "--set", type=_assignment, action="append", default=[], metavar="NAME=VALUE",
        help="workload parameter, e.g. --set output_tokens=256 (see loadtest.workloads)",
    )  # fmt: skip
    run.add_argument("--picker-arg", action="append", default=[], help="extra `picker serve` argument")
    run.add_argument(
        "--ramp-up", type=float, default=0.0, metavar="S",
        help="start the closed-loop workers evenly over S seconds instead of all at once, so the "
        "first burst does not dominate TTFT percentiles",
    )  # fmt: skip
    run.add_argument(
        "--request-rate", type=_rates, metavar="R[,R...]",
        help="open loop: requests arrive at R/s (Poisson) and --concurrency only caps them, as "
        "`vllm bench serve --request-rate`; above a mode's capacity its queue (and TTFT) grows. "
        "Several rates make a ladder (capacity at an SLO): one stage per rate, ascending, on one "
        "warm stack per mode, each stage --duration seconds (default 20) or --requests requests. "
        "A timed window offers exactly R x its seconds requests (Poisson-timed within it). "
        "A trace's rate is its mean arrival rate: its gaps are scaled to reach it (bursts kept)",
    )  # fmt: skip
    run.add_argument(
        "--slo-ttft-p90", type=float, metavar="MS",
        help="a ladder's SLO: capacity is the highest rate with TTFT p90 <= MS and <= 1%% failures "
        "(the oracle mode also routes by it)",
    )  # fmt: skip
    run.add_argument(
        "--warmup-stage", type=float, default=10.0, metavar="S",
        help="a ladder's unmeasured first stage: S seconds at the first rate (0: none)",
    )  # fmt: skip
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--request-timeout", type=float, default=600.0)
    run.add_argument("--out", type=Path, help="output directory (default results/<workload>-<time>)")
    trace = run.add_argument_group("trace replay (--workload trace)")
    trace.add_argument("--trace", type=Path, help="Mooncake-format JSONL: timestamp ms, lengths, hash_ids")
    trace.add_argument(
        "--time-scale", type=float, default=1.0, metavar="F",
        help="arrival times are the trace's times F (0.1: ten times faster; 1/speed keeps the "
        "simulator's clock)",
    )  # fmt: skip
    trace.add_argument("--trace-requests", type=int, metavar="N", help="only the first N records")
    trace.add_argument(
        "--trace-window", type=_window, metavar="START:END", help="only the records in this window (seconds)"
    )


def plan_from_args(args: argparse.Namespace) -> RunPlan:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.command == "demo":
        workload = DEMO_WORKLOAD.sized_for(DEMO_POOL.kv_tokens, DEMO_POOL.replicas)
        return RunPlan(
            workload_name="shared-prefix",
            workload=workload,
            modes=("direct", "envoy-rr", "picker"),
            concurrencies=(DEMO_CONCURRENCY,),
            pool=DEMO_POOL,
            out=args.out or Path("results") / f"demo-{stamp}",
            requests=args.requests,
        )
    profiles = tuple(args.profiles or DEFAULT_PROFILES.get(args.workload, ("h100-8b",)))
    pool = PoolSpec(args.replicas, profiles, args.speed, args.num_gpu_blocks)
    traced = args.workload == "trace"
    workload = trace_workload(args) if traced else build_workload(args.workload, pool, dict(args.set))
    rates = args.request_rate or []
    ladder = tuple(rates) if len(rates) > 1 else ()
    if ladder and args.repeat > 1:
        raise ValueError("a rate ladder runs each mode once (--repeat applies to single runs)")
    concurrency = args.concurrency or [LADDER_CONCURRENCY if ladder else 32]
    return RunPlan(
        workload_name=args.workload,
        workload=workload,
        modes=tuple(args.modes),
        concurrencies=tuple(sorted(set(concurrency))),
        pool=pool,
        out=args.out or Path("results") / f"{args.workload}-{stamp}",
        requests=args.requests or (workload.min_requests if traced and not ladder else None),
        duration=args.duration,
        clients=args.clients,
        repeats=args.repeat,
        ramp_up=args.ramp_up,
        request_rate=None if ladder or not rates else rates[0],
        ladder=ladder,
        warmup_stage=args.warmup_stage,
        slo_ttft_p90_ms=args.slo_ttft_p90,
        seed=args.seed,
        request_timeout=args.request_timeout,
        picker_args=tuple(args.picker_arg),
    )


def _command(argv: Sequence[str]) -> str:
    return shlex.join(["python", "-m", "loadtest", *argv])


async def execute(plan: RunPlan, results: report.Results, console: Console) -> None:
    """Run the plan under a live progress bar; results.json is rewritten after every mode."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        if plan.ladder:
            async for rate, mode, result in run_ladder(plan, progress):
                results.add_stage(rate, mode, result)
                await asyncio.to_thread(report.write_json, results, plan.out)
            return
        async for concurrency, mode, result in run_plan(plan, progress):
            results.add(concurrency, mode, result)
            await asyncio.to_thread(report.write_json, results, plan.out)


def print_results(console: Console, results: report.Results) -> None:
    for concurrency, modes in sorted(results.runs.items()):
        console.print(_table(concurrency, modes))
    for mode, stages in results.ladder.items():
        console.print(_ladder_table(mode, stages, results.slo_ttft_p90_ms))
    for mode, cap in results.capacities().items():
        versus = report.format_ratio(results.capacity_ratio(mode))
        baseline = report.CAPACITY_BASELINE
        console.print(f"capacity at the SLO  {mode}: {report.format_capacity(cap)} ({versus} {baseline})")
    for k in results.ladder_checks():
        measured = "-" if k.value is None else f"{k.value:.3f}"
        console.print(f"{k.target}: {measured}  " + ("[green]met[/]" if k.met else "[red]missed[/]"))
    if saturated := results.saturated():
        console.print(f"[yellow]warning: host CPU (nearly) full while measuring {', '.join(saturated)}[/]")
    for concurrency, check in results.checks():
        mark = "[green]met[/]" if check.met else "[red]missed[/]"
        console.print(f"c={concurrency}  {check.target}: {report.format_ratio(check.ratio)}  {mark}")


def _ladder_table(mode: str, stages: dict[float, ModeResult], slo: float | None) -> Table:
    table = Table(title=f"{mode}: rate ladder", box=box.SIMPLE_HEAD)
    for header in (
        "rate /s",
        "ok",
        "err",
        "TTFT p50\nms",
        "TTFT p90\nms",
        "TTFT p99\nms",
        "out tok/s",
        "prefix\nhits",
        "recomputed\ntok/req",
        "SLO",
    ):
        table.add_column(header, justify="right")
    for rate, r in sorted(stages.items()):
        cells = [report.format_value(m, m.of(r)) for m in (*LADDER, RECOMPUTED)]
        table.add_row(
            f"{rate:g}", str(r.completed), str(r.errors), *cells, "met" if meets_slo(r, slo) else "missed"
        )
    return table


def _table(concurrency: int, modes: dict[str, ModeResult]) -> Table:
    """A compact table (fits 100 columns); report.md has every number."""
    requests = max(r.requests for r in modes.values())
    table = Table(title=f"concurrency {concurrency}, {requests} requests per mode", box=box.SIMPLE_HEAD)
    baseline = modes.get("direct")
    headers = ["mode", "ok", "err", *(label for label, _ in TABLE)]
    if baseline is not None:
        headers += ["out tok/s\nvs direct", "TTFT p90\nvs direct"]
    for header in headers:
        table.add_column(header, justify="left" if header == "mode" else "right")
    for mode, r in modes.items():
        cells = [mode, str(r.completed), str(r.errors), *(report.format_value(m, m.of(r)) for _, m in TABLE)]
        if baseline is not None:
            cells += [report.format_ratio(ratio(m, r, baseline)) for m in (OUTPUT_TPS, TTFT_P90)]
        table.add_row(*cells)
    return table


def main(args: argparse.Namespace) -> None:
    try:
        plan = plan_from_args(args)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    run_and_report(plan)


def run_and_report(plan: RunPlan) -> None:
    """Run the plan, print the tables and write the report (whatever was measured, if it failed)."""
    console = Console()
    if not console.is_terminal:  # a log or CI: rich would wrap at 80 columns
        console = Console(width=120)
    command = _command(sys.argv[1:])
    console.print(f"[bold]{command}[/]: {plan.workload_name} {asdict(plan.workload)}, writing to {plan.out}")
    results = report.Results(
        plan.workload_name, {"command": command, **plan.describe()}, slo_ttft_p90_ms=plan.slo_ttft_p90_ms
    )
    failure = None
    try:
        asyncio.run(execute(plan, results, console))
    except KeyboardInterrupt:
        failure = "interrupted"
    except (RuntimeError, TimeoutError, OSError, httpx.HTTPError) as exc:  # a process failed or died
        failure = f"{type(exc).__name__}: {exc}"
    if results.runs or results.ladder:  # whatever was measured is still reported
        path = report.write(results, plan.out)
        print_results(console, results)
        console.print(f"Report: [bold]{path}[/] (data: {plan.out / 'results.json'})")
    if failure is not None:
        logs = plan.out / "logs"
        raise SystemExit(f"error: {failure}\n(every process started was stopped; logs in {logs})")
