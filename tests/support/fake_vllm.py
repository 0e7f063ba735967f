"""The one fake vLLM replica of the test-suite, and the `fake_vllm` fixture that starts them.

`FakeVLLM` is an in-process aiohttp server on a free port: OpenAI completions and chat (JSON or
SSE), `/v1/models` and a `/metrics` page whose values a test sets directly. It records every
inference request, and can misbehave on demand: a failing, garbled, oversized or hanging
`/metrics`, a custom answer to inference requests, or a crash (`kill`) and a return on the same
port (`start`). Tests that need vLLM's real behaviour use the simulator (`vllm_sim`) instead;
this fake is for tests that must control exactly what a replica says.

    replicas = await fake_vllm(3, chunk_delay=0.01)   # named "0", "1", "2"
    replicas[0].metrics.waiting = 5; await replicas[1].kill(); await replicas[1].start()
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web

from picker.datalayer.scraper import USER_AGENT
from vllm_sim.openai_api import error_body

MODEL = "fake-model"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
METRICS_FAULTS = ("garbage", "hang", "huge")


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


@dataclass(eq=False)
class FakeVLLM:
    """A vLLM-like replica; every response carries `x-sim-replica: <name>`.

    Requests (all but the picker scraper's polls of `/metrics` and `/v1/models`) are appended to
    `requests`. A completion streams `max_tokens` chunks (default `default_tokens`), each
    `chunk_delay` seconds apart, unless `completion` answers instead; any model name is answered.
    """

    name: str = "0"
    model: str = MODEL
    metrics: VLLMMetrics = field(default_factory=VLLMMetrics)
    metrics_page: bytes | None = None  # served as is instead of `metrics`
    metrics_status: int = 200  # e.g. 503: scrapes fail, the replica's metrics go stale
    metrics_fault: str | None = None  # one of METRICS_FAULTS
    models_page: bytes | None = None  # served as is as /v1/models instead of `model`'s card
    lists_models: bool = True  # False: /v1/models is a 404 (a server that never tells)
    model_fetches: int = 0  # /v1/models requests received
    chunk_delay: float = 0.0
    default_tokens: int = 4
    completion: Handler | None = None  # answers /v1/completions and chat instead of the fake model
    requests: list[RecordedRequest] = field(default_factory=list)
    scrapes: int = 0  # /metrics requests received
    scrape_connections: set[asyncio.BaseTransport] = field(default_factory=set)  # and /v1/models
    release: asyncio.Event = field(default_factory=asyncio.Event)  # ends every hanging scrape
    port: int = 0  # 0 until started; kept across kill / start
    _scraped: asyncio.Condition = field(default_factory=asyncio.Condition, repr=False)
    _runner: web.AppRunner | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    async def start(self) -> None:
        """Listen on `port` (a free one the first time); after `kill`, the same port again."""
        # vLLM takes any body size; aiohttp's default limit (1 MiB) would answer 413 itself.
        app = web.Application(middlewares=[self._tag], client_max_size=1 << 30)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completion)
        app.router.add_post("/v1/chat/completions", self._completion)
        app.on_response_prepare.append(self._name_replica)
        # A client leaving cancels its handler; no grace for handlers at a kill (a crash has none).
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self.port = runner.addresses[0][1]
        self._runner = runner

    async def kill(self) -> None:
        """Like a crash: every connection reset at once, then the port refuses."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        assert runner.server is not None
        for connection in runner.server.connections:
            if connection.transport is not None:
                connection.transport.abort()
        await runner.cleanup()

    async def stop(self) -> None:
        self.release.set()
        await self.kill()

    async def wait_scrapes(self, count: int) -> None:
        async with self._scraped:
            await self._scraped.wait_for(lambda: self.scrapes >= count)

    @web.middleware
    async def _tag(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path != "/metrics" and request.headers.get("user-agent") != USER_AGENT:
            body = await request.read()
            headers = {k.lower(): v for k, v in request.headers.items()}
            self.requests.append(RecordedRequest(request.method, request.path, headers, body))
        response: web.StreamResponse = await handler(request)
        return response

    async def _name_replica(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["x-sim-replica"] = self.name

    async def _metrics(self, request: web.Request) -> web.Response:
        self.scrapes += 1
        if request.transport is not None:
            self.scrape_connections.add(request.transport)
        async with self._scraped:
            self._scraped.notify_all()
        if self.metrics_fault == "hang":
            await self.release.wait()
        page = self.metrics_page or self.metrics.render(self.model).encode()
        if self.metrics_status != 200:
            page = b"engine dead"
        elif self.metrics_fault == "garbage":
            page = b"<html><body>Welcome to nginx!</body></html>"
        elif self.metrics_fault == "huge":
            page += b"# padding\n" * 10_000
        return web.Response(status=self.metrics_status, body=page, content_type="text/plain")

    async def _models(self, request: web.Request) -> web.Response:
        self.model_fetches += 1
        if request.transport is not None:
            self.scrape_connections.add(request.transport)
        if not self.lists_models:
            return web.Response(status=404, text="Not Found")
        models = {"object": "list", "data": [{"id": self.model, "object": "model"}]}
        page = self.models_page or orjson.dumps(models)
        return web.Response(body=page, content_type="application/json")

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        if self.completion is not None:
            return await self.completion(request)
        try:
            body = orjson.loads(await request.read())
            tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 0)
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            return web.Response(
                status=400,
                body=error_body(400, "request body is not a JSON object"),
                content_type="application/json",
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
            return web.Response(body=orjson.dumps(answer), content_type="application/json")
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
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
async def fake_vllm() -> AsyncIterator[Callable[..., Awaitable[list[FakeVLLM]]]]:
    """Factory: `await fake_vllm(n, chunk_delay=..., ...)` -> n running replicas named 0, 1, ...
    (options are FakeVLLM fields); all stopped at teardown."""
    names = itertools.count()
    started: list[FakeVLLM] = []

    async def start(n: int = 1, **options: Any) -> list[FakeVLLM]:
        replicas = [FakeVLLM(str(next(names)), **options) for _ in range(n)]
        for replica in replicas:
            await replica.start()
        started.extend(replicas)
        return replicas

    yield start
    for replica in started:
        await replica.stop()
