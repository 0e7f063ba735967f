"""Lean close, checked byte for byte: many streams through the real Envoy from an instant upstream.

    python -m loadtest bench-lean [--streams 10000] [--concurrency 64] [--burners 2] [--events 8] \\
        --out DIR

The gateway is `envoy/envoy-gie.yaml` (request and response bodies FULL_DUPLEX_STREAMED, as GIE
gateways call an EPP). The replicas are Envoy `direct_response` listeners that answer every
request at once, headers and the whole SSE body in one go: the worst case for a picker that ends
its ext_proc stream, since the response is back before a slow picker could have closed. Burner
processes keep both cores busy so the picker is late as often as it can be. Every stream's status,
`x-rid` echo and body are compared with what the replica sent.

Variants, each on its own Envoy and picker:
- `close`: the shipped picker in its default mode (the last request-phase answer and the end of
  the RPC in one gRPC batch);
- `echo`: the same picker handing every response chunk back (`--response-processing=echo`), the
  control;
- `separate-write close`: a minimal ext_proc server, in this process, that answers as the picker
  does but ends the RPC in a write of its own after its last answer: the ordering the picker
  avoids, shown here losing responses.

Writes bench_lean.json and bench_lean.md to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest

from loadtest.bench_proxy import start_replicas
from loadtest.envoy import Envoy
from loadtest.observe import process_cpu
from loadtest.processes import start_picker
from picker.protocol.answers import Phase, route, streamed_body
from picker.protocol.health import EXTPROC

VARIANTS = ("close", "echo", "separate-write close")
EXT_PROC = "http.inference.ext_proc."


def sse_answer(events: int) -> bytes:
    """The replicas' answer: `events` numbered SSE events, then [DONE]."""
    chunks = [b'data: {"choices":[{"index":0,"text":" t%d"}]}\n\n' % i for i in range(events)]
    return b"".join(chunks) + b"data: [DONE]\n\n"


def verdict(expected: bytes, status: int, rid: str | None, wanted_rid: str, body: bytes) -> str:
    """How one stream came out: ok, or the kind of damage."""
    if status != 200:
        return f"http_{status}"
    if rid != wanted_rid:
        return "wrong_stream"
    if body == expected:
        return "ok"
    if len(body) < len(expected):
        return "lost_bytes"
    if len(body) > len(expected):
        return "duplicated_bytes"
    return "reordered_bytes"


async def drive(url: str, streams: int, concurrency: int, expected: bytes) -> dict[str, Any]:
    """`streams` chat requests, `concurrency` at a time; each answer checked against `expected`."""
    outcomes: Counter[str] = Counter()
    lost = 0
    slots = asyncio.Semaphore(concurrency)
    body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"%d"}]}'
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def one(i: int) -> None:
            nonlocal lost
            rid = f"r{i}"
            headers = {"content-type": "application/json", "x-rid": rid}
            async with slots:
                try:
                    async with http.post(url + "/v1/chat/completions", data=body % i, headers=headers) as r:
                        got = await r.read()
                        kind = verdict(expected, r.status, r.headers.get("x-rid"), rid, got)
                except aiohttp.ClientError as exc:
                    kind, got = f"client_{type(exc).__name__}", b""
            outcomes[kind] += 1
            lost += max(0, len(expected) - len(got)) if kind == "lost_bytes" else 0

        started = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(streams)))
        elapsed = time.monotonic() - started
    return {
        "streams": streams,
        "outcomes": dict(outcomes),
        "bytes_lost": lost,
        "streams_per_s": round(streams / elapsed, 1),
    }


class SeparateWriteClose:
    """An EPP that ends the RPC in its own write after the request phase (the unsafe ordering)."""

    def __init__(self, destination: str) -> None:
        self.destination = destination

    async def process(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        chunks: list[bytes] = []
        async for raw in requests:
            message = ProcessingRequest.FromString(raw)
            kind = message.WhichOneof("request")
            ended = (kind == "request_headers" and message.request_headers.end_of_stream) or (
                kind == "request_body" and message.request_body.end_of_stream
            )
            if kind == "request_body" and message.request_body.body:
                chunks.append(message.request_body.body)
            if ended:
                yield route(Phase.REQUEST_HEADERS, self.destination)
                if kind == "request_body":
                    yield streamed_body(Phase.REQUEST_BODY, b"".join(chunks), True)
                return  # the end of the RPC follows in a separate write

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        server = grpc.aio.server()
        handler = grpc.stream_stream_rpc_method_handler(self.process)
        service = grpc.method_handlers_generic_handler(EXTPROC, {"Process": handler})
        server.add_generic_rpc_handlers((service,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            yield f"127.0.0.1:{port}"
        finally:
            await server.stop(None)


@contextlib.contextmanager
def burners(count: int) -> Any:
    """Processes that spin on the CPU for as long as the block runs."""
    spinning = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for process in spinning:
            process.kill()
            process.wait()


async def run_variant(
    variant: str, replicas: list[str], workdir: Path, args: argparse.Namespace, expected: bytes
) -> dict[str, Any]:
    async with contextlib.AsyncExitStack() as stack:
        pids: dict[str, int] = {}
        if variant == "separate-write close":
            address = await stack.enter_async_context(SeparateWriteClose(replicas[0]).serving())
        else:
            mode = (f"--response-processing={variant}",)
            picker = await stack.enter_async_context(
                start_picker(replicas, workdir / f"picker-{variant}.log", mode)
            )
            address, pids["picker"] = picker.address, picker.pid
        envoy = await stack.enter_async_context(
            Envoy.start("gie", endpoints=replicas, picker=[address], workdir=workdir / variant)
        )
        pids["envoy"] = envoy.pid
        before = process_cpu(pids)
        with burners(args.burners):
            result = await drive(envoy.url, args.streams, args.concurrency, expected)
        cpu = process_cpu(pids)
        stats = await envoy.stats("ext_proc")
    result["cpu_ms_per_stream"] = {
        role: round(1000 * (cpu[role] - before[role]) / args.streams, 3) for role in pids
    }
    result["extproc_messages_per_stream"] = {
        "sent": round(stats[EXT_PROC + "stream_msgs_sent"] / args.streams, 2),
        "received": round(stats[EXT_PROC + "stream_msgs_received"] / args.streams, 2),
    }
    result["extproc_streams_failed"] = stats[EXT_PROC + "streams_failed"]
    return result


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    expected = sse_answer(args.events)
    out: dict[str, Any] = {
        "streams per variant": args.streams,
        "concurrency": args.concurrency,
        "burner processes": args.burners,
        "answer bytes": len(expected),
        "variants": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-lean-") as scratch:
        workdir = Path(scratch)
        async with start_replicas(args.replicas, workdir, expected) as (replicas, _):
            for variant in args.variants:
                out["variants"][variant] = await run_variant(variant, replicas, workdir, args, expected)
                print(f"{variant}: {out['variants'][variant]['outcomes']}", flush=True)
    return out


def render(result: dict[str, Any]) -> str:
    lines = [
        f"{result['streams per variant']} streams per variant, concurrency {result['concurrency']}, "
        f"{result['burner processes']} burner processes, {result['answer bytes']}-byte answers sent "
        "at once by the replica; gateway: envoy/envoy-gie.yaml (full duplex both ways)",
        "",
        "| variant | streams ok | damaged | bytes lost | ext_proc msgs/stream (sent / received) "
        "| picker CPU ms/stream | Envoy CPU ms/stream | streams/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for variant, r in result["variants"].items():
        damaged = {k: v for k, v in r["outcomes"].items() if k != "ok"}
        messages = r["extproc_messages_per_stream"]
        cpu = r["cpu_ms_per_stream"]
        lines.append(
            f"| {variant} | {r['outcomes'].get('ok', 0)} | {damaged or 0} | {r['bytes_lost']} | "
            f"{messages['sent']} / {messages['received']} | {cpu.get('picker', '-')} | {cpu['envoy']} | "
            f"{r['streams_per_s']} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--streams", type=int, default=10_000, help="streams per variant")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--burners", type=int, default=2, help="CPU-spinning processes during the run")
    parser.add_argument("--events", type=int, default=8, help="SSE events in each answer")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument(
        "--variants",
        type=lambda text: [v.strip() for v in text.split(",")],
        default=list(VARIANTS),
        help=f"comma-separated, of: {', '.join(VARIANTS)}",
    )
    parser.add_argument("--out", type=Path, required=True)


def main(args: argparse.Namespace) -> int:
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"error: unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    result = asyncio.run(bench(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_lean.json").write_text(json.dumps(result, indent=2) + "\n")
    text = render(result)
    (args.out / "bench_lean.md").write_text(text + "\n")
    print(text)
    close = result["variants"].get("close")
    return 0 if close is None or close["outcomes"] == {"ok": args.streams} else 1
