"""The `/metrics` page of a simulated replica: every metric family a vLLM V1 server exports, with
vLLM's names, help texts, labels and buckets (`vllm/v1/metrics/loggers.py`), plus the Python
process and HTTP families its API server adds, so a scrape reads what it reads from vLLM: a page
of ~50 KB, mostly histogram buckets.

Gauges and counters are read from the engine at scrape time, so a scrape always sees the current
queue and KV state; per-step, per-token and per-request numbers go into histograms as the engine
reports them. Each replica has its own families, so many replicas can share one process; they
are rendered by `exposition.py` (prometheus_client's format, without its cost) and the process
metrics by prometheus_client itself.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)

from vllm_sim.engine import Engine, SimRequest, Status
from vllm_sim.exposition import Counter, Family, Gauge, Histogram, Summary

_LABELS = ("model_name", "engine")
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                          5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_PREFILL_TOKEN_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
_ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_N_BUCKETS = (1, 2, 5, 10, 20)
_FINISH_REASONS = ("stop", "length", "abort")
_PROMPT_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
# prometheus-fastapi-instrumentator, which vLLM's API server uses (its /metrics and /health are
# not instrumented).
_HTTP_HIGHR_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0,
                       3.5, 4.0, 4.5, 5.0, 7.5, 10.0, 30.0, 60.0)  # fmt: skip
_HTTP_UNINSTRUMENTED = frozenset({"/metrics", "/health"})
_PROCESS = CollectorRegistry(auto_describe=False)  # python_* and process_*: one per process
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    _PROCESS.register(_collector)


def one_two_five_buckets(max_value: int) -> tuple[int, ...]:
    """vLLM's `build_1_2_5_buckets`: 1, 2, 5, 10, 20, 50, ... up to `max_value`."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return tuple(buckets)
            buckets.append(value)
        exponent += 1


class ReplicaMetrics:
    """Renders one replica's metrics; also the engine's observer for the histograms."""

    def __init__(self, engine: Engine, model_name: str, lora_enabled: bool = False) -> None:
        self._engine = engine
        self._lora_enabled = lora_enabled
        self._labels = labels = (model_name, "0")
        self._families: list[Family] = []
        lengths = one_two_five_buckets(engine.profile.max_model_len)
        counters = engine.counters

        def gauge(name: str, doc: str, source: Callable[[], float]) -> None:
            self._add(Gauge(name, doc, _LABELS)).bind(labels, source)

        def counter(name: str, doc: str, source: Callable[[], float]) -> None:
            self._add(Counter(name, doc, _LABELS)).bind(labels, source)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return self._add(Histogram(name, doc, _LABELS, buckets)).labels(*labels)

        gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
              lambda: len(engine.running))  # fmt: skip
        gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
              lambda: len(engine.waiting))  # fmt: skip
        sleep = self._add(Gauge(
            "vllm:engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; "
            "weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
            (*_LABELS, "sleep_state"),
        ))  # fmt: skip
        for state, value in (("awake", 1.0), ("weights_offloaded", 0.0), ("discard_all", 0.0)):
            sleep.labels(*labels, state).inc(value)
        gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", lambda: engine.kv.usage
        )
        counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                lambda: counters.prefix_queries)  # fmt: skip
        counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                lambda: counters.prefix_hits)  # fmt: skip
        counter("vllm:external_prefix_cache_queries", "External prefix cache queries from KV connector "
                "cross-instance cache sharing, in terms of number of queried tokens.", lambda: 0)  # fmt: skip
        counter("vllm:external_prefix_cache_hits", "External prefix cache hits from KV connector "
                "cross-instance cache sharing, in terms of number of cached tokens.", lambda: 0)  # fmt: skip
        counter("vllm:mm_cache_queries", "Multi-modal cache queries, in terms of number of queried items.",
                lambda: 0)  # fmt: skip
        counter(
            "vllm:mm_cache_hits", "Multi-modal cache hits, in terms of number of cached items.", lambda: 0
        )
        counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                lambda: counters.preemptions)  # fmt: skip
        counter("vllm:prompt_tokens", "Number of prefill tokens processed.", lambda: counters.prompt_tokens)
        by_source = self._add(Counter(
            "vllm:prompt_tokens_by_source", "Number of prompt tokens by source.", (*_LABELS, "source")
        ))  # fmt: skip
        for source, read in zip(_PROMPT_SOURCES, (
            lambda: counters.prompt_tokens - counters.prompt_tokens_cached,
            lambda: counters.prompt_tokens_cached,
            lambda: 0,
        ), strict=True):  # fmt: skip
            by_source.bind((*labels, source), read)
        counter("vllm:prompt_tokens_cached", "Number of cached prompt tokens (local + external).",
                lambda: counters.prompt_tokens_cached)  # fmt: skip
        counter("vllm:prompt_tokens_recomputed", "Number of cached tokens recomputed for forward pass.",
                lambda: counters.prompt_tokens_recomputed)  # fmt: skip
        counter("vllm:generation_tokens", "Number of generation tokens processed.",
                lambda: counters.generation_tokens)  # fmt: skip
        success = self._add(Counter(
            "vllm:request_success", "Count of successfully processed requests.", (*_LABELS, "finished_reason")
        ))  # fmt: skip
        for reason in _FINISH_REASONS:
            success.bind((*labels, reason), lambda reason=reason: counters.finished[reason])
        self._prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", lengths
        )
        self._generation_tokens = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", lengths
        )
        self._iteration_tokens = histogram(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            _ITERATION_BUCKETS,
        )
        self._max_generation_tokens = histogram(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.", lengths,
        )  # fmt: skip
        self._params_n = histogram(
            "vllm:request_params_n", "Histogram of the n request parameter.", _N_BUCKETS
        )
        self._params_max_tokens = histogram(
            "vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", lengths
        )
        self._ttft = histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", _TTFT_BUCKETS
        )
        self._itl = histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
            _TOKEN_LATENCY_BUCKETS,
        )  # fmt: skip
        self._tpot = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.", _TOKEN_LATENCY_BUCKETS,
        )  # fmt: skip
        self._prefill_per_token = histogram(
            "vllm:time_per_prefill_token_request_seconds",
            "Time spent per token during prefill  phase in seconds", _PREFILL_TOKEN_BUCKETS,
        )  # fmt: skip
        self._e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            _REQUEST_BUCKETS,
        )
        self._queue = histogram(
            "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
            _REQUEST_BUCKETS,
        )  # fmt: skip
        self._inference = histogram(
            "vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.",
            _REQUEST_BUCKETS,
        )  # fmt: skip
        self._prefill = histogram(
            "vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.",
            _REQUEST_BUCKETS,
        )  # fmt: skip
        self._decode = histogram(
            "vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
            _REQUEST_BUCKETS,
        )  # fmt: skip
        self._prefill_computed = histogram(
            "vllm:request_prefill_kv_computed_tokens",
            "Histogram of new KV tokens computed during prefill (excluding cached tokens).", lengths,
        )  # fmt: skip
        self._cache_info = self._add(Gauge(
            "vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
            ("block_size", "cache_dtype", "calculate_kv_scales", "cpu_offload_gb", "enable_prefix_caching",
             "engine", "gpu_memory_utilization", "is_attention_free", "num_cpu_blocks", "num_gpu_blocks",
             "num_gpu_blocks_override", "prefix_caching_hash_algo", "sliding_window", "swap_space"),
        ))  # fmt: skip
        profile = engine.profile
        self._cache_info.labels(
            str(profile.block_size), "auto", "False", "0", str(engine.kv.prefix_caching), labels[1], "0.9",
            "False", "None", str(profile.num_gpu_blocks), "None", "xxh3_64", "None", "4",
        ).inc()  # fmt: skip
        self._lora = Gauge(
            "vllm:lora_requests_info", "Running stats on lora requests.",
            ("max_lora", "running_lora_adapters", "waiting_lora_adapters"),
        )  # fmt: skip
        if lora_enabled:
            self._add(self._lora)
        self.http = HttpMetrics(self._add)

    def _add(self, family: Any) -> Any:
        self._families.append(family)
        return family

    def on_step(self, tokens: int) -> None:
        if tokens:
            self._iteration_tokens.observe(tokens)

    def on_token(self, request: SimRequest, gap: float | None) -> None:
        if gap is None:
            assert request.first_token_at is not None
            self._ttft.observe(request.first_token_at - request.arrival)
        else:
            self._itl.observe(gap)

    def on_finished(self, request: SimRequest) -> None:
        if request.status is not Status.FINISHED:
            return
        assert request.finished_at is not None and request.scheduled_at is not None
        assert request.first_token_at is not None and request.last_token_at is not None
        generated = len(request.generated)
        prefill = request.first_token_at - request.scheduled_at
        decode = request.last_token_at - request.first_token_at
        self._e2e.observe(request.finished_at - request.arrival)
        self._queue.observe(request.scheduled_at - request.arrival)
        self._inference.observe(request.last_token_at - request.scheduled_at)
        self._prefill.observe(prefill)
        self._decode.observe(decode)
        self._tpot.observe(decode / (generated - 1) if generated > 1 else 0.0)
        self._prefill_per_token.observe(prefill / request.num_prompt_tokens)
        self._prefill_computed.observe(request.num_prompt_tokens - (request.cached_tokens or 0))
        self._prompt_tokens.observe(request.num_prompt_tokens)
        self._generation_tokens.observe(generated)
        self._max_generation_tokens.observe(request.max_tokens)
        self._params_n.observe(1)
        if request.max_tokens_param is not None:
            self._params_max_tokens.observe(request.max_tokens_param)

    def render(self) -> bytes:
        if self._lora_enabled:  # one series, labelled with the adapters now running and waiting
            engine = self._engine
            self._lora.clear()
            self._lora.labels(
                str(engine.max_loras),
                ",".join(sorted(engine.running_loras)),
                ",".join(sorted(engine.waiting_loras)),
            ).inc(time.time())
        out: list[str] = []
        for family in self._families:
            family.render(out)
        return generate_latest(_PROCESS) + "".join(out).encode()


class HttpMetrics:
    """What prometheus-fastapi-instrumentator records about each HTTP request vLLM serves."""

    def __init__(self, add: Callable[[Family], Any]) -> None:
        self._requests = add(Counter(
            "http_requests", "Total number of requests by method, status and handler.",
            ("method", "status", "handler"),
        ))  # fmt: skip
        self._request_size = add(Summary(
            "http_request_size_bytes",
            "Content length of incoming requests by handler. Only value of header is respected. "
            "Otherwise ignored. No percentile calculated. ", ("handler",),
        ))  # fmt: skip
        self._response_size = add(Summary(
            "http_response_size_bytes",
            "Content length of outgoing responses by handler. Only value of header is respected. "
            "Otherwise ignored. No percentile calculated. ", ("handler",),
        ))  # fmt: skip
        self._latency_highr = add(Histogram(
            "http_request_duration_highr_seconds",
            "Latency with many buckets but no API specific labels. Made for more accurate "
            "percentile calculations. ", (), _HTTP_HIGHR_BUCKETS,
        )).labels()  # fmt: skip
        self._latency = add(Histogram(
            "http_request_duration_seconds",
            "Latency with only few buckets by handler. Made to be only used if aggregation by "
            "handler is important. ", ("method", "handler"), (0.1, 0.5, 1.0),
        ))  # fmt: skip

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path in _HTTP_UNINSTRUMENTED:
            return await handler(request)
        started = time.perf_counter()
        status = 500
        response: web.StreamResponse | None = None
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            elapsed = time.perf_counter() - started
            resource = request.match_info.route.resource
            path = resource.canonical if resource is not None else "none"
            self._requests.labels(request.method, f"{status // 100}xx", path).inc()
            self._request_size.labels(path).observe(request.content_length or 0)
            size = response.content_length if response is not None else None
            self._response_size.labels(path).observe(size or 0)
            self._latency_highr.observe(elapsed)
            self._latency.labels(request.method, path).observe(elapsed)
