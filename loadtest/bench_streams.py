"""`python -m loadtest bench-streams`: pick latency and picker memory with many open ext_proc streams.

With the shipped Envoy config every in-flight HTTP request holds one ext_proc stream open until
its response ends, so a picker in front of long generations holds tens of thousands of streams.
This opens `--streams` of them the way Envoy does (request headers, buffered body, routed, then
left open), and at each checkpoint measures, for fresh requests, the time from sending the body
to receiving the routing answer (what a gateway waits) and the picker's own decision time, plus
the picker's RSS and CPU. Then it closes them all and checks the in-flight count returns to zero.

    python -m loadtest bench-streams --streams 20000 [--checkpoints 0,5000,10000,20000] [--out DIR]

The picker runs as a subprocess (`python -m picker serve`) over simulated replicas; the streams
are spread over `--channels` HTTP/2 connections, as Envoy's workers would.
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

import grpc
import httpx
import orjson
import psutil
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import HttpBody, HttpHeaders, ProcessingRequest
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub

from loadtest.observe import metric_totals
from loadtest.processes import SimProcess, start_picker

OPEN_BATCH = 500  # streams opened concurrently
SAMPLE_PICKS = 300  # fresh requests timed at each checkpoint


def _headers() -> ProcessingRequest:
    pairs = (
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        (":authority", "gateway"),
        ("content-type", "application/json"),
    )
    message = ProcessingRequest(
        request_headers=HttpHeaders(
            headers=HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs])
        )
    )
    message.protocol_config.request_body_mode = ProcessingMode.BUFFERED  # type: ignore[assignment]
    message.protocol_config.response_body_mode = ProcessingMode.NONE  # type: ignore[assignment]
    return message


HEADERS = _headers()


def body(i: int) -> ProcessingRequest:
    """A ~2 KB chat request; one of 50 shared system prompts, so the prefix index does work."""
    doc = {
        "model": "m",
        "messages": [
            {"role": "system", "content": f"system prompt {i % 50} " * 80},
            {"role": "user", "content": f"question {i}"},
        ],
        "stream": True,
    }
    return ProcessingRequest(request_body=HttpBody(body=orjson.dumps(doc), end_of_stream=True))


async def open_stream(stub: ExternalProcessorStub, i: int) -> grpc.aio.StreamStreamCall:
    """Headers, then body: routed and left open, like an HTTP request whose response streams."""
    call = stub.Process()
    await call.write(HEADERS)
    await call.read()
    await call.write(body(i))
    answer = await call.read()
    if answer is grpc.aio.EOF or not answer.request_body.response.HasField("header_mutation"):
        raise RuntimeError(f"stream {i} was not routed: {answer}")
    return call


async def timed_pick(stub: ExternalProcessorStub, i: int) -> float:
    """Seconds from sending the body to the routing answer, for a fresh request."""
    call = stub.Process()
    await call.write(HEADERS)
    await call.read()
    started = time.perf_counter()
    await call.write(body(i))
    await call.read()
    elapsed = time.perf_counter() - started
    await call.done_writing()
    await call.read()
    return elapsed


@dataclass(slots=True)
class Checkpoint:
    streams: int
    pick_p50_ms: float
    pick_p99_ms: float
    pick_max_ms: float
    picker_decision_mean_ms: float  # inside the picker (picker_pick_duration_seconds)
    rss_mb: float
    rss_per_stream_kb: float | None
    open_seconds: float  # to open the streams since the previous checkpoint
    picker_cpu_seconds: float  # picker CPU since the previous checkpoint


async def bench(streams: int, checkpoints: Sequence[int], channels: int, out: Path) -> dict[str, object]:
    """Run the benchmark; `out` (existing) receives the picker's log."""
    async with contextlib.AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimProcess("--replicas", "4", "--port", "0"))
        picker = await stack.enter_async_context(start_picker(sim.addresses, out / "picker.log"))
        http = await stack.enter_async_context(httpx.AsyncClient(timeout=10.0))
        metrics = f"http://127.0.0.1:{picker.metrics_port}/metrics"
        proc = psutil.Process(picker.pid)
        options = [("grpc.max_receive_message_length", 16 << 20)]
        pool = [grpc.aio.insecure_channel(picker.address, options=options) for _ in range(channels)]
        for channel in pool:
            stack.push_async_callback(channel.close)
        stubs = [ExternalProcessorStub(channel) for channel in pool]
        for i in range(20):  # warm-up: connections, caches
            await timed_pick(stubs[i % channels], i)
        base_rss = proc.memory_info().rss
        held: list[grpc.aio.StreamStreamCall] = []
        results: list[Checkpoint] = []
        for target in sorted(set(checkpoints) | {streams}):
            cpu, started = sum(proc.cpu_times()[:2]), time.monotonic()
            while len(held) < target:
                batch = range(len(held), min(target, len(held) + OPEN_BATCH))
                held += await asyncio.gather(*(open_stream(stubs[i % channels], i) for i in batch))
            opened, cpu_used = time.monotonic() - started, sum(proc.cpu_times()[:2]) - cpu
            before = await metric_totals(http, metrics)
            samples = [await timed_pick(stubs[i % channels], 10_000_000 + i) for i in range(SAMPLE_PICKS)]
            after = await metric_totals(http, metrics)
            decisions = (
                after["picker_pick_duration_seconds_count"] - before["picker_pick_duration_seconds_count"]
            )
            decided = after["picker_pick_duration_seconds_sum"] - before["picker_pick_duration_seconds_sum"]
            rss = proc.memory_info().rss
            samples.sort()
            results.append(
                Checkpoint(
                    streams=len(held),
                    pick_p50_ms=1000 * statistics.median(samples),
                    pick_p99_ms=1000 * samples[int(0.99 * (len(samples) - 1))],
                    pick_max_ms=1000 * samples[-1],
                    picker_decision_mean_ms=1000 * decided / decisions,
                    rss_mb=rss / 2**20,
                    rss_per_stream_kb=(rss - base_rss) / 1024 / len(held) if held else None,
                    open_seconds=opened,
                    picker_cpu_seconds=cpu_used,
                )
            )
            print(json.dumps(asdict(results[-1])), flush=True)
        assert (await metric_totals(http, metrics))["picker_inflight_requests"] == len(held)
        closing = time.monotonic()
        for call in held:
            await call.done_writing()
        await asyncio.gather(*(call.read() for call in held))
        held.clear()
        drained = await metric_totals(http, metrics)
        report: dict[str, object] = {
            "streams": streams,
            "channels": channels,
            "base_rss_mb": base_rss / 2**20,
            "checkpoints": [asdict(c) for c in results],
            "close_seconds": time.monotonic() - closing,
            "rss_after_close_mb": proc.memory_info().rss / 2**20,
            "inflight_after_close": drained["picker_inflight_requests"],
            "streams_open_after_close": drained["picker_extproc_streams_open"],
        }
    return report


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--streams", type=int, default=20_000)
    parser.add_argument("--checkpoints", default="0,1000,5000,10000", help="also measured on the way up")
    parser.add_argument("--channels", type=int, default=2, help="HTTP/2 connections (Envoy: one per worker)")
    parser.add_argument(
        "--out", type=Path, default=Path("results") / f"bench-streams-{time.strftime('%Y%m%d-%H%M%S')}"
    )


def main(args: argparse.Namespace) -> None:
    checkpoints = [int(c) for c in args.checkpoints.split(",") if c.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(bench(args.streams, checkpoints, args.channels, args.out))
    (args.out / "bench_streams.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "checkpoints"}, indent=2))
    print(f"written: {args.out / 'bench_streams.json'}")

