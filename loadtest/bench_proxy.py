"""Requests/s through Envoy + picker vs Envoy round-robin, for small requests, with every process's CPU.

    python -m loadtest bench-proxy [--duration 10] [--concurrency 64] [--clients 2] [--replicas 4] \\
        --out DIR

The replicas are an Envoy serving canned answers (`direct_response`) on one port per replica, with
a vLLM-style `/metrics` page: they cost almost nothing, so what the run measures is the proxy path.
The headline number is requests per picker CPU-second (the picker's own process time), which holds
on a machine whose cores are shared with the load generator; a picker core's capacity is that.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson

from loadtest.envoy import Envoy, command
from loadtest.observe import process_cpu
from loadtest.processes import free_port, poll_until, start_picker, stop_process

BODY = orjson.dumps({"model": "bench", "prompt": "Say hi. " * 24, "max_tokens": 1})
ANSWER = orjson.dumps({"id": "x", "object": "text_completion", "choices": [{"text": "hi"}]})
METRICS_PAGE = (
    'vllm:num_requests_running{engine="0",model_name="bench"} 0\n'
    'vllm:num_requests_waiting{engine="0",model_name="bench"} 0\n'
    'vllm:kv_cache_usage_perc{engine="0",model_name="bench"} 0.1\n'
    'vllm:cache_config_info{block_size="16",num_gpu_blocks="4096",engine="0",model_name="bench"} 1\n'
)


_TYPES = "type.googleapis.com/envoy.extensions.filters."


def canned_replicas(
    ports: Sequence[int], answer: bytes = ANSWER, metrics_page: bytes = METRICS_PAGE.encode()
) -> dict[str, Any]:
    """An Envoy config answering like a vLLM replica on each port, from memory, at once: headers
    and the whole `answer` in one go. The request's `x-rid` header comes back as a response header."""

    def listener(port: int) -> dict[str, Any]:
        routes = [
            {
                "match": {"path": "/metrics"},
                "direct_response": {"status": 200, "body": {"inline_string": metrics_page.decode()}},
            },
            {
                "match": {"prefix": "/"},
                "direct_response": {"status": 200, "body": {"inline_string": answer.decode()}},
                "response_headers_to_add": [{"header": {"key": "x-rid", "value": "%REQ(x-rid)%"}}],
            },
        ]
        manager = {
            "@type": _TYPES + "network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": f"replica{port}",
            "route_config": {
                "virtual_hosts": [{"name": "r", "domains": ["*"], "routes": routes}],
                "max_direct_response_body_size_bytes": 1 << 20,  # a real vLLM page is ~50 KB
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": _TYPES + "http.router.v3.Router"},
                }
            ],
        }
        return {
            "name": f"replica-{port}",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [
                {
                    "filters": [
                        {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
                    ]
                }
            ],
        }

    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": [listener(port) for port in ports]},
    }


@contextlib.asynccontextmanager
async def start_replicas(
    count: int, workdir: Path, answer: bytes = ANSWER, metrics_page: bytes = METRICS_PAGE.encode()
) -> AsyncIterator[tuple[list[str], int]]:
    """Canned replicas on `count` free ports: yields (addresses, pid)."""
    ports = [free_port() for _ in range(count)]
    config = canned_replicas(ports, answer, metrics_page)
    argv = command(
        config,
        concurrency=1,
        admin_address_path=workdir / "replicas-admin",
        config_file=workdir / "replicas.json",
    )
    with (workdir / "replicas.log").open("ab") as log:
        process = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=log)
    addresses = [f"127.0.0.1:{port}" for port in ports]
    try:
        async with httpx.AsyncClient(timeout=1.0) as http:

            async def ready() -> bool | None:
                try:
                    for address in addresses:
                        (await http.get(f"http://{address}/metrics")).raise_for_status()
                except httpx.HTTPError:
                    return None
                return True

            await poll_until(ready, within=20.0, what="canned replicas")
        yield addresses, process.pid
    finally:
        await stop_process(process)


async def client(url: str, concurrency: int, duration: float) -> dict[str, Any]:
    """Closed loop: `concurrency` workers post small completions for `duration` seconds."""
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + duration
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def worker() -> None:
            nonlocal errors
            headers = {"content-type": "application/json"}
            while (start := time.monotonic()) < deadline:
                try:
                    async with http.post(url + "/v1/completions", data=BODY, headers=headers) as response:
                        await response.read()
                        ok = response.status == 200
                except aiohttp.ClientError:
                    ok = False
                if ok:
                    latencies.append(time.monotonic() - start)
                else:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"latencies": latencies, "errors": errors}


async def drive(
    url: str, concurrency: int, duration: float, clients: int, pids: dict[str, int]
) -> dict[str, Any]:
    """Run `clients` client processes against `url`; CPU of every process over the window."""
    share = [concurrency // clients + (i < concurrency % clients) for i in range(clients)]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "loadtest",
            "proxy-client",
            url,
            str(n),
            str(duration),
            stdout=asyncio.subprocess.PIPE,
        )
        for n in share
    ]
    roles = {**pids, **{f"client-{i}": p.pid for i, p in enumerate(procs)}}
    before, started = process_cpu(roles), time.monotonic()
    outputs = [await p.communicate() for p in procs]
    cpu_after = process_cpu(pids)
    elapsed = time.monotonic() - started
    cpu = {role: round(cpu_after[role] - before[role], 3) for role in pids}
    results = [json.loads(out) for out, _ in outputs]
    for i, result in enumerate(results):
        cpu[f"client-{i}"] = round(result["cpu"] - before[f"client-{i}"], 3)
    latencies = sorted(x for r in results for x in r["latencies"])
    requests = len(latencies)
    summary: dict[str, Any] = {
        "requests": requests,
        "errors": sum(r["errors"] for r in results),
        "requests_per_s": round(requests / elapsed, 1),
        "latency_ms": {
            "p50": round(1000 * statistics.median(latencies), 3) if latencies else None,
            "p99": round(1000 * latencies[int(0.99 * (requests - 1))], 3) if latencies else None,
        },
        "cpu_seconds": cpu,
    }
    if "picker" in cpu and cpu["picker"] > 0:
        summary["picker_cpu_ms_per_request"] = round(1000 * cpu["picker"] / requests, 3)
        summary["requests_per_picker_cpu_second"] = round(requests / cpu["picker"], 1)
    return summary


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"concurrency": args.concurrency, "duration_s": args.duration, "modes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as scratch:
        workdir = Path(scratch)
        async with start_replicas(args.replicas, workdir) as (replicas, replicas_pid):
            for mode in ("envoy-rr", "picker"):
                async with contextlib.AsyncExitStack() as stack:
                    pids = {"replicas": replicas_pid}
                    pickers = []
                    if mode == "picker":
                        picker = await stack.enter_async_context(
                            start_picker(replicas, workdir / "picker.log")
                        )
                        pids["picker"] = picker.pid
                        pickers.append(picker.address)
                    envoy = await stack.enter_async_context(
                        Envoy.start(
                            "picker" if mode == "picker" else "rr",
                            endpoints=replicas,
                            picker=pickers,
                            workdir=workdir / mode,
                        )
                    )
                    pids["envoy"] = envoy.pid
                    await drive(envoy.url, args.concurrency, args.warmup, args.clients, pids)
                    result = await drive(envoy.url, args.concurrency, args.duration, args.clients, pids)
                    if mode == "picker":
                        stats = await envoy.stats("ext_proc")
                        result["extproc_failures"] = stats.get(
                            "http.inference.ext_proc.failure_mode_allowed", 0
                        )
                    out["modes"][mode] = result
    rr, picked = out["modes"]["envoy-rr"], out["modes"]["picker"]
    out["picker_vs_rr_requests_per_s"] = round(picked["requests_per_s"] / rr["requests_per_s"], 3)
    return out


def render(result: dict[str, Any]) -> str:
    lines = [
        f"concurrency {result['concurrency']}, {result['duration_s']} s per mode",
        "| mode | req/s | p50 ms | p99 ms | errors | CPU s (envoy / picker / replicas / clients) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for mode, r in result["modes"].items():
        cpu = r["cpu_seconds"]
        clients = sum(v for k, v in cpu.items() if k.startswith("client"))
        lines.append(
            f"| {mode} | {r['requests_per_s']} | {r['latency_ms']['p50']} | {r['latency_ms']['p99']} | "
            f"{r['errors']} | {cpu['envoy']} / {cpu.get('picker', '-')} / {cpu['replicas']} / {clients:.2f} |"
        )
    picked = result["modes"]["picker"]
    lines.append(
        f"\npicker: {picked.get('picker_cpu_ms_per_request')} ms CPU per request = "
        f"{picked.get('requests_per_picker_cpu_second')} requests per picker core-second; "
        f"picker/rr throughput {result['picker_vs_rr_requests_per_s']}"
    )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "proxy-client":  # a load-generating child process
        parser.add_argument("url")
        parser.add_argument("concurrency", type=int)
        parser.add_argument("duration", type=float)
        return
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per mode")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per mode first")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)


def main(args: argparse.Namespace) -> None:
    if args.command == "proxy-client":
        result = asyncio.run(client(args.url, args.concurrency, args.duration))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result["cpu"] = usage.ru_utime + usage.ru_stime
        sys.stdout.write(json.dumps(result))
        return
    result = asyncio.run(bench(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_proxy.json").write_text(json.dumps(result, indent=2))
    text = render(result)
    (args.out / "bench_proxy.md").write_text(text + "\n")
    print(text)
