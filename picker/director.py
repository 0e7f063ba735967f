"""Request control: admission, scheduling and in-flight accounting around one decision.

The protocol layer turns ext_proc messages into an InferenceRequest and hands it here; it gets back
either where to send it or why not, and releases the endpoint when the HTTP exchange ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from picker import telemetry
from picker.admission import Admission
from picker.datalayer.endpoint import Endpoint
from picker.datalayer.pool import EndpointPool
from picker.request import InferenceRequest
from picker.scheduling.scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Routed:
    endpoint: Endpoint
    destinations: str  # the pick, then fallbacks: "ip:port[,ip:port...]"
    tokens: int  # prompt tokens held on the endpoint while the exchange lasts
    picked_at: float  # perf_counter() at the decision


@dataclass(slots=True)
class Refused:
    status: int
    message: str
    retry_after: int | None = None


class Director:
    def __init__(
        self,
        pool: EndpointPool,
        scheduler: Scheduler,
        admission: Admission,
        *,
        log_prompts: bool = False,
        probe: Callable[[Endpoint], object] | None = None,
        fast_end: float = 0.0,
    ) -> None:
        """`probe(endpoint)` is called when an exchange ends within `fast_end` seconds of its
        pick: with responses skipped that is the only sign of a refused connection (Envoy's
        local 503) the picker gets, long before the next scrape would tell."""
        self.pool = pool
        self.scheduler = scheduler
        self.admission = admission
        self.log_prompts = log_prompts
        self.probe = probe
        self.fast_end = fast_end

    def route(self, request: InferenceRequest) -> Routed | Refused:
        started = time.perf_counter()
        if request.sheddable:  # only sheddable requests can be refused for saturation
            candidates = self.pool.endpoints
            if request.subset is not None:
                candidates = tuple(e for e in candidates if e.address in request.subset)
            rejection = self.admission.check(request, candidates)
            if rejection is not None:
                return Refused(rejection.status, rejection.message, rejection.retry_after)
        result = self.scheduler.schedule(request)
        if result is None:
            if request.subset is not None:
                return Refused(503, "no ready endpoint in the gateway's subset hint")
            return Refused(503, "no ready inference endpoint")
        chosen = result.endpoints[0]
        tokens = request.prompt_tokens
        self._hold(chosen, 1, tokens)
        telemetry.PICK_LATENCY.observe(time.perf_counter() - started)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "routed %s %s model=%r to %s (%s)%s",
                request.method,
                request.path,
                request.model,
                chosen.address,
                result.reason,
                f" prompt={request.prompt[:200]!r}" if self.log_prompts else "",
            )
        return Routed(chosen, ",".join(e.address for e in result.endpoints), tokens, started)

    def release(self, routed: Routed) -> None:
        self._hold(routed.endpoint, -1, -routed.tokens)
        if self.probe is not None and time.perf_counter() - routed.picked_at < self.fast_end:
            self.probe(routed.endpoint)

    def moved(self, routed: Routed, served_address: str) -> Routed:
        """The gateway served the request elsewhere (a fallback): move what we hold there."""
        served = self.pool.get(served_address)
        if served is None or served is routed.endpoint:
            return routed
        self.release(routed)
        self._hold(served, 1, routed.tokens)
        return Routed(served, routed.destinations, routed.tokens, routed.picked_at)

    @staticmethod
    def _hold(endpoint: Endpoint, requests: int, tokens: int) -> None:
        # The in-flight gauges read these counters when collected (see Scraper._bind_gauges).
        endpoint.inflight_requests += requests
        endpoint.inflight_tokens += tokens
