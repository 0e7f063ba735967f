"""`python -m loadtest capacity --preset NAME`: capacity at an SLO on a workload the anchors use,
sized so that each preset finishes in a few minutes on a 2-core machine.

    python -m loadtest capacity --preset well-lit|cache-pressure|trace|uniform \\
        [--modes envoy-rr,picker,oracle] [--rates 2,4,...] [--slo-ttft-p90 MS] [--duration S] [--out DIR]

Every preset: 4 simulated H100 replicas whose KV cache is cut down and whose clock runs slower
(`speed` < 1), so they saturate at request rates one client process drives with CPU to spare
(the report gives every process's CPU seconds; check the clients'); a rate ladder per mode on one
warm stack (see `loadtest.runner`), an unmeasured warm-up stage first, each stage `stage_seconds`.

- `well-lit`: llm-d's well-lit-path shape (groups of users sharing a system prompt, a fresh
  question each, Poisson arrivals), groups sized so the prefixes fill 3/4 of the pool's cache;
- `cache-pressure`: prequal's tiers (`CachePressure`), prefixes 2.5x the pool's cache;
- `trace`: the Mooncake conversation trace; a stage's rate is the trace's mean arrival rate, its
  gaps rescaled to reach it (bursts kept), each stage replaying the records after the last one's.
  A conversation's next turn comes 115-900 requests after its last (deciles over the first 2,000
  records), so a 10 s stage shows no reuse at all: this preset measures the pool's capacity for
  the trace's long prompts, not routing; replay a few hundred records in one run for routing
  (`run --workload trace --trace-requests 600`, see the README);
- `uniform`: random prompts that share nothing: routing cannot help, only cost.

The report states the issue's targets for the preset (`loadtest.targets.LADDER_TARGETS`) over
the modes that ran.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from loadtest import cli
from loadtest.runner import LADDER_CONCURRENCY, RunPlan
from loadtest.stack import MODES, PoolSpec
from loadtest.workloads import CachePressure, SharedPrefix, TraceReplay, Uniform, Workload

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mooncake-conversation.jsonl"  # ../shared
DEFAULT_MODES = ("envoy-rr", "picker", "oracle", "picker-x2", "picker-x3")  # those that exist


@dataclass(frozen=True, slots=True)
class Preset:
    workload_name: str  # the workload as `run` calls it
    pool: PoolSpec
    rates: tuple[float, ...]
    slo_ttft_p90_ms: float  # wall-clock: the replicas' clock runs at `pool.speed`
    # 10 s stages moved a mode's capacity by a step or two between runs near the knee.
    stage_seconds: float = 20.0
    warmup_seconds: float = 8.0

    def workload(self, trace: Path) -> Workload:
        kv, replicas = self.pool.kv_tokens, self.pool.replicas
        if self.workload_name == "shared-prefix":
            return SharedPrefix(prefix_tokens=3000, question_tokens=300, output_tokens=32).sized_for(
                kv, replicas, fill=0.5
            )
        if self.workload_name == "cache-pressure":
            return CachePressure(prefix_tokens=2000, question_tokens=200, output_tokens=32).sized_for(
                kv, replicas
            )
        if self.workload_name == "trace":
            return TraceReplay(str(trace), first=2000)
        return Uniform(input_tokens=2000, output_tokens=64)


# 16k tokens of KV per replica; the clock at 0.2x an H100's, so a request that misses its
# 3,000-token prefix costs ~0.5 s of prefill and round-robin saturates near 8 req/s on 4 replicas,
# while routing that hits can go well past 20 req/s before the 2 cores run out.
_SMALL = PoolSpec(replicas=4, speed=0.2, num_gpu_blocks=1024)
_RATES = (2, 4, 6, 8, 10, 12, 15, 18, 22, 26, 30, 35)
PRESETS = {
    "well-lit": Preset("shared-prefix", _SMALL, _RATES, 1200.0),
    "cache-pressure": Preset("cache-pressure", _SMALL, _RATES, 1200.0),
    # The trace's prompts reach ~120k tokens and a conversation comes back after many others: the
    # cache holds ~19 average prompts per replica (16,384 blocks = 262k tokens).
    # A tenth of them are over 27k tokens: ~1.8 s of prefill alone at 0.5x, hence a 5 s SLO; a
    # faster clock would need rates at which the simulator's tokenizing takes a whole core.
    "trace": Preset(
        "trace", PoolSpec(replicas=4, speed=0.5, num_gpu_blocks=16384), (1, 2, 3, 4, 5, 6, 8), 5000.0
    ),
    "uniform": Preset("uniform", _SMALL, (2, 4, 6, 8, 10, 12, 15), 1200.0),
}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument(
        "--modes", type=cli._modes,
        help=f"comma-separated (default: those of {', '.join(DEFAULT_MODES)} that exist)",
    )  # fmt: skip
    parser.add_argument("--rates", type=cli._rates, help="the ladder (default: the preset's)")
    parser.add_argument("--slo-ttft-p90", type=float, metavar="MS", help="the SLO (default: the preset's)")
    parser.add_argument(
        "--duration", type=float, metavar="S", help="seconds per stage (default: the preset's)"
    )
    parser.add_argument("--trace", type=Path, default=TRACE, help="the Mooncake trace (preset trace)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--picker-arg", action="append", default=[], help="extra `picker serve` argument")
    parser.add_argument(
        "--out", type=Path, help="output directory (default results/capacity-<preset>-<time>)"
    )


def plan_for(args: argparse.Namespace) -> RunPlan:
    preset = PRESETS[args.preset]
    if args.preset == "trace" and not args.trace.is_file():
        raise ValueError(f"the trace preset needs the Mooncake trace (--trace, not found: {args.trace})")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return RunPlan(
        workload_name=args.preset,
        workload=preset.workload(args.trace),
        modes=tuple(args.modes or [mode for mode in DEFAULT_MODES if mode in MODES]),
        concurrencies=(LADDER_CONCURRENCY,),
        pool=preset.pool,
        out=args.out or Path("results") / f"capacity-{args.preset}-{stamp}",
        duration=args.duration or preset.stage_seconds,
        ladder=tuple(args.rates or preset.rates),
        warmup_stage=preset.warmup_seconds,
        slo_ttft_p90_ms=args.slo_ttft_p90 or preset.slo_ttft_p90_ms,
        seed=args.seed,
        picker_args=tuple(args.picker_arg),
    )


def main(args: argparse.Namespace) -> None:
    try:
        plan = plan_for(args)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    cli.run_and_report(plan)
