"""Shared end-to-end fixtures: fake vLLM replicas, Envoy, and the picker as a subprocess.

- `fake_vllm(n, **options)` -> `list[FakeVLLM]`: in-process aiohttp replicas on free ports whose
  `/metrics` values a test sets directly and which record every inference request they serve.
- `envoy(config, endpoints=..., picker=..., ...)` -> `loadtest.envoy.Envoy`, stopped at teardown.
- `refused_address`: a "127.0.0.1:port" nothing answers on (a picker that is down).
- `picker_server(endpoints, *args)` -> `PickerProcess`, started with `--secure-serving=false` and
  awaited until its gRPC health service reports `readiness` SERVING.
- `picker_metrics(picker)`, `metric(samples, name, **labels)`: read a picker's Prometheus page.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from loadtest.envoy import Envoy
from loadtest.processes import PickerProcess, start_picker
from picker.errors import openai_error_body

MODEL = "fake-model"


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One inference request as the replica received it (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass(slots=True)
class VLLMMetrics:
    """The gauges a picker scrapes, with vLLM's names and labels (reference.md section 4)."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # 0..1
    block_size: int = 16
    num_gpu_blocks: int = 1024

    def render(self, model: str) -> str:
        labels = f'engine="0",model_name="{model}"'
        info = (
            f'block_size="{self.block_size}",enable_prefix_caching="True",'
            f'num_gpu_blocks="{self.num_gpu_blocks}",{labels}'
        )
        return (
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{{{labels}}} {self.running}\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{{{labels}}} {self.waiting}\n"
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f"vllm:kv_cache_usage_perc{{{labels}}} {self.kv_usage}\n"
            "# TYPE vllm:cache_config_info gauge\n"
            f"vllm:cache_config_info{{{info}}} 1.0\n"
        )


@dataclass
class FakeVLLM:
    """A vLLM-like replica: OpenAI completions/chat (JSON or SSE), `/v1/models`, `/metrics`.

    Every response carries `x-sim-replica: <name>`. Inference requests (all but `/metrics`,
    which a picker scrapes continuously) are appended to `requests`. A completion streams
    `max_tokens` chunks (default `default_tokens`), each `chunk_delay` seconds apart.
    """

    name: str
    model: str = MODEL
    metrics: VLLMMetrics = field(default_factory=VLLMMetrics)
    metrics_status: int = 200  # e.g. 503: scrapes fail, the replica's metrics go stale
    chunk_delay: float = 0.0
    default_tokens: int = 4
    requests: list[RecordedRequest] = field(default_factory=list)
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def app(self) -> web.Application:
        # vLLM takes any body size; aiohttp's default limit (1 MiB) would answer 413 itself.
        app = web.Application(middlewares=[self._tag], client_max_size=1 << 30)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completion)
        app.router.add_post("/v1/chat/completions", self._completion)
        return app

    @web.middleware
    async def _tag(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path != "/metrics":
            body = await request.read()
            headers = {k.lower(): v for k, v in request.headers.items()}
            self.requests.append(RecordedRequest(request.method, request.path, headers, body))
        response: web.StreamResponse = await handler(request)
        return response

    def _headers(self) -> dict[str, str]:
        return {"x-sim-replica": self.name}

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(
            status=self.metrics_status,
            text=self.metrics.render(self.model),
            content_type="text/plain",
            headers=self._headers(),
        )

    async def _models(self, _: web.Request) -> web.Response:
        models = {"object": "list", "data": [{"id": self.model, "object": "model"}]}
        return web.Response(
            body=orjson.dumps(models), content_type="application/json", headers=self._headers()
        )

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
            tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 0)
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            return web.Response(
                status=400,
                body=openai_error_body(400, "request body is not a JSON object"),
                content_type="application/json",
                headers=self._headers(),
            )
        chat = request.path.endswith("/chat/completions")
        texts = [f" t{i}" for i in range(tokens or self.default_tokens)]
        model = body.get("model", self.model)
        if not body.get("stream"):
            choice: dict[str, Any] = (
                {"index": 0, "message": {"role": "assistant", "content": "".join(texts)}}
                if chat
                else {"index": 0, "text": "".join(texts)}
            )
            answer = {
                "id": "cmpl-fake",
                "object": "chat.completion" if chat else "text_completion",
                "model": model,
                "choices": [choice | {"finish_reason": "length"}],
                "usage": {"completion_tokens": len(texts)},
            }
            return web.Response(
                body=orjson.dumps(answer), content_type="application/json", headers=self._headers()
            )
        response = web.StreamResponse(headers=self._headers() | {"content-type": "text/event-stream"})
        await response.prepare(request)
        for i, text in enumerate(texts):
            delta = {"delta": {"content": text}} if chat else {"text": text}
            last = i == len(texts) - 1
            chunk = {
                "id": "cmpl-fake",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "model": model,
                "choices": [{"index": 0, **delta, "finish_reason": "length" if last else None}],
            }
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@pytest.fixture
def refused_address() -> Iterator[str]:
    """ "127.0.0.1:port" where connections are refused: bound, never listening, held all test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
async def fake_vllm() -> AsyncIterator[Callable[..., Awaitable[list[FakeVLLM]]]]:
    """Factory: `await fake_vllm(n, chunk_delay=..., ...)` -> n running replicas named 0, 1, ..."""
    names = itertools.count()
    async with contextlib.AsyncExitStack() as stack:

        async def start(n: int = 1, **options: Any) -> list[FakeVLLM]:
            replicas = []
            for _ in range(n):
                replica = FakeVLLM(str(next(names)), **options)
                runner = web.AppRunner(replica.app(), access_log=None)
                await runner.setup()
                stack.push_async_callback(runner.cleanup)
                await web.TCPSite(runner, "127.0.0.1", 0).start()
                replica.port = runner.addresses[0][1]
                replicas.append(replica)
            return replicas

        yield start


@pytest.fixture
async def envoy(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Envoy]]]:
    """Factory: `await envoy("picker"|"duplex"|"rr", endpoints=[...], picker=[...], ...)`.

    Takes `loadtest.envoy.Envoy.start`'s arguments; logs land in the test's tmp_path.
    """
    runs = itertools.count()
    async with contextlib.AsyncExitStack() as stack:

        async def start(config: str = "picker", **options: Any) -> Envoy:
            workdir = tmp_path / f"envoy-{next(runs)}"
            return await stack.enter_async_context(Envoy.start(config, workdir=workdir, **options))

        yield start


@pytest.fixture
async def picker_server(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[PickerProcess]]]:
    """Factory: `await picker_server(endpoints, *extra_cli_args)` -> a ready plaintext picker
    (`loadtest.processes.start_picker`), stopped at teardown."""
    runs = itertools.count()
    async with contextlib.AsyncExitStack() as stack:

        async def start(endpoints: Sequence[str], *args: str) -> PickerProcess:
            log_path = tmp_path / f"picker-{next(runs)}.log"
            return await stack.enter_async_context(start_picker(endpoints, log_path, args))

        yield start


async def picker_metrics(picker: PickerProcess) -> list[Sample]:
    async with httpx.AsyncClient(timeout=5.0) as http:
        page = (await http.get(f"http://127.0.0.1:{picker.metrics_port}/metrics")).text
    return [sample for family in text_string_to_metric_families(page) for sample in family.samples]


def metric(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The value of the sample `name` whose labels include `labels`, if there is one."""
    for sample in samples:
        if sample.name == name and labels.items() <= sample.labels.items():
            return sample.value
    return None
