"""The `/metrics` page of a simulated replica, with vLLM's metric names, labels and buckets.

Gauges and counters are read from the engine at scrape time, so a scrape always sees the current
queue and KV state; latencies go into histograms as the engine reports them. Each replica has its
own registry, so many replicas can share one process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from vllm_sim.engine import Engine, SimRequest, Status

_LABELS = ("model_name", "engine")
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)  # fmt: skip
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
_FINISH_REASONS = ("stop", "length", "abort")


class ReplicaMetrics:
    """Renders one replica's metrics; also the engine's observer for latency histograms."""

    def __init__(self, engine: Engine, model_name: str, lora_enabled: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        labels = (model_name, "0")
        self._ttft = self._histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
            _TTFT_BUCKETS, labels,
        )  # fmt: skip
        self._itl = self._histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
            _ITL_BUCKETS, labels,
        )  # fmt: skip
        self._e2e = self._histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
            _REQUEST_BUCKETS, labels,
        )  # fmt: skip
        self._queue = self._histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.", _REQUEST_BUCKETS, labels,
        )  # fmt: skip
        self.registry.register(_EngineCollector(engine, labels, lora_enabled))

    def _histogram(
        self, name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, str]
    ) -> Histogram:
        family = Histogram(name, doc, _LABELS, buckets=buckets, registry=self.registry)
        return family.labels(*labels)

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
        self._e2e.observe(request.finished_at - request.arrival)
        self._queue.observe(request.scheduled_at - request.arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Current queue / KV gauges, cache configuration and counters, read at scrape time."""

    def __init__(self, engine: Engine, labels: tuple[str, str], lora_enabled: bool) -> None:
        self._engine = engine
        self._labels = list(labels)
        self._lora_enabled = lora_enabled

    def collect(self) -> Iterator[Metric]:
        engine, labels = self._engine, self._labels
        counters = engine.counters
        yield self._gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.",
            len(engine.running),
        )  # fmt: skip
        yield self._gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.",
            len(engine.waiting),
        )  # fmt: skip
        yield self._gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
            engine.kv.usage,
        )  # fmt: skip
        profile = engine.profile
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=[*_LABELS, "block_size", "cache_dtype", "enable_prefix_caching",
                    "gpu_memory_utilization", "num_cpu_blocks", "num_gpu_blocks"],
        )  # fmt: skip
        info.add_metric(
            [*labels, str(profile.block_size), "auto", str(engine.kv.prefix_caching), "0.9", "0",
             str(profile.num_gpu_blocks)],
            1.0,
        )  # fmt: skip
        yield info
        if self._lora_enabled:
            lora = GaugeMetricFamily(
                "vllm:lora_requests_info",
                "Running stats on lora requests.",
                labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            )
            lora.add_metric(
                [str(engine.max_loras), ",".join(sorted(engine.running_loras)),
                 ",".join(sorted(engine.waiting_loras))],
                time.time(),
            )  # fmt: skip
            yield lora
        for name, doc, value in (
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", counters.prompt_tokens),
            ("vllm:generation_tokens", "Number of generation tokens processed.",
             counters.generation_tokens),
            ("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
             counters.preemptions),
            ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried "
             "tokens.", counters.prefix_queries),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
             counters.prefix_hits),
        ):  # fmt: skip
            counter = CounterMetricFamily(name, doc, labels=_LABELS)
            counter.add_metric(labels, value)
            yield counter
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=[*_LABELS, "finished_reason"],
        )
        for reason in _FINISH_REASONS:
            success.add_metric([*labels, reason], counters.finished[reason])
        yield success

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        gauge = GaugeMetricFamily(name, doc, labels=_LABELS)
        gauge.add_metric(self._labels, value)
        return gauge
