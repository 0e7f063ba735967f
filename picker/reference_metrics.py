"""The reference EPP's metric names, for what picker measures the same way (so dashboards built on
them work): computed when Prometheus collects, from state the picker keeps anyway, at no cost per
request. Source of the names: kubernetes-sigs/gateway-api-inference-extension
`pkg/epp/metrics/metrics.go` and `site-src/guides/metrics-and-observability.md`.

| reference name | from |
| --- | --- |
| `inference_pool_average_kv_cache_utilization{name}` | mean KV use of the endpoints with metrics |
| `inference_pool_average_queue_size{name}` | mean waiting requests of the same |
| `inference_pool_per_pod_queue_size{name,model_server_pod}` | waiting requests per endpoint (address) |
| `inference_pool_ready_pods{name}` | endpoints with fresh metrics |
| `inference_objective_request_total{model_name,target_model_name}` | routed requests per model |
| `inference_objective_request_error_total{...,error_code}` | `picker_immediate_responses_total` |
| `inference_extension_scheduler_e2e_duration_seconds` | `picker_pick_duration_seconds` |
| `inference_extension_prefix_indexer_hit_ratio` | `picker_prefix_match_ratio` |
| `inference_extension_prefix_indexer_size` | blocks recorded per endpoint, summed |
| `inference_extension_info{commit,build_ref}` | picker's version |

`name` is the InferencePool (`--pool-name`; empty for a static or selector pool). Picker does not
rewrite models, so `target_model_name` is the model asked for; refusals carry no model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase

from picker.datalayer.endpoint import Freshness
from picker.telemetry import IMMEDIATE_RESPONSES, PICK_LATENCY, PREFIX_MATCH_RATIO

if TYPE_CHECKING:
    from picker.datalayer.pool import EndpointPool
    from picker.scheduling.scheduler import Scheduler

# Our statuses in the reference EPP's error codes (its pkg/epp/util/error).
ERROR_CODES = {400: "BadRequest", 404: "BadRequest", 413: "BadRequest", 429: "InferencePoolResourceExhausted"}


class ReferenceMetrics:
    """A Prometheus collector yielding the reference names over picker's pool and scheduler."""

    def __init__(self, pool: EndpointPool, scheduler: Scheduler, pool_name: str, stale_after: float) -> None:
        self.pool = pool
        self.scheduler = scheduler
        self.pool_name = pool_name
        self.stale_after = stale_after
        try:
            self.build = version("picker")
        except PackageNotFoundError:
            self.build = ""

    def collect(self) -> Iterator[Metric]:
        yield from self._pool()
        yield from self._requests()
        yield _histogram(
            "inference_extension_scheduler_e2e_duration_seconds",
            "End-to-end scheduling latency distribution in seconds.",
            PICK_LATENCY,
        )
        yield _histogram(
            "inference_extension_prefix_indexer_hit_ratio",
            "Ratio of prefix length matched to total prefix length in the cache lookup.",
            PREFIX_MATCH_RATIO,
        )
        size = GaugeMetricFamily("inference_extension_prefix_indexer_size", "Size of the prefix indexer.")
        size.add_metric([], float(sum(index.entries() for index in self.scheduler.prefix_indexes().values())))
        yield size
        info = GaugeMetricFamily(
            "inference_extension_info",
            "General information of the current build of Inference Extension.",
            labels=["commit", "build_ref"],
        )
        info.add_metric(["", self.build], 1.0)
        yield info

    def _pool(self) -> Iterator[Metric]:
        name = self.pool_name
        endpoints = self.pool.endpoints
        known = [(ep.address, m) for ep in endpoints if (m := ep.metrics) is not None]
        kv = GaugeMetricFamily(
            "inference_pool_average_kv_cache_utilization",
            "The average kv cache utilization for an inference server pool.",
            labels=["name"],
        )
        queue = GaugeMetricFamily(
            "inference_pool_average_queue_size",
            "The average number of requests pending in the model server queue.",
            labels=["name"],
        )
        per_pod = GaugeMetricFamily(
            "inference_pool_per_pod_queue_size",
            "The total number of queue for each model server pod under the inference pool.",
            labels=["name", "model_server_pod"],
        )
        if known:
            kv.add_metric([name], sum(m.kv_usage for _, m in known) / len(known))
            queue.add_metric([name], sum(m.waiting for _, m in known) / len(known))
        for address, m in known:
            per_pod.add_metric([name, address], m.waiting)
        ready = GaugeMetricFamily(
            "inference_pool_ready_pods",
            "The number of ready pods in the inference server pool.",
            labels=["name"],
        )
        now = time.monotonic()
        fresh = sum(ep.freshness(now, self.stale_after) is Freshness.FRESH for ep in endpoints)
        ready.add_metric([name], float(fresh))
        yield from (kv, queue, per_pod, ready)

    def _requests(self) -> Iterator[Metric]:
        total = CounterMetricFamily(
            "inference_objective_request_total",
            "Counter of inference objective requests broken out for each model and target model.",
            labels=["model_name", "target_model_name"],
        )
        for model, count in self.scheduler.requests_by_model.copy().items():
            total.add_metric([model, model], count)
        errors = CounterMetricFamily(
            "inference_objective_request_error_total",
            "Counter of inference objective requests errors broken out for each model and target model.",
            labels=["model_name", "target_model_name", "error_code"],
        )
        by_code: dict[str, float] = {}
        for sample in _samples(IMMEDIATE_RESPONSES, "_total"):
            code = ERROR_CODES.get(int(sample.labels["status"]), "ServiceUnavailable")
            by_code[code] = by_code.get(code, 0.0) + sample.value
        for code, count in by_code.items():
            errors.add_metric(["", "", code], count)
        yield from (total, errors)


def _samples(metric: MetricWrapperBase, suffix: str) -> list:
    return [s for family in metric.collect() for s in family.samples if s.name.endswith(suffix)]


def _histogram(name: str, documentation: str, source: MetricWrapperBase) -> HistogramMetricFamily:
    """`source` (an unlabelled histogram) under another name, buckets and all."""
    family = HistogramMetricFamily(name, documentation)
    buckets = [(s.labels["le"], s.value) for s in _samples(source, "_bucket")]
    total = next((s.value for s in _samples(source, "_sum")), 0.0)
    family.add_metric([], buckets, total)
    return family
