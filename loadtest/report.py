"""`results.json` and `report.md`: every mode side by side, with ratios to the two round-robin baselines.

`results.json` keeps the issue's shape for one concurrency (`workload`, `concurrency`, `modes`);
a sweep adds `sweep`, one such entry per concurrency, and the top level mirrors the highest one.
A rate ladder adds `ladder` (per mode, one entry per stage) and `capacity` (per mode, the highest
rate meeting the SLO and its ratio to envoy-rr).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from loadtest import plots
from loadtest.stats import (
    LADDER,
    RATIOS,
    RECOMPUTED,
    SUMMARY,
    Capacity,
    Metric,
    ModeResult,
    capacity,
    failure_rate,
    meets_slo,
    ratio,
)
from loadtest.targets import Check, LadderCheck, check, check_ladders, mean_hit_rates

BASELINES = ("direct", "envoy-rr")
CAPACITY_BASELINE = "envoy-rr"
ORACLE = "oracle"
SATURATED = 0.9  # host CPU busy share above which a mode's numbers measure CPU contention


@dataclass(slots=True)
class Results:
    workload: str
    settings: dict[str, Any]  # workload parameters, pool, request counts, command line, ...
    runs: dict[int, dict[str, ModeResult]] = field(default_factory=dict)  # concurrency -> mode -> result
    ladder: dict[str, dict[float, ModeResult]] = field(default_factory=dict)  # mode -> rate -> result
    slo_ttft_p90_ms: float | None = None

    def add(self, concurrency: int, mode: str, result: ModeResult) -> None:
        self.runs.setdefault(concurrency, {})[mode] = result

    def add_stage(self, rate: float, mode: str, result: ModeResult) -> None:
        self.ladder.setdefault(mode, {})[rate] = result

    def capacities(self) -> dict[str, Capacity]:
        return {mode: capacity(stages, self.slo_ttft_p90_ms) for mode, stages in self.ladder.items()}

    def ladder_checks(self) -> list[LadderCheck]:
        return check_ladders(self.workload, self.ladder, self.slo_ttft_p90_ms)

    def hit_share_of_oracle(self, mode: str) -> float | None:
        """The mode's mean hit rate over the oracle's, on the stages both ran."""
        if mode not in self.ladder or ORACLE not in self.ladder:
            return None
        mine, oracle = mean_hit_rates(self.ladder[mode], self.ladder[ORACLE], self.slo_ttft_p90_ms)
        return None if mine is None or not oracle else mine / oracle

    def capacity_ratio(self, mode: str, baseline: str = CAPACITY_BASELINE) -> float | None:
        """Capacity over the baseline's (None when either met no stage or was not run)."""
        capacities = self.capacities()
        if mode not in capacities or baseline not in capacities:
            return None
        mine, base = capacities[mode].rate, capacities[baseline].rate
        return None if mine is None or not base else mine / base

    def checks(self) -> list[tuple[int, Check]]:
        return [(c, result) for c, modes in self.runs.items() for result in check(self.workload, modes)]

    def saturated(self) -> list[str]:
        """`mode c=N (busy%)` for every measurement taken while the host's CPU was (nearly) full."""
        return [
            f"{mode} c={c} ({r.host_cpu_busy:.0%})"
            for c, modes in sorted(self.runs.items())
            for mode, r in modes.items()
            if r.host_cpu_busy >= SATURATED
        ] + [
            f"{mode} {rate:g}/s ({r.host_cpu_busy:.0%})"
            for mode, stages in self.ladder.items()
            for rate, r in sorted(stages.items())
            if r.host_cpu_busy >= SATURATED
        ]

    def to_json(self) -> dict[str, Any]:
        entries = [
            {"concurrency": c, "modes": {mode: asdict(r) for mode, r in modes.items()}}
            for c, modes in sorted(self.runs.items())
        ]
        doc: dict[str, Any] = {
            "workload": self.workload,
            **(entries[-1] if entries else {}),
            "settings": self.settings,
        }
        if len(entries) > 1:
            doc["sweep"] = entries
        if self.ladder:
            doc["ladder"] = {
                mode: [
                    {"rate": rate, "meets_slo": meets_slo(r, self.slo_ttft_p90_ms), **asdict(r)}
                    for rate, r in sorted(stages.items())
                ]
                for mode, stages in self.ladder.items()
            }
            doc["ladder_targets"] = [
                {"target": str(k.target), "value": k.value, "met": k.met} for k in self.ladder_checks()
            ]
            doc["capacity"] = {
                mode: asdict(cap)
                | {
                    f"vs {CAPACITY_BASELINE}": self.capacity_ratio(mode),
                    f"vs {ORACLE}": self.capacity_ratio(mode, ORACLE),
                    f"hit rate vs {ORACLE}": self.hit_share_of_oracle(mode),
                }
                for mode, cap in self.capacities().items()
            }
        doc["targets"] = [
            {"concurrency": c, "target": str(k.target), "ratio": k.ratio, "met": k.met}
            for c, k in self.checks()
        ]
        return doc


def format_value(metric: Metric, value: float | None) -> str:
    if value is None:
        return "-"
    if metric.field == "prefix_cache_hit_rate":
        return f"{value:.1%}"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def format_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def write_json(results: Results, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_bytes(orjson.dumps(results.to_json(), option=orjson.OPT_INDENT_2))
    return path


def write(results: Results, out: Path) -> Path:
    """Write results.json, the plots and report.md into `out`; return the report's path."""
    write_json(results, out)
    images = plots.write_all(results.runs, out)
    if results.ladder:
        images["ladder"] = plots.ladder(results.ladder, results.slo_ttft_p90_ms, out / "ladder.png")
    report = out / "report.md"
    report.write_text(render_markdown(results, images))
    return report


def render_markdown(results: Results, images: dict[str, Path]) -> str:
    settings = results.settings
    lines = [
        f"# Load test: {results.workload}",
        "",
        f"Command: `{settings.get('command', '')}`",
        "",
        "| setting | value |",
        "| --- | --- |",
        *(f"| {key} | {_setting(value)} |" for key, value in settings.items() if key != "command"),
        f"| machine | {os.cpu_count()} cores |",
        "",
        "Latencies are wall-clock milliseconds as the clients saw them; with `speed` > 1 the simulated "
        "replicas run that many times faster than the hardware they model, while proxy and picker "
        "overheads do not shrink. Ratios are mode / baseline; for latencies lower is better.",
        "",
    ]
    if saturated := results.saturated():
        lines += [
            f"**Warning:** the host's CPU was at least {SATURATED:.0%} busy while measuring "
            f"{', '.join(saturated)}: those numbers measure CPU contention (see each mode's CPU "
            "seconds for whose), not routing. Re-run on a quieter machine or with `--repeat`.",
            "",
        ]
    lines += _ladder(results, images)
    if checks := results.checks():
        lines += ["## Targets", "", "| concurrency | target | measured | met |", "| --- | --- | --- | --- |"]
        for c, k in checks:
            lines.append(f"| {c} | {k.target} | {format_ratio(k.ratio)} | {'yes' if k.met else '**no**'} |")
        lines.append("")
    for concurrency, modes in sorted(results.runs.items()):
        lines += _concurrency_section(concurrency, modes, images)
    if "sweep" in images:
        lines += ["## Throughput vs concurrency", "", f"![throughput vs concurrency]({images['sweep'].name})"]
    return "\n".join(lines)


def format_capacity(cap: Capacity) -> str:
    if cap.rate is None:
        return "below the first stage"
    return (">= " if cap.at_least else "") + f"{cap.rate:g} req/s"


def _ladder(results: Results, images: dict[str, Path]) -> list[str]:
    """The headline (capacity at the SLO per mode) and every mode's ladder."""
    if not results.ladder:
        return []
    slo = results.slo_ttft_p90_ms
    condition = f"TTFT p90 <= {slo:g} ms and" if slo is not None else "(no TTFT SLO given)"
    lines = [
        "## Capacity at the SLO",
        "",
        f"The highest request rate whose stage, and every stage below it, met {condition} at most "
        "1% failed requests. Each mode ran its ladder on one warm stack, rates ascending. Hit rate vs "
        "the oracle: mean prefix hit rate over the stages both ran within the SLO (all they both ran if "
        "none).",
        "",
        f"| mode | capacity | vs {CAPACITY_BASELINE} | vs {ORACLE} | hit rate vs {ORACLE} | note |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for mode, cap in results.capacities().items():
        note = (
            f"met again at {', '.join(f'{r:g}' for r in cap.unsteady)}/s after a miss" if cap.unsteady else ""
        )
        note = note or ("every stage met: the ladder is too short" if cap.at_least else "")
        share = results.hit_share_of_oracle(mode)
        cells = [
            mode, format_capacity(cap), format_ratio(results.capacity_ratio(mode)),
            format_ratio(results.capacity_ratio(mode, ORACLE)), "-" if share is None else f"{share:.0%}",
            note,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if checks := results.ladder_checks():
        lines += ["| target | measured | met |", "| --- | --- | --- |"]
        for k in checks:
            measured = "-" if k.value is None else f"{k.value:.3f}"
            lines.append(f"| {k.target} | {measured} | {'yes' if k.met else '**no**'} |")
        lines.append("")
    if "ladder" in images:
        lines += [f"![rate ladder]({images['ladder'].name})", ""]
    headers = [
        "rate /s",
        "requests",
        "failed",
        *(m.label for m in LADDER),
        "recomputed tokens / req",
        "meets SLO",
        "client cores",
        "host CPU busy",
    ]
    for mode, stages in results.ladder.items():
        lines += [f"### Ladder: {mode}", "", "| " + " | ".join(headers) + " |", "| --- " * len(headers) + "|"]
        for rate, r in sorted(stages.items()):
            cells = [
                f"{rate:g}", str(r.requests), f"{r.errors} ({failure_rate(r):.1%})",
                *(format_value(m, m.of(r)) for m in LADDER), format_value(RECOMPUTED, RECOMPUTED.of(r)),
                "yes" if meets_slo(r, slo) else "**no**", f"{_client_cores(r):.2f}", f"{r.host_cpu_busy:.0%}",
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _client_cores(r: ModeResult) -> float:
    """Cores the load clients used: near 1 per client process means the client, not the pool, limits."""
    seconds = sum(v for role, v in r.cpu_seconds.items() if role.startswith("client-"))
    return seconds / r.duration_s if r.duration_s else 0.0


def _setting(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value))
    return str(value)


def _concurrency_section(
    concurrency: int, modes: dict[str, ModeResult], images: dict[str, Path]
) -> list[str]:
    lines = [
        f"## Concurrency {concurrency}",
        "",
        "| mode | requests | errors | " + " | ".join(m.label for m in SUMMARY) + " |",
        "| --- " * (3 + len(SUMMARY)) + "|",
    ]
    for mode, r in modes.items():
        cells = [format_value(m, m.of(r)) for m in SUMMARY]
        lines.append(f"| {mode} | {r.requests} | {r.errors} | " + " | ".join(cells) + " |")
    lines.append("")
    for baseline in BASELINES:
        if baseline not in modes:
            continue
        lines += [
            f"Ratio to `{baseline}`:",
            "",
            "| mode | " + " | ".join(m.label for m in RATIOS) + " |",
            "| --- " * (1 + len(RATIOS)) + "|",
        ]
        for mode, r in modes.items():
            if mode != baseline:
                cells = [format_ratio(ratio(m, r, modes[baseline])) for m in RATIOS]
                lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _proxy_costs(modes)
    for kind in ("latency", "throughput"):
        if (key := f"{kind}-c{concurrency}") in images:
            lines += [f"![{kind} at concurrency {concurrency}]({images[key].name})", ""]
    for mode, r in modes.items():
        lines += _mode_details(mode, r)
    return lines


def _proxy_costs(modes: dict[str, ModeResult]) -> list[str]:
    """What the gateway and the picker spent per request and per 1,000 output tokens."""
    costed = {mode: r.proxy_cost for mode, r in modes.items() if r.proxy_cost}
    if not costed:
        return []
    lines = [
        "Proxy cost (CPU ms of the process per completed request / per 1,000 output tokens; "
        "ext_proc messages per request, Envoy to the picker / back):",
        "",
        "| mode | Envoy CPU ms | picker CPU ms | ext_proc messages |",
        "| --- | --- | --- | --- |",
    ]
    for mode, cost in costed.items():
        cells = [
            "-" if (c := cost.get(f"{role} CPU ms")) is None
            else f"{c['per request']:.2f} / {c['per 1k output tokens']:.2f}"
            for role in ("envoy", "picker")
        ]  # fmt: skip
        msgs = cost.get("ext_proc messages")
        cells.append("-" if msgs is None else f"{msgs['sent']:.1f} / {msgs['received']:.1f}")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _spread(r: ModeResult) -> list[str]:
    if r.repeats < 2:
        return []
    runs = ", ".join(f"{run.total_tokens_per_s:,.0f} ({run.host_cpu_busy:.0%})" for run in r.by_repeat)
    return [f"{r.repeats} runs pooled; total tok/s of each (host CPU busy): {runs}.", ""]


def _mode_details(mode: str, r: ModeResult) -> list[str]:
    errors = ", ".join(f"{kind} {n}" for kind, n in sorted(r.errors_by_kind.items())) or "none"
    lines = [
        f"### {mode}",
        "",
        f"{r.completed} completed in {r.duration_s:.1f} s ({r.request_throughput:.1f} req/s) by {r.clients} "
        f"client process(es); errors: {errors}; preemptions: {r.preemptions}; "
        f"{r.input_tokens:,} prompt and {r.output_tokens:,} output tokens.",
        "",
        *_spread(r),
        "| replica | profile | requests | prefix hit rate |",
        "| --- | --- | --- | --- |",
    ]
    replicas = sorted(set(r.per_replica_requests) | set(r.per_replica_hit_rate))
    for replica in replicas:
        rate = r.per_replica_hit_rate.get(replica)
        shown = "-" if rate is None else f"{rate:.1%}"
        profile = r.replica_profiles.get(replica, "-")
        lines.append(f"| {replica} | {profile} | {r.per_replica_requests.get(replica, 0)} | {shown} |")
    cpu = ", ".join(f"{role} {seconds:.1f}" for role, seconds in r.cpu_seconds.items())
    lines += [
        "",
        f"CPU seconds: {cpu} (in all {r.cpu_cores_used:.2f} cores busy on average; "
        f"the host's cores were {r.host_cpu_busy:.0%} busy).",
        "",
    ]
    return lines
