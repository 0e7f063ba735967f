"""One model-server replica as the scheduler sees it."""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from picker.datalayer.calibration import CharsPerToken
from picker.datalayer.prefill import PrefillQueue

# A scrape shows a request within about one interval; pending entries this old mean the scrapes
# are failing (the endpoint is then routed on stale numbers at best), so they stop counting.
MAX_PENDING_AGE = 5.0


@dataclass(slots=True)
class EngineMetrics:
    """The few numbers a vLLM (or SGLang) `/metrics` page says about load and KV capacity."""

    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0  # fraction of KV-cache blocks in use, 0..1
    block_size: int | None = None  # tokens per KV block (vllm:cache_config_info)
    num_gpu_blocks: int | None = None
    max_lora: int | None = None
    running_loras: frozenset[str] = frozenset()
    waiting_loras: frozenset[str] = frozenset()
    loaded_loras: int = 0  # adapters running or waiting, each counted once (the slots in use)
    # vllm:inter_token_latency_seconds histogram totals (cumulative): how fast it decodes.
    itl_sum: float = 0.0
    itl_count: float = 0.0
    # Cumulative counters for calibration (None: not exported): vllm:prompt_tokens_total and
    # vllm:request_success_total over every finish reason.
    prompt_tokens: float | None = None
    requests_finished: float | None = None
    # vllm:time_to_first_token_seconds_count (cumulative): requests whose prefill is done.
    first_tokens: float | None = None


@dataclass(slots=True, eq=False)
class Pending:
    """A routed request the engine's metrics may not show yet."""

    routed_at: float
    tokens: int
    chars: int = 0  # the prompt's characters, which `tokens` was estimated from
    counted: bool = True  # False once a scrape shows it or its exchange is known to be over
    prefill: int = 0  # prompt tokens it is expected to compute; 0 once past its first token
    ticket: float = math.inf  # the engine's first-token count that takes it past its prefill


class Freshness(enum.Enum):
    """The one verdict on whether an endpoint's metrics can be routed on (filter, admission and
    telemetry all ask this, so they never disagree)."""

    FRESH = "fresh"  # a recent good scrape: alive, and its numbers are current
    STALE = "stale"  # known, but its scrapes are late or failing without being refused
    DOWN = "down"  # its last scrape was refused: nothing listens there any more
    UNKNOWN = "unknown"  # never scraped successfully


@dataclass(slots=True, eq=False)
class Endpoint:
    """A replica at `address` ("ip:port"): last good metrics plus the load the picker sent it.

    Two views of the load the picker itself added, because the gateway may or may not keep an
    ext_proc stream open for the whole HTTP exchange:
    - `inflight_*`: exchanges whose stream is still open. Exact while streams live as long as
      their exchange (envoy.yaml: BUFFERED request, response skipped).
    - `pending`: requests routed since the last scrape began, which that scrape cannot show yet.
      Each stays assumed until a scrape that started after it could have counted it (prequal's
      "scrape" signal), or until its exchange is known to be over; this is all there is when
      streams end with the request phase (lean mode).
    `load` reconciles them with the scraped queue.

    And `prefill`: the routed requests still awaiting their first token, with their uncached
    prompt tokens (`prefill.tokens`: what a new request's first token waits behind).

    `load`, `load_tokens` and `prefill_tokens` are plain attributes, kept current by `refresh_load`
    whenever what they derive from changes (a scrape, a hold, a release), because every scorer
    reads them for every candidate of every decision. Code that assigns `metrics` or the counters
    directly (tests, benchmarks) calls `refresh_load` afterwards.
    """

    address: str
    metrics: EngineMetrics | None = None  # None until the first good scrape
    scraped_at: float = 0.0  # monotonic time of the last good scrape (when it completed)
    consecutive_failures: int = 0
    last_failure: str = ""  # kind of the latest failed scrape: connect, timeout, status, parse
    inflight_requests: int = 0
    inflight_tokens: int = 0
    pending: deque[Pending] = field(default_factory=deque)  # oldest first; some no longer counted
    pending_requests: int = 0  # counted entries of `pending`
    pending_tokens: int = 0
    token_seconds: float = 0.0  # recent mean inter-token latency the engine reports; 0: none yet
    # What `/v1/models` last said: model id -> its base model (None for a base model itself).
    # None until the endpoint answered: then nothing can be concluded from it.
    models: dict[str, str | None] | None = None
    labels: dict[str, str] = field(default_factory=dict)
    chars_per_token: CharsPerToken = field(default_factory=CharsPerToken)
    prefill: PrefillQueue = field(default_factory=PrefillQueue)
    load: float = field(init=False, default=0.0)
    load_tokens: int = field(init=False, default=0)
    prefill_tokens: int = field(init=False, default=0)  # prefill.tokens, read flat by the scorer

    def __post_init__(self) -> None:
        self.refresh_load()

    def freshness(self, now: float, stale_after: float) -> Freshness:
        # `fresh_among` applies the FRESH rule to many endpoints at once: keep the two equal.
        if self.metrics is None:
            return Freshness.UNKNOWN
        if self.consecutive_failures == 0 and now - self.scraped_at <= stale_after:
            return Freshness.FRESH
        return Freshness.DOWN if self.last_failure == "connect" else Freshness.STALE

    def observe_metrics(self, metrics: EngineMetrics, visible_before: float, weight: float = 0.3) -> None:
        """Take a fresh scrape, which counts every request routed before `visible_before`;
        fold the tokens generated since the last one into `token_seconds`."""
        self._forget_pending(visible_before)
        self.chars_per_token.engine_counters(metrics.prompt_tokens, metrics.requests_finished)
        previous, self.metrics = self.metrics, metrics
        self.prefill.first_tokens(metrics.first_tokens)
        self.refresh_load()
        if previous is None or metrics.itl_count <= previous.itl_count:
            return  # nothing decoded since (or the engine restarted and its counters reset)
        recent = (metrics.itl_sum - previous.itl_sum) / (metrics.itl_count - previous.itl_count)
        if recent > 0.0:
            self.token_seconds += weight * (recent - self.token_seconds) if self.token_seconds else recent

    def tokens_of(self, chars: int) -> int:
        """A prompt of `chars` characters in this endpoint's tokens (calibrated, see
        `picker.datalayer.calibration`)."""
        return round(chars / self.chars_per_token.value)

    def hold(self, chars: int, now: float, cached_tokens: int = 0) -> Pending:
        """A request with a prompt of `chars` characters was routed here: it is in flight, and
        assumed until a scrape shows it; all but `cached_tokens` of it join the prefill queue."""
        tokens = self.tokens_of(chars)
        self.chars_per_token.routed_request(chars)
        self.inflight_requests += 1
        self.inflight_tokens += tokens
        self._forget_pending(now - MAX_PENDING_AGE)
        ticket = self.prefill.ticket(self.waiting, self.pending_requests)
        entry = Pending(now, tokens, chars, prefill=max(0, tokens - cached_tokens), ticket=ticket)
        self.pending.append(entry)
        self.pending_requests += 1
        self.pending_tokens += tokens
        self.prefill.add(entry)
        self.refresh_load()
        return entry

    def release(self, entry: Pending, *, exchange_over: bool) -> None:
        """The request's ext_proc stream ended: with its exchange (`exchange_over`, the request is
        no load any more), or only with its request phase (lean mode: assumed until scraped)."""
        self.inflight_requests -= 1
        self.inflight_tokens -= entry.tokens
        if exchange_over:
            self._uncount(entry)
            self.prefill.done(entry)
        self.refresh_load()

    def reroute(self, entry: Pending) -> None:
        """The gateway served `entry` elsewhere: it was never load here, nor traffic to calibrate on."""
        self.release(entry, exchange_over=True)
        self.chars_per_token.unrouted_request(entry.chars)

    def _uncount(self, entry: Pending) -> None:
        if entry.counted:
            entry.counted = False
            self.pending_requests -= 1
            self.pending_tokens -= entry.tokens

    def _forget_pending(self, before: float) -> None:
        pending = self.pending
        while pending and pending[0].routed_at < before:
            self._uncount(pending.popleft())

    def refresh_load(self) -> None:
        """Recompute `load`: requests at the endpoint as best known, the picker's own open
        exchanges or the scraped queue and batch plus what was routed since that scrape, whichever
        is more (the scrape also counts other pickers' and clients' requests; open streams move
        first); and `load_tokens`: prompt tokens in flight on open streams, or routed since the
        last scrape."""
        m = self.metrics
        scraped = m.running + m.waiting if m is not None else 0.0
        self.load = max(float(self.inflight_requests), scraped + self.pending_requests)
        self.load_tokens = max(self.inflight_tokens, self.pending_tokens)
        self.prefill_tokens = self.prefill.tokens

    @property
    def waiting(self) -> float:
        return self.metrics.waiting if self.metrics else 0.0

    @property
    def kv_usage(self) -> float:
        return self.metrics.kv_usage if self.metrics else 0.0


def fresh_among(endpoints: Sequence[Endpoint], now: float, stale_after: float) -> Sequence[Endpoint]:
    """The endpoints whose `freshness` is FRESH, in order, judged in one pass without a call per
    endpoint (the scheduler's filter runs it on the whole pool every decision); `endpoints`
    itself when all are, so callers can keep it (and what they cached for it)."""
    fresh = [
        e
        for e in endpoints
        if e.metrics is not None and e.consecutive_failures == 0 and now - e.scraped_at <= stale_after
    ]
    return endpoints if len(fresh) == len(endpoints) else fresh
