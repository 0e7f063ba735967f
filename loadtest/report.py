"""`results.json` and `report.md`: every mode side by side, with ratios to the two round-robin baselines.

`results.json` keeps the issue's shape for one concurrency (`workload`, `concurrency`, `modes`);
a sweep adds `sweep`, one such entry per concurrency, and the top level mirrors the highest one.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from loadtest import plots
from loadtest.stats import RATIOS, SUMMARY, Metric, ModeResult, ratio
from loadtest.targets import Check, check

BASELINES = ("direct", "envoy-rr")
SATURATED = 0.9  # host CPU busy share above which a mode's numbers measure CPU contention


@dataclass(slots=True)
class Results:
    workload: str
    settings: dict[str, Any]  # workload parameters, pool, request counts, command line, ...
    runs: dict[int, dict[str, ModeResult]] = field(default_factory=dict)  # concurrency -> mode -> result

    def add(self, concurrency: int, mode: str, result: ModeResult) -> None:
        self.runs.setdefault(concurrency, {})[mode] = result

    def checks(self) -> list[tuple[int, Check]]:
        return [(c, result) for c, modes in self.runs.items() for result in check(self.workload, modes)]

    def saturated(self) -> list[str]:
        """`mode c=N (busy%)` for every measurement taken while the host's CPU was (nearly) full."""
        return [
            f"{mode} c={c} ({r.host_cpu_busy:.0%})"
            for c, modes in sorted(self.runs.items())
            for mode, r in modes.items()
            if r.host_cpu_busy >= SATURATED
        ]

    def to_json(self) -> dict[str, Any]:
        entries = [
            {"concurrency": c, "modes": {mode: asdict(r) for mode, r in modes.items()}}
            for c, modes in sorted(self.runs.items())
        ]
        doc: dict[str, Any] = {"workload": self.workload, **entries[-1], "settings": self.settings}
        if len(entries) > 1:
            doc["sweep"] = entries
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
