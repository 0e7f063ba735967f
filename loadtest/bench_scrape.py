"""What keeping metrics fresh costs: picker CPU per scrape of a real-size vLLM page, by pool size.

    python -m loadtest bench-scrape [--endpoints 8,64] [--seconds 10] [--interval 0.1] --out DIR

The page is the simulator's (every vLLM V1 metric family with vLLM's buckets, ~50 KB), captured
once and served from memory by Envoy `direct_response` listeners, so serving it costs the
measurement nothing and the picker's CPU is its scraper's. The picker gets no requests; an idle
picker (scrape interval of an hour) over the same window gives the baseline to subtract. Scrapes
are counted by the serving Envoy. The simulator's own cost per page it renders is measured by
scraping a `vllm_sim` process the same way.

Writes bench_scrape.json and bench_scrape.md to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from loadtest.bench_proxy import start_replicas
from loadtest.observe import process_cpu
from loadtest.processes import SimProcess, start_picker


async def capture_page() -> bytes:
    """A `vllm_sim` replica's /metrics page, after a few requests so every series exists."""
    async with (
        SimProcess("--replicas", "1", "--port", "0", "--speed", "50") as sim,
        httpx.AsyncClient() as http,
    ):
        (address,) = sim.addresses
        body = {"model": await _model(http, address), "prompt": "hello there", "max_tokens": 4}
        for _ in range(3):
            (await http.post(f"http://{address}/v1/completions", json=body, timeout=30)).raise_for_status()
        page = await http.get(f"http://{address}/metrics")
        page.raise_for_status()
        return page.content


async def _model(http: httpx.AsyncClient, address: str) -> str:
    models = await http.get(f"http://{address}/v1/models")
    return str(models.json()["data"][0]["id"])


@contextlib.asynccontextmanager
async def idle_picker(endpoints: Sequence[str], log: Path, interval: float) -> AsyncIterator[int]:
    config = (
        "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
        f"metrics: {{scrapeInterval: {interval}}}\n"
        f"saturationDetector: {{metricsStalenessThreshold: {max(2.0, 3 * interval)}}}\n"
    )
    async with start_picker(endpoints, log, ("--config-text", config)) as picker:
        yield picker.pid


async def served_scrapes(admin: str) -> int:
    """/metrics requests the canned replicas have answered so far."""
    async with httpx.AsyncClient() as http:
        stats = (await http.get(f"http://{admin}/stats", params={"format": "json"})).json()["stats"]
    return sum(s["value"] for s in stats if s.get("name", "").endswith("downstream_rq_2xx"))


async def measure_picker(
    endpoints: int, page: bytes, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    async with start_replicas(endpoints, workdir, metrics_page=page) as (replicas, _):
        admin = (workdir / "replicas-admin").read_text().strip()
        cpu: dict[str, float] = {}
        scrapes = 0
        for name, interval in (("idle", 3600.0), ("scraping", args.interval)):
            async with idle_picker(replicas, workdir / f"picker-{endpoints}-{name}.log", interval) as pid:
                before, served = process_cpu({"picker": pid}), await served_scrapes(admin)
                await asyncio.sleep(args.seconds)  # the measured window itself
                cpu[name] = process_cpu({"picker": pid})["picker"] - before["picker"]
                if name == "scraping":
                    scrapes = await served_scrapes(admin) - served
    per_scrape_ms = 1000 * (cpu["scraping"] - cpu["idle"]) / scrapes if scrapes else None
    return {
        "endpoints": endpoints,
        "scrapes": scrapes,
        "picker_cpu_s": round(cpu["scraping"], 3),
        "idle_picker_cpu_s": round(cpu["idle"], 3),
        "picker_cpu_ms_per_scrape": None if per_scrape_ms is None else round(per_scrape_ms, 3),
        "cores_per_endpoint_at_interval": (
            None if per_scrape_ms is None else round(per_scrape_ms / 1000 / args.interval, 5)
        ),
    }


async def measure_simulator(args: argparse.Namespace) -> dict[str, Any]:
    """The simulator's CPU per /metrics page rendered, scraped as fast as one client can."""
    async with SimProcess("--replicas", "1", "--port", "0") as sim, httpx.AsyncClient() as http:
        assert sim.pid is not None
        (address,) = sim.addresses
        url = f"http://{address}/metrics"
        for _ in range(20):
            await http.get(url)
        before, pages = process_cpu({"sim": sim.pid}), 0
        deadline = time.monotonic() + min(args.seconds, 5.0)
        while time.monotonic() < deadline:
            (await http.get(url)).raise_for_status()
            pages += 1
        spent = process_cpu({"sim": sim.pid})["sim"] - before["sim"]
    return {"pages": pages, "sim_cpu_ms_per_page": round(1000 * spent / pages, 3)}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    page = await capture_page()
    out: dict[str, Any] = {
        "page_bytes": len(page),
        "scrape_interval_s": args.interval,
        "window_s": args.seconds,
        "pools": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-scrape-") as scratch:
        for endpoints in args.endpoints:
            workdir = Path(scratch) / f"n{endpoints}"
            workdir.mkdir()
            out["pools"].append(await measure_picker(endpoints, page, args, workdir))
            print(out["pools"][-1], flush=True)
    out["simulator"] = await measure_simulator(args)
    return out


def render(result: dict[str, Any]) -> str:
    lines = [
        f"Picker CPU per scrape of a {result['page_bytes']:,}-byte vLLM page "
        f"(scrape interval {result['scrape_interval_s']} s, {result['window_s']} s windows, idle "
        "picker's CPU subtracted)",
        "",
        "| endpoints | scrapes | picker CPU s (idle) | ms per scrape | cores per endpoint |",
        "| --- | --- | --- | --- | --- |",
    ]
    for pool in result["pools"]:
        cpu = f"{pool['picker_cpu_s']} ({pool['idle_picker_cpu_s']})"
        lines.append(
            f"| {pool['endpoints']} | {pool['scrapes']} | {cpu} "
            f"| {pool['picker_cpu_ms_per_scrape']} | {pool['cores_per_endpoint_at_interval']} |"
        )
    sim = result["simulator"]
    lines += ["", f"Simulator: {sim['sim_cpu_ms_per_page']} ms CPU per page rendered ({sim['pages']} pages)."]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument(
        "--endpoints",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[8, 64],
        help="pool sizes, comma-separated (8,64)",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per pool size")
    parser.add_argument("--interval", type=float, default=0.1, help="the picker's scrape interval")
    parser.add_argument("--out", type=Path, required=True)


def main(args: argparse.Namespace) -> None:
    result = asyncio.run(bench(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_scrape.json").write_text(json.dumps(result, indent=2) + "\n")
    text = render(result)
    (args.out / "bench_scrape.md").write_text(text + "\n")
    print(text)
