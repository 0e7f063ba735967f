"""A simulated vLLM replica over HTTP: the OpenAI API, `/tokenize` and `/detokenize`, `/metrics`,
`/health` and `/v1/models`; and `POST /sim/cache_probe` (not vLLM's: a /tokenize body in, the
prefix-cache hit and load a request would meet now out), for a load harness's oracle router.

Streams behave like vLLM's: one SSE event per token while the client keeps up, several tokens
merged into one event when it lags, and a client that disconnects aborts its request (its KV
blocks are freed at once), so load and cache state respond to routing as a real server's would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import orjson
from aiohttp import web

from vllm_sim.engine import Engine, SimRequest, Status
from vllm_sim.kv_events import KVEventPublisher
from vllm_sim.metrics import ReplicaMetrics
from vllm_sim.openai_api import (
    BadRequest,
    GenerationParams,
    ResponseWriter,
    error_body,
    parse_detokenize,
    parse_generation,
    parse_tokenize,
    usage,
)
from vllm_sim.profiles import PROFILES, Profile, get_profile
from vllm_sim.tokenizer import DEFAULT_CHAT_TEMPLATE, DEFAULT_TOKENIZER, SimTokenizer, load

REPLICA_HEADER = "x-sim-replica"  # names the replica that answered (for tests and demos)
_MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class KVEventsConfig:
    """Where a replica publishes its KV-cache events (port 0: a free port; replay None: none)."""

    port: int = 0
    replay_port: int | None = None
    encoding: str = "array"  # or "map" (kv_events.ENCODINGS)
    topic: str = ""

    def offset(self, index: int) -> KVEventsConfig:
        """Replica `index`'s ports: fixed ports count up from the first replica's."""
        replay = self.replay_port + index if self.replay_port else self.replay_port
        return dataclasses.replace(self, port=self.port + index if self.port else 0, replay_port=replay)


@dataclass(frozen=True, slots=True)
class SimConfig:
    profile: Profile = PROFILES["h100-8b"]
    model: str | None = None  # served model name; the profile's model when None
    # Simulated seconds per real second: 10 makes every step 10x shorter. Latencies (histograms,
    # client timings) are wall-clock, so multiply them by `speed` for hardware-equivalent values.
    speed: float = 1.0
    lora_adapters: tuple[str, ...] = ()  # extra model names served as LoRA adapters
    max_loras: int = 1  # adapters that may share one batch
    prefix_caching: bool = True
    default_max_tokens: int = 256  # chat requests without max_tokens stop ("EOS") after this
    tokenizer: Path = DEFAULT_TOKENIZER  # a Hugging Face tokenizer.json
    chat_template: Path = DEFAULT_CHAT_TEMPLATE  # jinja2, as in a model's tokenizer_config.json
    kv_events: KVEventsConfig | None = None  # None: no KV-event publisher

    @property
    def model_name(self) -> str:
        return self.model or self.profile.model


class Replica:
    """One simulated vLLM server; many can run in one event loop, each on its own port."""

    def __init__(self, config: SimConfig | None = None, name: str | None = None) -> None:
        self.config = config or SimConfig()
        self.tokenizer: SimTokenizer = load(self.config.tokenizer, self.config.chat_template)
        self.engine = Engine(
            self.config.profile,
            speed=self.config.speed,
            prefix_caching=self.config.prefix_caching,
            max_loras=self.config.max_loras,
            lora_ids={name: i for i, name in enumerate(self.config.lora_adapters, 1)},
        )
        self.metrics = ReplicaMetrics(
            self.engine, self.config.model_name, lora_enabled=bool(self.config.lora_adapters)
        )
        self.engine.observer = self.metrics
        self.name = name
        self.address = ""
        self._runner: web.AppRunner | None = None
        self._engine_task: asyncio.Task[None] | None = None
        self.kv_events: KVEventPublisher | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (0 picks a free port) and return the bound `ip:port`."""
        app = web.Application(client_max_size=_MAX_BODY_BYTES, middlewares=[self.metrics.http.middleware])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/detokenize", self._detokenize)
        app.router.add_post("/reset_prefix_cache", self._reset_prefix_cache)
        app.router.add_post("/sim/cache_probe", self._cache_probe)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.on_response_prepare.append(self._tag_response)
        # handler_cancellation: a client disconnect cancels its handler, which aborts the request.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        self.address = f"{bound_host}:{bound_port}"
        self.name = self.name or self.address
        if (events := self.config.kv_events) is not None:
            self.kv_events = KVEventPublisher(events.encoding, events.topic)
            self.kv_events.start(host, events.port, events.replay_port)
            self.engine.publish_kv_events(self.kv_events)
        self._engine_task = asyncio.create_task(self.engine.run(), name=f"engine {self.name}")
        return self.address

    async def stop(self) -> None:
        """Close the listener and every open connection, then stop the engine."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._engine_task is not None:
            self._engine_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._engine_task
            self._engine_task = None
        if self.kv_events is not None:
            await self.kv_events.close()
            self.kv_events = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _tag_response(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers[REPLICA_HEADER] = self.name or ""

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def _reset_prefix_cache(self, request: web.Request) -> web.Response:
        """vLLM's POST /reset_prefix_cache: drops every cached block (AllBlocksCleared)."""
        if not self.engine.reset_prefix_cache():
            return _error(409, "the prefix cache cannot be reset while requests hold KV blocks")
        return web.Response()

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain")

    async def _models(self, request: web.Request) -> web.Response:
        base = self.config.model_name
        cards = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "vllm",
                "root": name,
                "parent": None if name == base else base,
                "max_model_len": self.config.profile.max_model_len,
            }
            for name in (base, *self.config.lora_adapters)
        ]
        return _json({"object": "list", "data": cards})

    async def _tokenize(self, request: web.Request) -> web.Response:
        """vLLM's /tokenize: `{count, max_model_len, tokens, token_strs}`."""
        try:
            params = parse_tokenize(await request.read())
            self._resolve_model(params.model)
            ids = self.tokenizer.prompt_ids(**dataclasses.asdict(params.prompt))
        except BadRequest as exc:
            return _error(exc.status, str(exc))
        except ValueError as exc:
            return _error(400, str(exc))
        strs = [self.tokenizer.id_to_token(i) for i in ids] if params.return_token_strs else None
        doc = {"count": len(ids), "max_model_len": self.config.profile.max_model_len, "tokens": ids}
        return _json(doc | {"token_strs": strs})

    async def _cache_probe(self, request: web.Request) -> web.Response:
        """`{prompt_tokens, cached_tokens, running, waiting, estimated_ttft_ms}` for a request with
        this prompt (a /tokenize body: `prompt` text or token ids, or `messages`)."""
        try:
            params = parse_tokenize(await request.read())
            _, lora = self._resolve_model(params.model)
            ids = self.tokenizer.prompt_ids(**dataclasses.asdict(params.prompt))
        except BadRequest as exc:
            return _error(exc.status, str(exc))
        except ValueError as exc:
            return _error(400, str(exc))
        probe = self.engine.probe(ids, lora)
        doc = dataclasses.asdict(probe)
        doc["estimated_ttft_ms"] = doc.pop("estimated_ttft") * 1000
        return _json(doc)

    async def _detokenize(self, request: web.Request) -> web.Response:
        """vLLM's /detokenize: `{prompt}`."""
        try:
            model, ids = parse_detokenize(await request.read())
            self._resolve_model(model)
            if ids and max(ids) >= self.tokenizer.vocab_size:
                raise BadRequest(f"token id {max(ids)} is out of vocabulary")
        except BadRequest as exc:
            return _error(exc.status, str(exc))
        return _json({"prompt": self.tokenizer.decode(ids)})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            params = parse_generation(await request.read(), chat)
            model, lora = self._resolve_model(params.model)
            prompt = self.tokenizer.prompt_ids(**dataclasses.asdict(params.prompt))
            max_tokens, stop_at_max = self._output_length(params, len(prompt))
        except BadRequest as exc:
            return _error(exc.status, str(exc))
        except ValueError as exc:  # the tokenizer's or the chat template's
            return _error(400, str(exc))
        loop = asyncio.get_running_loop()
        writer = ResponseWriter(model, chat)
        sim = self.engine.submit(
            request.headers.get("x-request-id", writer.id),
            prompt,
            max_tokens,
            loop.time(),
            output=self.tokenizer.sampler(params.seed),
            lora=lora,
            stop_at_max=stop_at_max,
            max_tokens_param=params.max_tokens,
        )
        try:
            if params.stream:
                return await self._stream(request, sim, writer, params.include_usage)
            await sim.ended.wait()
            assert sim.finish_reason is not None
            body = writer.body("".join(sim.generated), sim.finish_reason, _usage(sim))
            return web.Response(body=body, content_type="application/json")
        finally:
            # Reached without an end only when the client left (or the server is stopping).
            self.engine.abort(sim, loop.time())

    async def _stream(
        self, request: web.Request, sim: SimRequest, writer: ResponseWriter, include_usage: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        try:
            await response.prepare(request)
            sent = 0
            while not sim.done:
                await sim.progress.wait()
                sim.progress.clear()
                text = "".join(sim.generated[sent:])
                finish = sim.finish_reason if sim.status is Status.FINISHED else None
                events = writer.role_chunk() if sent == 0 and writer.chat else b""
                sent = len(sim.generated)
                await response.write(events + writer.chunk(text, finish))
            if include_usage:
                await response.write(writer.usage_chunk(_usage(sim)))
            await response.write(ResponseWriter.DONE)
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client left between two writes; the caller aborts the request
        return response

    def _resolve_model(self, requested: str) -> tuple[str, str | None]:
        """The model name to answer with, and the LoRA adapter it selects (None: base model)."""
        if requested in ("", self.config.model_name):
            return self.config.model_name, None
        if requested in self.config.lora_adapters:
            return requested, requested
        raise BadRequest(f"The model `{requested}` does not exist.", status=404)

    def _output_length(self, params: GenerationParams, prompt_tokens: int) -> tuple[int, bool]:
        """Tokens to generate, and whether the end counts as EOS ("stop") rather than "length".

        The model "emits EOS" only when the client leaves it room to: no max_tokens (then after
        `default_max_tokens`), or min_tokens below max_tokens (then at a seeded length in between);
        `ignore_eos` runs every request to its limit, as benchmarks do."""
        max_model_len = self.config.profile.max_model_len
        room = max_model_len - prompt_tokens
        if params.max_tokens is None:
            if room < 1:
                raise BadRequest(_too_long(max_model_len, prompt_tokens, 1))
            limit, eos = min(self.config.default_max_tokens, room), not params.ignore_eos
        elif params.max_tokens > room:
            raise BadRequest(_too_long(max_model_len, prompt_tokens, params.max_tokens))
        else:
            limit, eos = params.max_tokens, False
        if params.min_tokens is not None and params.min_tokens < limit and not params.ignore_eos:
            length = random.Random(params.seed).randint(max(1, params.min_tokens), limit)
            return length, eos or length < limit
        return limit, eos


def _too_long(max_model_len: int, prompt_tokens: int, max_tokens: int) -> str:
    return (
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in "
        "the completion). Please reduce the length of the messages or completion."
    )


def _usage(sim: SimRequest) -> dict[str, Any]:
    return usage(sim.num_prompt_tokens, len(sim.generated), sim.cached_tokens or 0)


def _json(doc: object) -> web.Response:
    return web.Response(body=orjson.dumps(doc), content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return web.Response(
        status=status, body=error_body(status, message), content_type="application/json"
    )


@contextlib.asynccontextmanager
async def run_replicas(
    n: int = 1,
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    profiles: str | Profile | Sequence[str | Profile] = "h100-8b",
    speed: float = 1.0,
    model: str | None = None,
    config: SimConfig | None = None,
) -> AsyncIterator[list[Replica]]:
    """Start `n` replicas named "0".."n-1" on ports port..port+n-1 (port 0: free ports each).

    `profiles` is one profile for all, or one per replica; `config` supplies the other settings
    (LoRA adapters, prefix caching, ...), with `profiles`, `speed` and `model` taking precedence.
    """
    chosen = [profiles] * n if isinstance(profiles, str | Profile) else list(profiles)
    if len(chosen) != n:
        raise ValueError(f"{len(chosen)} profiles given for {n} replicas")
    base = config or SimConfig()
    replicas = [
        Replica(
            dataclasses.replace(
                base,
                profile=get_profile(p) if isinstance(p, str) else p,
                speed=speed,
                model=model or base.model,
                kv_events=base.kv_events.offset(i) if base.kv_events else None,
            ),
            name=str(i),
        )
        for i, p in enumerate(chosen)
    ]
    try:
        for i, replica in enumerate(replicas):
            await replica.start(host, port + i if port else 0)
        yield replicas
    finally:
        await asyncio.gather(*(replica.stop() for replica in replicas))
