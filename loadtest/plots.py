"""PNG plots for report.md: latency percentiles and throughput per mode, throughput vs concurrency,
and a rate ladder's TTFT p90 and hit rate against the offered rate."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt
import numpy as np

from loadtest.stats import PERCENTILES, ModeResult

LATENCIES = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))
THROUGHPUTS = (("output_tokens_per_s", "output tok/s"), ("total_tokens_per_s", "total tok/s"))


def write_all(runs: dict[int, dict[str, ModeResult]], out: Path) -> dict[str, Path]:
    """Every plot the runs allow, keyed `latency-c<C>`, `throughput-c<C>` and `sweep`."""
    images: dict[str, Path] = {}
    for concurrency, modes in runs.items():
        for kind, plot in (("latency", latency), ("throughput", throughput)):
            name = f"{kind}-c{concurrency}"
            images[name] = plot(modes, concurrency, out / f"{name}.png")
    if len(runs) > 1:
        images["sweep"] = sweep(runs, out / "sweep.png")
    return images


def latency(modes: dict[str, ModeResult], concurrency: int, path: Path) -> Path:
    """One panel per latency metric; bars p50/p90/p99 grouped by mode."""
    fig, axes = plt.subplots(1, len(LATENCIES), figsize=(4 * len(LATENCIES), 4), squeeze=False)
    positions = np.arange(len(modes))
    width = 0.8 / len(PERCENTILES)
    for ax, (field, title) in zip(axes[0], LATENCIES, strict=True):
        for i, p in enumerate(PERCENTILES):
            values = [getattr(r, field).get(f"p{p}", 0.0) for r in modes.values()]
            ax.bar(positions + (i - 1) * width, values, width, label=f"p{p}")
        ax.set_title(f"{title} (ms)")
        ax.set_xticks(positions, list(modes), rotation=20)
    axes[0][0].legend()
    fig.suptitle(f"Latency percentiles, concurrency {concurrency}")
    return _save(fig, path)


def throughput(modes: dict[str, ModeResult], concurrency: int, path: Path) -> Path:
    fig, axes = plt.subplots(1, len(THROUGHPUTS), figsize=(5 * len(THROUGHPUTS), 4), squeeze=False)
    for ax, (field, title) in zip(axes[0], THROUGHPUTS, strict=True):
        bars = ax.bar(list(modes), [getattr(r, field) for r in modes.values()], color="tab:blue")
        ax.bar_label(bars, fmt="%.0f")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"Throughput, concurrency {concurrency}")
    return _save(fig, path)


def sweep(runs: dict[int, dict[str, ModeResult]], path: Path) -> Path:
    """Throughput of every mode against concurrency (log-scaled x)."""
    concurrencies = sorted(runs)
    modes = list(dict.fromkeys(mode for c in concurrencies for mode in runs[c]))
    fig, axes = plt.subplots(1, len(THROUGHPUTS), figsize=(5 * len(THROUGHPUTS), 4), squeeze=False)
    for ax, (field, title) in zip(axes[0], THROUGHPUTS, strict=True):
        for mode in modes:
            points = [(c, getattr(runs[c][mode], field)) for c in concurrencies if mode in runs[c]]
            ax.plot(*zip(*points, strict=True), marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.set_xlabel("concurrency")
        ax.set_title(title)
    axes[0][0].legend()
    fig.suptitle("Throughput vs concurrency")
    return _save(fig, path)


def ladder(stages: dict[str, dict[float, ModeResult]], slo_ttft_p90_ms: float | None, path: Path) -> Path:
    """TTFT p90 (log scale, the SLO as a line) and prefix hit rate of every mode against the rate."""
    fig, (ttft, hits) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, results in stages.items():
        rates = sorted(results)
        ttft.plot(rates, [results[r].ttft_ms.get("p90", float("nan")) for r in rates], marker="o", label=mode)
        hit_rates = [results[r].prefix_cache_hit_rate for r in rates]
        hits.plot(rates, [float("nan") if h is None else h for h in hit_rates], marker="o", label=mode)
    if slo_ttft_p90_ms is not None:
        ttft.axhline(slo_ttft_p90_ms, color="grey", linestyle="--", label="SLO")
    ttft.set_yscale("log")
    ttft.set_title("TTFT p90 (ms)")
    hits.set_title("prefix hit rate")
    for ax in (ttft, hits):
        ax.set_xlabel("offered rate (req/s)")
    ttft.legend()
    fig.suptitle("Rate ladder")
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
