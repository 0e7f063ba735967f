"""Prometheus metrics of the picker, served on `--metrics-port`.

Labels carry endpoint addresses, reasons and status codes only: never prompt text or client data.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

DECISIONS = Counter(
    "picker_decisions_total",
    "Routing decisions by chosen endpoint and by the scorer that weighed most in the choice.",
    ["endpoint", "reason"],
    registry=REGISTRY,
)
PICK_LATENCY = Histogram(
    "picker_pick_duration_seconds",
    "Time from a complete request (headers + body) to the routing answer, in the picker.",
    buckets=(5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1),
    registry=REGISTRY,
)
INFLIGHT_REQUESTS = Gauge(
    "picker_inflight_requests",
    "Requests routed to an endpoint whose HTTP exchange has not ended.",
    ["endpoint"],
    registry=REGISTRY,
)
INFLIGHT_TOKENS = Gauge(
    "picker_inflight_prompt_tokens",
    "Estimated prompt tokens of the requests in flight per endpoint.",
    ["endpoint"],
    registry=REGISTRY,
)
PREFILL_TOKENS = Gauge(
    "picker_prefill_queue_tokens",
    "Estimated uncached prompt tokens routed to the endpoint that await their first token.",
    ["endpoint"],
    registry=REGISTRY,
)
PREFIX_MATCH_RATIO = Histogram(
    "picker_prefix_match_ratio",
    "Share of a request's prompt blocks the prefix index expected the chosen endpoint to hold.",
    buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
    registry=REGISTRY,
)
SCRAPE_ERRORS = Counter(
    "picker_scrape_errors_total",
    "Failed metrics scrapes by endpoint and kind (connect, timeout, status, parse).",
    ["endpoint", "kind"],
    registry=REGISTRY,
)
SCRAPE_AGE = Gauge(
    "picker_endpoint_metrics_age_seconds",
    "Seconds since the endpoint's metrics were last scraped successfully.",
    ["endpoint"],
    registry=REGISTRY,
)
ENDPOINT_ROUTABLE = Gauge(
    "picker_endpoint_routable",
    "1 when the endpoint is fresh and healthy enough to receive requests.",
    ["endpoint"],
    registry=REGISTRY,
)
IMMEDIATE_RESPONSES = Counter(
    "picker_immediate_responses_total",
    "Requests answered by the picker itself instead of being routed, by HTTP status.",
    ["status"],
    registry=REGISTRY,
)
LEAN_CLOSES = Counter(
    "picker_extproc_lean_closes_total",
    "ext_proc streams the picker ended with the request phase, so the response skipped it.",
    registry=REGISTRY,
)
STREAMS_OPEN = Gauge(
    "picker_extproc_streams_open",
    "ext_proc streams currently open (one per HTTP exchange passing the gateway).",
    registry=REGISTRY,
)


KV_EVENT_TYPES = ("BlockStored", "BlockRemoved", "AllBlocksCleared")
KV_EVENTS = Counter(
    "picker_kv_events_total",
    "KV-cache events applied to the precise prefix index, by endpoint and type.",
    ["endpoint", "type"],
    registry=REGISTRY,
)
KV_EVENT_GAPS = Counter(
    "picker_kv_event_gaps_total",
    "Breaks in an endpoint's KV-event sequence (batches lost): its index entries were dropped.",
    ["endpoint"],
    registry=REGISTRY,
)


def forget_endpoint(address: str) -> None:
    """Drop an endpoint's series when it leaves the pool, so label sets stay bounded."""
    for family in (
        INFLIGHT_REQUESTS,
        INFLIGHT_TOKENS,
        PREFILL_TOKENS,
        SCRAPE_AGE,
        ENDPOINT_ROUTABLE,
        KV_EVENT_GAPS,
    ):
        with contextlib.suppress(KeyError):
            family.remove(address)
    for kind in KV_EVENT_TYPES:
        with contextlib.suppress(KeyError):
            KV_EVENTS.remove(address, kind)
