"""The engine of one simulated replica: vLLM V1's scheduler on a calibrated step clock.

The model, piece by piece:
- Tokens: the ids the API layer's tokenizer made of the prompt (`tokenizer.py`), hashed per
  block as vLLM's prefix cache does (`tokens.py`); generated tokens are sampled ids.
- KV cache (`kvcache.py`): `num_gpu_blocks` blocks of `block_size` tokens; automatic prefix
  caching over chained block hashes; blocks of finished or preempted requests stay cached until
  new demand evicts them, least recently freed first and a request's tail before its head. A
  hit skips whole blocks of prefill and never covers the prompt's last token (vLLM recomputes
  it). Prefix-cache queries and hits are counted in tokens at admission, as vLLM does.
- Scheduler (`Engine.schedule`), each step: running requests first, in admission order, then
  waiting ones in FIFO order, within `max_num_batched_tokens` (chunked prefill: a long prompt
  takes several steps) and `max_num_seqs`; at most `max_loras` adapters per batch (other
  adapters' requests wait, the rest go ahead). When a running request needs a block and none is
  free, the newest running request is preempted (recompute: blocks freed, hashes kept, queued
  first) until the allocation fits; no new request is admitted in such a step.
- Step time (`profiles.py`): fixed overhead + prefill tokens + decoding sequences + context read,
  divided by `speed`. A token is sampled for every request whose known tokens are all computed.
- KV events (`kv_events.py`): with a publisher attached, each step publishes BlockStored for the
  blocks it added to the prefix cache and BlockRemoved for those allocation evicted, so the events
  follow the cache exactly.
- Output length: `max_tokens` tokens (ignore-EOS, as serving benchmarks run); the API layer may
  choose a shorter length (`min_tokens`, or its default when `max_tokens` is absent) and mark
  the end as EOS (`finish_reason` "stop").

Scheduling (`schedule`) and applying a step's outcome (`complete`) are separate and take the time
as an argument, so the engine is deterministic and unit tests drive it without a clock.
"""

from __future__ import annotations

import asyncio
import enum
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from vllm_sim.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, KVEventPublisher
from vllm_sim.kvcache import Block, KVCache
from vllm_sim.profiles import Profile
from vllm_sim.tokenizer import OutputSampler
from vllm_sim.tokens import TokenSequence

MAX_LAG = 0.1  # seconds the engine may fall behind its timeline and still catch up


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(slots=True, eq=False)
class SimRequest:
    """One generation request and everything the engine and the API layer track about it."""

    request_id: str
    tokens: TokenSequence
    max_tokens: int
    arrival: float
    output: OutputSampler
    lora: str | None = None
    stop_at_max: bool = False  # finish as if the model emitted EOS ("stop") instead of "length"
    max_tokens_param: int | None = None  # the client's max_tokens, if it gave one (for metrics)
    num_prompt_tokens: int = 0
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose KV is in `blocks`
    blocks: list[Block] = field(default_factory=list)
    num_cached_blocks: int = 0  # leading blocks already published to the prefix cache
    cached_tokens: int | None = None  # prefix-cache hit of the first admission
    recomputed_tokens: int = 0  # cached, but recomputed because a hit never covers the last token
    generated: list[str] = field(default_factory=list)  # the text of each sampled token
    scheduled_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    progress: asyncio.Event = field(default_factory=asyncio.Event)  # new tokens, or the end
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = self.tokens.num_tokens

    @property
    def done(self) -> bool:
        return self.status in (Status.FINISHED, Status.ABORTED)


@dataclass(frozen=True, slots=True)
class CacheProbe:
    """What a request would find if it arrived now (`Engine.probe`)."""

    prompt_tokens: int
    cached_tokens: int  # its prefix-cache hit, as admission would count it
    running: int
    waiting: int
    estimated_ttft: float  # seconds of real time to its first token, FIFO behind the queued prefill


@dataclass(slots=True)
class StepPlan:
    """What one engine step computes: (request, tokens) pairs and how long the step takes."""

    scheduled: list[tuple[SimRequest, int]]
    prefill_tokens: int
    decode_seqs: int
    duration: float


@dataclass(slots=True)
class EngineCounters:
    """The monotonic counters vLLM exports (prompt / generation tokens, cache queries, ...)."""

    prompt_tokens: int = 0
    prompt_tokens_cached: int = 0  # of which found in the prefix cache
    prompt_tokens_recomputed: int = 0  # cached, but computed again (a hit never covers the last)
    generation_tokens: int = 0
    preemptions: int = 0
    prefix_queries: int = 0  # tokens looked up in the prefix cache
    prefix_hits: int = 0  # of which found cached
    finished: Counter[str] = field(default_factory=Counter)  # by finish reason


class EngineObserver(Protocol):
    """Receives per-step, per-token and per-request numbers (the replica's histograms)."""

    def on_step(self, tokens: int) -> None:
        """A step ended: prompt tokens of requests whose prefill completed, plus tokens sampled."""
        ...

    def on_token(self, request: SimRequest, gap: float | None) -> None:
        """A token was generated; `gap` is the time since the previous one (None for the first)."""
        ...

    def on_finished(self, request: SimRequest) -> None: ...


class Engine:
    def __init__(
        self,
        profile: Profile,
        *,
        speed: float = 1.0,
        prefix_caching: bool = True,
        max_loras: int = 1,
        observer: EngineObserver | None = None,
        lora_ids: dict[str, int] | None = None,
    ) -> None:
        self.profile = profile
        self.speed = speed
        self.max_loras = max_loras
        self.observer = observer
        self.kv = KVCache(profile.num_gpu_blocks, profile.block_size, prefix_caching)
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.counters = EngineCounters()
        self.lora_ids = lora_ids or {}  # adapter name -> vLLM's lora_int_id (for KV events)
        self.publisher: KVEventPublisher | None = None
        self._events: list[KVEvent] = []
        self._work = asyncio.Event()

    def publish_kv_events(self, publisher: KVEventPublisher) -> None:
        """From now on, publish every change to the prefix cache (BlockStored / BlockRemoved)."""
        self.publisher = publisher
        self.kv.evicted = []

    def reset_prefix_cache(self) -> bool:
        """Empty the prefix cache (AllBlocksCleared); refused while requests hold blocks."""
        if not self.kv.reset():
            return False
        if self.publisher is not None:
            self.publisher.publish([AllBlocksCleared()])
        return True

    def submit(
        self,
        request_id: str,
        prompt: Sequence[int],
        max_tokens: int,
        now: float,
        *,
        output: OutputSampler,
        lora: str | None = None,
        stop_at_max: bool = False,
        max_tokens_param: int | None = None,
    ) -> SimRequest:
        request = SimRequest(
            request_id,
            TokenSequence(prompt, self.profile.block_size, salt=lora or ""),
            max_tokens,
            now,
            output,
            lora=lora,
            stop_at_max=stop_at_max,
            max_tokens_param=max_tokens_param,
        )
        self.waiting.append(request)
        self._work.set()
        return request

    def abort(self, request: SimRequest, now: float) -> None:
        """The client went away: free the request's blocks and forget it."""
        if request.done:
            return
        if request.status is Status.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._release(request, Status.ABORTED, "abort", now)

    def probe(self, prompt: Sequence[int], lora: str | None = None) -> CacheProbe:
        """The prefix-cache hit a request with `prompt` would get now, and its time to first token
        if nothing else arrived: every prompt token still to prefill ahead of it (running requests'
        rest, waiting requests' uncached part) and its own, in chunked-prefill steps beside the
        decoding sequences. Exact knowledge a router cannot have: the harness's oracle uses it."""
        block_size = self.profile.block_size
        tokens = TokenSequence(prompt, block_size, salt=lora or "")
        cached = len(self.kv.longest_hit(tokens.hashes, (tokens.num_tokens - 1) // block_size)) * block_size
        prefill = tokens.num_tokens - cached
        decoding = context = 0
        for request in self.running:
            context += request.num_computed
            if request.generated:
                decoding += 1
            else:
                prefill += request.tokens.num_tokens - request.num_computed
        for request in self.waiting:
            limit = (request.tokens.num_tokens - 1) // block_size
            hit = len(self.kv.longest_hit(request.tokens.hashes, limit)) * block_size
            prefill += request.tokens.num_tokens - max(hit, request.num_computed)
        budget = max(1, self.profile.max_num_batched_tokens - decoding)
        steps = -(-prefill // budget)
        cost = self.profile.cost
        seconds = steps * cost.seconds(0, decoding, context) + cost.c1_ms * prefill / 1000
        return CacheProbe(
            tokens.num_tokens, cached, len(self.running), len(self.waiting), seconds / self.speed
        )

    @property
    def running_loras(self) -> set[str]:
        return {r.lora for r in self.running if r.lora}

    @property
    def waiting_loras(self) -> set[str]:
        return {r.lora for r in self.waiting if r.lora}

    def schedule(self, now: float) -> StepPlan | None:
        """Choose the step starting at `now`; None when there is no work."""
        if not self.running and not self.waiting:
            return None
        budget = self.profile.max_num_batched_tokens
        scheduled: list[tuple[SimRequest, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            count = min(request.tokens.num_tokens - request.num_computed, budget)
            if self._grow(request, request.num_computed + count):
                scheduled.append((request, count))
                budget -= count
                i += 1
                continue
            preempted = True
            while True:
                victim = self.running.pop()
                self._preempt(victim)
                if victim is request or self._grow(request, request.num_computed + count):
                    break
            if victim is not request:
                scheduled.append((request, count))
                budget -= count
                i += 1
        if not preempted:
            budget = self._admit_waiting(budget, scheduled, now)
        return self._plan(scheduled)

    def _admit_waiting(self, budget: int, scheduled: list[tuple[SimRequest, int]], now: float) -> int:
        block_size = self.profile.block_size
        loras = self.running_loras
        skipped: list[SimRequest] = []
        while self.waiting and budget > 0 and len(self.running) < self.profile.max_num_seqs:
            request = self.waiting[0]
            if request.lora and request.lora not in loras and len(loras) >= self.max_loras:
                skipped.append(self.waiting.popleft())
                continue
            num_tokens = request.tokens.num_tokens
            # The last token is always recomputed, so a full hit still leaves one block to fill.
            allowed = (num_tokens - 1) // block_size
            hits = self.kv.longest_hit(request.tokens.hashes, allowed + 1)
            recomputed = len(hits) > allowed
            hits = hits[:allowed]
            hit_tokens = len(hits) * block_size
            count = min(num_tokens - hit_tokens, budget)
            new_blocks = -(-(hit_tokens + count) // block_size) - len(hits)
            if not self.kv.can_allocate(new_blocks, hits):
                break
            self.waiting.popleft()
            self.kv.touch(hits)
            request.blocks = [*hits, *self.kv.allocate(new_blocks)]
            request.num_computed = hit_tokens
            request.num_cached_blocks = len(hits)
            if request.scheduled_at is None:
                request.scheduled_at = now
                request.cached_tokens = hit_tokens
                request.recomputed_tokens = block_size if recomputed else 0
            self.counters.prefix_queries += num_tokens
            self.counters.prefix_hits += hit_tokens
            request.status = Status.RUNNING
            self.running.append(request)
            if request.lora:
                loras.add(request.lora)
            scheduled.append((request, count))
            budget -= count
        self.waiting.extendleft(reversed(skipped))
        return budget

    def _plan(self, scheduled: list[tuple[SimRequest, int]]) -> StepPlan:
        prefill_tokens = decode_seqs = context_tokens = 0
        for request, count in scheduled:
            if request.generated and request.num_computed == request.tokens.num_tokens - 1:
                decode_seqs += 1
            else:
                prefill_tokens += count
            context_tokens += request.num_computed + count
        duration = self.profile.cost.seconds(prefill_tokens, decode_seqs, context_tokens)
        return StepPlan(scheduled, prefill_tokens, decode_seqs, duration / self.speed)

    def complete(self, plan: StepPlan, now: float) -> None:
        """Apply a finished step: advance computed tokens, publish full blocks, sample tokens."""
        tokens = 0
        for request, count in plan.scheduled:
            if request.status is not Status.RUNNING:
                continue  # aborted while the step ran
            request.num_computed += count
            self._publish_blocks(request)
            if request.num_computed == request.tokens.num_tokens:
                tokens += 1 if request.generated else 1 + request.num_prompt_tokens
                self._sample(request, now)
        if self.observer:
            self.observer.on_step(tokens)
        if self.publisher is not None:
            self._flush_events()

    def _flush_events(self) -> None:
        """Publish this step's events: evictions (made while scheduling it) first, then stores."""
        evicted = self.kv.evicted
        assert self.publisher is not None and evicted is not None
        events: list[KVEvent] = [BlockRemoved(evicted[:])] if evicted else []
        evicted.clear()
        events += self._events
        self._events.clear()
        self.publisher.publish(events)

    def _sample(self, request: SimRequest, now: float) -> None:
        token_id, text = request.output.next_token()
        request.tokens.append(token_id)
        request.generated.append(text)
        self.counters.generation_tokens += 1
        gap = None
        if request.first_token_at is None:
            request.first_token_at = now
            self.counters.prompt_tokens += request.num_prompt_tokens
            self.counters.prompt_tokens_cached += request.cached_tokens or 0
            self.counters.prompt_tokens_recomputed += request.recomputed_tokens
        else:
            gap = now - (request.last_token_at or now)
        request.last_token_at = now
        if self.observer:
            self.observer.on_token(request, gap)
        if len(request.generated) >= request.max_tokens:
            self.running.remove(request)
            reason = "stop" if request.stop_at_max else "length"
            self._release(request, Status.FINISHED, reason, now)
        else:
            request.progress.set()

    def _publish_blocks(self, request: SimRequest) -> None:
        hashes = request.tokens.hashes
        full = min(request.num_computed // self.profile.block_size, len(hashes))
        stored = [
            i for i in range(request.num_cached_blocks, full) if self.kv.cache(request.blocks[i], hashes[i])
        ]
        request.num_cached_blocks = max(request.num_cached_blocks, full)
        if self.publisher is not None and stored:
            self._record_stored(request, stored)

    def _record_stored(self, request: SimRequest, indexes: list[int]) -> None:
        """One BlockStored per run of consecutive newly cached blocks of `request`."""
        tokens, lora = request.tokens, request.lora
        runs = [[indexes[0]]]
        for i in indexes[1:]:
            if i == runs[-1][-1] + 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            self._events.append(
                BlockStored(
                    block_hashes=[tokens.hashes[i] for i in run],
                    parent_block_hash=tokens.parent_hash(run[0]),
                    token_ids=[t for i in run for t in tokens.block_tokens(i)],
                    block_size=self.profile.block_size,
                    lora_id=self.lora_ids.get(lora) if lora else None,
                    lora_name=lora,
                )
            )

    def _grow(self, request: SimRequest, total_tokens: int) -> bool:
        """Give `request` enough blocks for `total_tokens`; False when the pool is short."""
        needed = -(-total_tokens // self.profile.block_size) - len(request.blocks)
        if needed <= 0:
            return True
        if not self.kv.can_allocate(needed):
            return False
        request.blocks.extend(self.kv.allocate(needed))
        return True

    def _preempt(self, request: SimRequest) -> None:
        """Recompute preemption: drop the KV (hashes stay cached) and queue the request first."""
        self.kv.free(request.blocks)
        request.blocks = []
        request.num_computed = 0
        request.num_cached_blocks = 0
        request.status = Status.WAITING
        self.waiting.appendleft(request)
        self.counters.preemptions += 1

    def _release(self, request: SimRequest, status: Status, reason: str, now: float) -> None:
        self.kv.free(request.blocks)
        request.blocks = []
        request.status = status
        request.finish_reason = reason
        request.finished_at = now
        self.counters.finished[reason] += 1
        if self.observer:
            self.observer.on_finished(request)
        request.progress.set()
        request.ended.set()

    async def run(self) -> None:
        """Step forever, each step ending at its deadline on the simulated timeline.

        Deadlines follow each other without gaps, so timer overshoot and short stalls of a busy
        host (many replicas share one core) are made up by the next steps, as a GPU would not
        have paused; a lag beyond `MAX_LAG` is given up rather than replayed as a burst.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            plan = self.schedule(loop.time())
            if plan is None:
                self._work.clear()
                await self._work.wait()
                deadline = loop.time()
                continue
            now = loop.time()
            deadline = max(deadline, now - MAX_LAG) + plan.duration
            if deadline > now:
                await asyncio.sleep(deadline - now)
            else:
                await asyncio.sleep(0)  # behind schedule: still let the API layer run
            self.complete(plan, loop.time())
