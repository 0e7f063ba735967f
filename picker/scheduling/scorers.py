"""Scorers: each rates every candidate in [0, 1]; the scheduler sums them with their weights.

Distribution scorers spread load (scraped queue and KV use, the picker's own in-flight counts);
affinity scorers pull a request towards the endpoint likely to hold its state (prefix cache,
session). Hot path: plain lists of floats, no per-candidate allocation beyond them, and None
("no preference": every candidate would score the same) where that is known cheaply, which
takes the scorer out of the sum.
"""

from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, ClassVar

from picker.config import camel
from picker.datalayer.calibration import PRIOR_CHARS_PER_TOKEN
from picker.datalayer.endpoint import Endpoint
from picker.datalayer.pool import EndpointPool
from picker.request import CHARS_PER_TOKEN, InferenceRequest
from picker.scheduling.interface import ScorerCategory
from picker.scheduling.prefix import PrefixIndex, block_hashes
from picker.telemetry import PREFIX_MATCH_RATIO

_load = attrgetter("load")
_load_tokens = attrgetter("load_tokens")
_prefill_tokens = attrgetter("prefill_tokens")
_address = attrgetter("address")


def least_is_best(values: list[float], min_span: float = 0.0) -> list[float] | None:
    """The reference queue formula (max - v) / (max - min): 1 for the least loaded, 0 for the most.

    All equal (or none) -> None: nothing to prefer. `min_span` keeps small differences small: the
    range is at least that wide, so one request more than the least loaded does not cost the full
    weight (which would let any load wobble override a prefix-cache hit).
    """
    distinct = set(values)
    if len(distinct) < 2:
        return None
    low = min(distinct)
    span = max(max(distinct) - low, min_span)
    if len(distinct) * 4 > len(values):
        return [1.0 - (v - low) / span for v in values]
    # Loads are mostly a few small counts: compute each distinct score once, look the rest up.
    score = {v: 1.0 - (v - low) / span for v in distinct}
    return list(map(score.__getitem__, values))


class _Positions:
    """Each candidate's position, for scorers that fill in a few scores and leave the rest 0.

    Kept for the last tuple of candidates seen: the pool's snapshot is a tuple the filters hand on
    unchanged while every endpoint passes, so the map is built once per change of the pool, not
    per decision. Lists (a filtered pool) may change in place: those get None.
    """

    __slots__ = ("_of", "_positions")

    def __init__(self) -> None:
        self._of: tuple[Endpoint, ...] = ()
        self._positions: dict[Endpoint, int] = {}

    def of(self, candidates: Sequence[Endpoint]) -> dict[Endpoint, int] | None:
        if candidates is not self._of:
            if type(candidates) is not tuple:
                return None
            self._of = candidates
            self._positions = {ep: i for i, ep in enumerate(candidates)}
        return self._positions


@dataclass(slots=True)
class QueueScorer:
    """Fewer waiting requests (last scrape) is better; unknown metrics -> 0."""

    name: ClassVar[str] = "queue-scorer"
    category: ClassVar[ScorerCategory] = ScorerCategory.DISTRIBUTION
    min_span: float = 4.0  # waiting requests; 0 is the reference EPP's pure min-max

    def score(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float] | None:
        known = [m.waiting for ep in candidates if (m := ep.metrics) is not None]
        scaled = least_is_best(known, self.min_span)
        if len(known) == len(candidates) or not known:
            return scaled
        # An endpoint we know nothing about scores 0 and stays out of the others' scale.
        ranked = iter(scaled or [1.0] * len(known))
        return [0.0 if ep.metrics is None else next(ranked) for ep in candidates]


@dataclass(slots=True)
class KVCacheUtilizationScorer:
    """More free KV cache (last scrape) is better: 1 - kv_usage; unknown -> 0."""

    name: ClassVar[str] = "kv-cache-utilization-scorer"
    category: ClassVar[ScorerCategory] = ScorerCategory.DISTRIBUTION

    def score(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float]:
        return [
            (1.0 - m.kv_usage if m.kv_usage < 1.0 else 0.0) if (m := ep.metrics) else 0.0 for ep in candidates
        ]


@dataclass(slots=True)
class InflightLoadScorer:
    """Less load at the endpoint, counting what the picker just sent, is better.

    `measure` is what counts: "requests" (`Endpoint.load`: open streams, or requests assumed until
    a scrape shows them), "tokens" (prompt tokens in flight) or "prefill" (uncached prompt tokens
    awaiting their first token, `Endpoint.prefill_tokens`: what a new request's time to first
    token waits behind). All move with every decision, so a burst arriving between two scrapes
    is spread instead of landing entirely on the endpoint that looked idle at the last scrape.
    Configure it once per measure to weigh several.
    """

    name: ClassVar[str] = "inflight-load-scorer"
    category: ClassVar[ScorerCategory] = ScorerCategory.DISTRIBUTION
    measure: str = "requests"  # "requests", "tokens" or "prefill"
    min_span: float = -1.0  # in units of `measure`; < 0: 4 requests or 4,096 tokens
    _load: Callable[[Endpoint], float] = field(init=False, default=_load)

    def __post_init__(self) -> None:
        measures = {"requests": _load, "tokens": _load_tokens, "prefill": _prefill_tokens}
        if self.measure not in measures:
            raise ValueError(f"measure must be 'requests', 'tokens' or 'prefill', not {self.measure!r}")
        self._load = measures[self.measure]
        if self.min_span < 0:
            self.min_span = 4.0 if self.measure == "requests" else 4096.0

    def score(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float] | None:
        return least_is_best(list(map(self._load, candidates)), self.min_span)


@dataclass(slots=True)
class LatencyScorer:
    """Prefer replicas that decode fastest: the recent mean inter-token latency each one reports.

    A pool may mix fast and slow GPUs; in-flight counts alone would give each the same number of
    requests, and the slow ones would set the tail latency. Each scrape's change in
    `vllm:inter_token_latency_seconds` tells how fast a replica decodes right now, within one
    scrape interval of its first tokens. A replica serves its batch concurrently and slows as the
    batch grows, so the fast ones take the load until it slows them to the others' pace (queue and
    KV scorers still guard against overload). Scale-free: within `tolerance` of the fastest
    scores 1, `zero_at` times the fastest scores 0. Replicas with no measurement yet count as
    the pool's average, so they get tried; with none measured there is no preference (None).
    """

    name: ClassVar[str] = "latency-scorer"
    category: ClassVar[ScorerCategory] = ScorerCategory.DISTRIBUTION
    tolerance: float = 0.5  # up to 50% slower than the fastest counts as just as fast
    zero_at: float = 2.5  # this many times the fastest's latency scores 0

    def __post_init__(self) -> None:
        if self.tolerance < 0 or self.zero_at <= 1 + self.tolerance:
            raise ValueError("latency scorer needs tolerance >= 0 and zero_at > 1 + tolerance")

    def score(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float] | None:
        known = [t for ep in candidates if (t := ep.token_seconds) > 0.0]
        if not known:
            return None
        usual = sum(known) / len(known)
        best = min(known)
        # Batch size alone moves a replica's latency by tens of percent: only bigger gaps count.
        free = 1.0 + self.tolerance
        span = self.zero_at - free
        return [
            1.0 - min(1.0, max(0.0, ((ep.token_seconds or usual) / best - free) / span)) for ep in candidates
        ]


@dataclass(slots=True)
class SessionAffinityScorer:
    """Requests of one session (`request.session_key`) prefer the endpoint that served it last.

    No preference (None) for a request without a session, or whose endpoint is not a candidate.
    """

    name: ClassVar[str] = "session-affinity-scorer"
    category: ClassVar[ScorerCategory] = ScorerCategory.AFFINITY
    max_sessions: int = 65536
    _last: OrderedDict[str, str] = field(init=False, default_factory=OrderedDict)

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")

    def score(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float] | None:
        address = self._last.get(request.session_key) if request.session_key else None
        if address is None:
            return None
        addresses = list(map(_address, candidates))
        if address not in addresses:
            return None
        scores = [0.0] * len(candidates)
        scores[addresses.index(address)] = 1.0
        return scores

    def on_pick(self, request: InferenceRequest, endpoint: Endpoint) -> None:
        key = request.session_key
        if not key:
            return
        self._last[key] = endpoint.address
        self._last.move_to_end(key)
        if len(self._last) > self.max_sessions:
            self._last.popitem(last=False)


@dataclass(slots=True)
class LoraAffinityScorer:
    """Prefer the endpoint that has the request's LoRA adapter loaded (the reference scoring).

    From `vllm:lora_requests_info`: 1.0 when the adapter is running there, 0.8 when it is not but
    a slot is free (adapters running or waiting, each counted once, fewer than `max_lora`), 0.6
    when it is only waiting, else 0. A base model an endpoint serves (its `/v1/models` says so)
    is always loaded there: 1.0, so base-model requests are not steered by adapter slots.
    Equal scores everywhere (no LoRA in the pool, a base model all serve) are no preference: None.
    """

    name: ClassVar[str] = "lora-affinity-scorer"
    category: ClassVar[ScorerCategory] = ScorerCategory.AFFINITY

    def score(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float] | None:
        model = request.model
        if not model:
            return None
        scores: list[float] = []
        append = scores.append
        for ep in candidates:
            models = ep.models
            if models is not None and model in models and models[model] is None:
                append(1.0)  # a base model it serves
                continue
            m = ep.metrics
            if m is None or m.max_lora is None:  # no LoRA there (or not known yet)
                append(0.0)
            elif model in m.running_loras:
                append(1.0)
            elif m.loaded_loras < m.max_lora:
                append(0.8)
            else:
                append(0.6 if model in m.waiting_loras else 0.0)
        return scores if scores and scores.count(scores[0]) != len(scores) else None


@dataclass(slots=True)
class LoadGuard:
    """Prefix scores from an index's matches, with the load guard both prefix scorers apply: an
    affine endpoint whose load exceeds the least-loaded candidate's by more than
    `max_load_gap + relative_load_gap * least` scores 0 for this request, so load decides and a hot
    prefix does not pile onto one replica. Scores are filled in only for the few endpoints that
    match; none matching is no preference (None)."""

    max_load_gap: float = 8.0  # math.inf disables the guard
    relative_load_gap: float = 0.25
    _positions: _Positions = field(default_factory=_Positions)

    def __post_init__(self) -> None:
        if self.max_load_gap < 0 or self.relative_load_gap < 0:
            raise ValueError("maxLoadGap and relativeLoadGap must not be negative")

    def scores(
        self, matched: dict[Endpoint, int], total: int, candidates: Sequence[Endpoint]
    ) -> list[float] | None:
        """Each candidate's matched share of `total` blocks (0 past the guard)."""
        if not matched:
            return None
        limit = math.inf
        if self.max_load_gap != math.inf:
            least = min(map(_load, candidates))
            limit = least + self.max_load_gap + self.relative_load_gap * least
        positions = self._positions.of(candidates)
        if positions is None:
            get = matched.get
            scores = [n / total if (n := get(ep, 0)) and ep.load <= limit else 0.0 for ep in candidates]
        else:
            scores = [0.0] * len(candidates)
            for ep, n in matched.items():
                at = positions.get(ep)
                if at is not None and ep.load <= limit:
                    scores[at] = n / total
        return scores if any(scores) else None


def record_held(request: InferenceRequest, held: int, total: int, block_tokens: int, beyond: int = 0) -> None:
    """What a prefix index expected the chosen endpoint to hold of the request (`held` of its
    `total` blocks, and `beyond` blocks past them): observed as the match ratio, and told to
    request control as cached tokens, which stay out of that endpoint's prefill queue. Both prefix
    scorers call it from `on_pick`."""
    PREFIX_MATCH_RATIO.observe(held / total)
    request.cached_tokens = max(request.cached_tokens, (held + beyond) * block_tokens)


@dataclass(slots=True)
class _PrefixCycle:
    """What the prefix scorer keeps in `request.cycle` between scoring and `on_pick`."""

    block_chars: int
    hashes: list[int]
    matched: dict[Endpoint, int] = field(default_factory=dict)


_RETUNE_INTERVAL = 1.0  # seconds between looks at the pool's reported block sizes
# Re-cut the index's blocks only when the pool's calibrated characters per token moved this much:
# every re-cut forgets the index.
_RECUT_RATIO = 1.25
_PREFIX_DEFAULT_BLOCK = 16  # PrefixCacheScorer.block_size_tokens (tokens per block)


@dataclass(slots=True)
class PrefixCacheScorer:
    """Share of the prompt's leading blocks the index says the endpoint was already given.

    Also the PickObserver that teaches the index: each decision records the request's blocks for
    the chosen endpoint. `LoadGuard` keeps a hot prefix from piling onto one replica. Parameters
    carry the reference scorer's names; with `auto_tune` the block size and each
    endpoint's capacity follow what the engines report (`vllm:cache_config_info`), and the
    characters a block spans follow the characters per token each endpoint is calibrated to
    (`picker.datalayer.calibration`): an endpoint holds num_gpu_blocks x block_size tokens, which
    is that many times its characters per token of prompt text.
    """

    name: ClassVar[str] = "prefix-cache-scorer"
    category: ClassVar[ScorerCategory] = ScorerCategory.AFFINITY
    pool: EndpointPool
    clock: Callable[[], float] = time.monotonic
    block_size_tokens: int = _PREFIX_DEFAULT_BLOCK
    max_prefix_blocks_to_match: int = 256
    lru_capacity_per_server: int = 31250  # blocks per endpoint, until (auto_tune) it reports its own
    auto_tune: bool = True
    max_load_gap: float = 8.0  # math.inf (YAML .inf) disables the load guard
    relative_load_gap: float = 0.25
    index: PrefixIndex = field(init=False, default_factory=PrefixIndex)
    guard: LoadGuard = field(init=False)
    _next_tune: float = field(init=False, default=-math.inf)
    _cycle_key: str = field(init=False, default="")
    _chars_per_token: float = field(init=False, default=PRIOR_CHARS_PER_TOKEN)  # what blocks are cut at

    def __post_init__(self) -> None:
        self._cycle_key = f"prefix-cache-scorer@{id(self)}"  # two instances may hash differently
        for param in ("block_size_tokens", "max_prefix_blocks_to_match", "lru_capacity_per_server"):
            if getattr(self, param) < 1:
                raise ValueError(f"{camel(param)} must be at least 1")
        self.guard = LoadGuard(self.max_load_gap, self.relative_load_gap)
        self.pool.on_removed(self.index.drop_endpoint)

    @staticmethod
    def legacy_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
        """The reference scorer's older spellings: `blockSize` / `hashBlockSize` (characters, in
        whole 4-character tokens here) and `maxPrefixTokensToMatch` (tokens; wins over blocks)."""
        parameters = dict(parameters)
        for key in ("blockSize", "hashBlockSize"):
            chars = parameters.pop(key, None)
            if chars is None:
                continue
            if isinstance(chars, bool) or not isinstance(chars, int) or chars < 1:
                raise ValueError(f"{key} must be a positive number of characters, not {chars!r}")
            parameters.setdefault("blockSizeTokens", max(1, chars // CHARS_PER_TOKEN))
        tokens = parameters.pop("maxPrefixTokensToMatch", None)
        if tokens is not None:
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
                raise ValueError(f"maxPrefixTokensToMatch must be a positive integer, not {tokens!r}")
            block = parameters.get("blockSizeTokens", _PREFIX_DEFAULT_BLOCK)
            if isinstance(block, int) and block > 0:  # else the block size check reports it
                parameters["maxPrefixBlocksToMatch"] = max(1, tokens // block)
        return parameters

    def score(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float] | None:
        if self.auto_tune:
            self._retune()
        state = self._cycle(request)
        matched = state.matched = self.index.match(state.hashes)
        return self.guard.scores(matched, len(state.hashes), candidates)

    def on_pick(self, request: InferenceRequest, endpoint: Endpoint) -> None:
        state = self._cycle(request)
        hashes = state.hashes
        if hashes:
            held = state.matched.get(endpoint, 0)
            tail = max(0, request.prompt_chars // state.block_chars - len(hashes))  # past the index
            # All the index sees held: so is what an earlier prompt had past it, as far as this
            # one's goes (a conversation's next turn recomputes only its new tokens).
            beyond = min(tail, self.index.tail(endpoint, hashes[-1])) if held == len(hashes) else 0
            record_held(request, held, len(hashes), self.block_size_tokens, beyond)
            self.index.record(endpoint, hashes, self._capacity(endpoint), tail)

    def _cycle(self, request: InferenceRequest) -> _PrefixCycle:
        """The request's block hashes, computed once per request and block size."""
        state = request.cycle.get(self._cycle_key)
        block_chars = self.block_chars
        if state is None or state.block_chars != block_chars:
            hashes = block_hashes(request.prompt, request.model, block_chars, self.max_prefix_blocks_to_match)
            state = request.cycle[self._cycle_key] = _PrefixCycle(block_chars, hashes)
        return state

    @property
    def block_chars(self) -> int:
        """Characters of prompt text in one block of the index."""
        return max(1, round(self.block_size_tokens * self._chars_per_token))

    def _capacity(self, endpoint: Endpoint) -> int:
        """The endpoint's KV capacity in our blocks: its tokens (blocks x block size) as characters
        at its own calibrated characters per token, over the characters of one of our blocks."""
        m = endpoint.metrics
        if not self.auto_tune or m is None or not m.num_gpu_blocks:
            return self.lru_capacity_per_server
        chars = m.num_gpu_blocks * (m.block_size or self.block_size_tokens) * endpoint.chars_per_token.value
        return max(1, round(chars / self.block_chars))

    def _retune(self) -> None:
        """Adopt the block size most endpoints report; old hashes no longer match, so clear."""
        now = self.clock()
        if now < self._next_tune:
            return
        self._next_tune = now + _RETUNE_INTERVAL
        sizes = Counter(m.block_size for ep in self.pool.endpoints if (m := ep.metrics) and m.block_size)
        if sizes:
            size = sizes.most_common(1)[0][0]
            if size != self.block_size_tokens:
                self.block_size_tokens = size
                self.index.clear()
        endpoints = self.pool.endpoints
        measured = sorted(ep.chars_per_token.value for ep in endpoints if ep.chars_per_token.calibrated)
        if measured:
            median = measured[len(measured) // 2]
            if max(median, self._chars_per_token) / min(median, self._chars_per_token) >= _RECUT_RATIO:
                self._chars_per_token = median
                self.index.clear()
