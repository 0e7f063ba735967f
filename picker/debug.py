"""The metrics port: Prometheus `/metrics`, plus `/debug/endpoints` and `/debug/decisions` (JSON).

`/debug/endpoints`: what the picker knows of each replica (freshness, scraped load, KV and LoRA
state, models served, its own in-flight counts, prefix blocks per prefix-scorer instance).
`/debug/decisions`: the last decisions, newest first: model, how many endpoints passed the
filters, the reason, and for the pick, its fallbacks and the runner-up every scorer instance's
score with the weighted total. Answers the operator's "why did this request go there?".

Nothing here carries prompt text: a decision keeps the model name, addresses and numbers only
(see `scheduler.Decision`). The server runs in its own thread, like prometheus_client's; it reads
state the event loop writes, through copies made in single C calls (a deque or dict copy), and
renders only when asked, so serving it costs the hot path nothing.
"""

from __future__ import annotations

import datetime
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import orjson
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

    from picker.datalayer.pool import EndpointPool
    from picker.scheduling.scheduler import Scheduler


def endpoints_view(
    pool: EndpointPool, scheduler: Scheduler, stale_after: float, now: float
) -> dict[str, Any]:
    indexes = scheduler.prefix_indexes()
    rows = []
    for ep in pool.endpoints:
        m = ep.metrics
        rows.append(
            {
                "address": ep.address,
                "freshness": ep.freshness(now, stale_after).value,
                "metrics_age_seconds": None if m is None else round(now - ep.scraped_at, 3),
                "consecutive_failures": ep.consecutive_failures,
                "last_failure": ep.last_failure or None,
                "metrics": None
                if m is None
                else {
                    "waiting": m.waiting,
                    "running": m.running,
                    "kv_usage": m.kv_usage,
                    "block_size": m.block_size,
                    "num_gpu_blocks": m.num_gpu_blocks,
                    "max_lora": m.max_lora,
                    "running_loras": sorted(m.running_loras),
                    "waiting_loras": sorted(m.waiting_loras),
                },
                "token_seconds": ep.token_seconds or None,
                # measured characters per prompt token; None while the prior stands in
                "chars_per_token": ep.chars_per_token.value if ep.chars_per_token.calibrated else None,
                "models": None if ep.models is None else dict(ep.models),
                "inflight_requests": ep.inflight_requests,
                "inflight_prompt_tokens": ep.inflight_tokens,
                "pending_requests": ep.pending_requests,  # routed since its last scrape began
                "prefill_tokens": ep.prefill_tokens,  # routed, uncached, awaiting the first token
                "load": ep.load,
                "prefix_blocks": {name: index.held(ep) for name, index in indexes.items()},
            }
        )
    return {"endpoints": rows}


def decisions_view(scheduler: Scheduler) -> dict[str, Any]:
    names = scheduler.names
    decisions = []
    for decision in reversed(list(scheduler.recent)):
        decisions.append(
            {
                "time": datetime.datetime.fromtimestamp(decision.at, datetime.UTC).isoformat(),
                "model": decision.model,
                "candidates": decision.candidates,
                "reason": decision.reason,
                "considered": [  # the pick, its fallbacks, then the runner-up
                    {
                        "endpoint": endpoint.address,
                        "total": total,
                        "scores": dict(zip(names, scores, strict=True)),
                    }
                    for endpoint, total, scores in decision.rows()
                ],
            }
        )
    scorers = [
        {"name": instance.name, "type": instance.type, "weight": instance.weight}
        for instance in scheduler.instances
    ]
    return {"scorers": scorers, "decisions": decisions}


def app(
    registry: CollectorRegistry, pool: EndpointPool, scheduler: Scheduler, stale_after: float
) -> Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]:
    """A WSGI app: the two debug views, and Prometheus for every other path."""
    metrics = make_wsgi_app(registry)
    views: dict[str, Callable[[], dict[str, Any]]] = {
        "/debug/endpoints": lambda: endpoints_view(pool, scheduler, stale_after, time.monotonic()),
        "/debug/decisions": lambda: decisions_view(scheduler),
    }

    def serve(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        view = views.get(environ.get("PATH_INFO", ""))
        if view is None:
            return metrics(environ, start_response)
        body = orjson.dumps(view(), option=orjson.OPT_INDENT_2)
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return serve


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the log."""


def serve(
    address: str, port: int, wsgi: Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]
) -> ThreadingWSGIServer:
    """Serve `wsgi` on address:port from a daemon thread; `shutdown()` the result to stop."""

    class Server(ThreadingWSGIServer):
        address_family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]

    server = make_server(address, port, wsgi, Server, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
