"""Request control: everything around one routing decision, in the order it happens.

The protocol layer hands over an `InferenceRequest` read from the gateway's messages and gets
back a `Decision` (where to send it) or a `Refusal` (what to answer instead). In between, here:
the objective's priority, the candidates (the gateway's subset hint, applied once), admission
(shedding), the scheduling cycle, and only once the decision stands, teaching the affinity
plugins (prefix index, sessions) where it went, then holding the load on the chosen endpoint
(less the prompt tokens they expect it to hold, for its prefill queue). When the gateway reports
that a fallback served the request, load and lessons move there too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from picker import telemetry
from picker.admission import Admission
from picker.config import Config
from picker.datalayer.endpoint import Endpoint, Pending
from picker.datalayer.models import no_endpoint_serves
from picker.datalayer.pool import EndpointPool
from picker.errors import Refusal
from picker.request import InferenceRequest
from picker.scheduling.scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Decision:
    request: InferenceRequest
    endpoint: Endpoint  # where the load is held: the pick, or the fallback that served it
    destinations: str  # the pick, then fallbacks: "ip:port[,ip:port...]"
    held: Pending  # the load held on `endpoint`
    decided_at: float  # time.monotonic() at the decision


class RequestControl:
    def __init__(
        self,
        pool: EndpointPool,
        scheduler: Scheduler,
        admission: Admission,
        config: Config,
        *,
        log_prompts: bool = False,
        probe: Callable[[Endpoint], object] | None = None,
    ) -> None:
        """`probe(endpoint)` is called when an exchange whose stream lives as long as it ends
        within `metrics.fast_end_probe` seconds of its decision: with responses skipped, that is
        the only sign of a refused connection (Envoy's local 503) the picker gets, long before the
        next scrape would tell."""
        self.pool = pool
        self.scheduler = scheduler
        self.admission = admission
        self.objectives = config.objectives
        self.fast_end = config.metrics.fast_end_probe
        self.log_prompts = log_prompts
        self.probe = probe

    def decide(self, request: InferenceRequest) -> Decision | Refusal:
        started = time.perf_counter()
        if request.objective is not None:
            request.priority = self.objectives.get(request.objective, 0)
        candidates = self._candidates(request.subset)
        if not candidates:
            if request.subset is not None:
                return Refusal(503, "no endpoint of the gateway's subset hint is in the pool")
            return Refusal(503, "no inference endpoint is known")
        if no_endpoint_serves(request.model, candidates):
            return Refusal(404, f"The model `{request.model}` does not exist.")
        if request.sheddable and (refusal := self.admission.check(candidates)) is not None:
            return refusal
        result = self.scheduler.schedule(request, candidates)
        if result is None:
            return Refusal(503, "no ready inference endpoint")
        chosen = result.endpoints[0]
        now = time.monotonic()
        self._learn(request, chosen)
        held = chosen.hold(request.prompt_chars, now, request.cached_tokens)
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
        return Decision(request, chosen, ",".join(e.address for e in result.endpoints), held, now)

    def served_elsewhere(self, decision: Decision, served_address: str) -> None:
        """The gateway served the request on `served_address` (a fallback): move load and lessons."""
        served = self.pool.get(served_address)
        if served is None or served is decision.endpoint:
            return
        decision.endpoint.reroute(decision.held)
        decision.endpoint = served
        self._learn(decision.request, served)
        decision.held = served.hold(decision.held.chars, decision.decided_at, decision.request.cached_tokens)

    def release(self, decision: Decision, *, lived_as_exchange: bool) -> None:
        """The decision's stream ended. `lived_as_exchange`: the stream lasted as long as the HTTP
        exchange, so the request is over, and an end right after the decision means the endpoint
        refused it."""
        endpoint = decision.endpoint
        endpoint.release(decision.held, exchange_over=lived_as_exchange)
        if (
            lived_as_exchange
            and self.probe is not None
            and time.monotonic() - decision.decided_at < self.fast_end
        ):
            self.probe(endpoint)

    def _candidates(self, subset: frozenset[str] | None) -> Sequence[Endpoint]:
        endpoints = self.pool.endpoints
        if subset is None:
            return endpoints
        return [endpoint for endpoint in endpoints if endpoint.address in subset]

    def _learn(self, request: InferenceRequest, endpoint: Endpoint) -> None:
        request.cached_tokens = 0  # the observers' estimate for `endpoint`
        for observer in self.scheduler.observers:
            observer.on_pick(request, endpoint)
