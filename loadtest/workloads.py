"""What the load clients send: sessions of OpenAI requests, generated deterministically from a seed.

Every client process regenerates the same stream of sessions from (workload, seed) and keeps its
own share, so nothing large crosses process boundaries and runs are reproducible. Text is made of
words (`loadtest.text`), sized in tokens with the simulator's own tokenizer, so lengths are exact
while characters per token vary as they do with real text: ~4.4 for the prose of shared-prefix
and multi-turn, ~3.4 for uniform's rare words. No two random prompts share a block.

- `Uniform`: InferenceMAX-style random prompts on /v1/completions, lengths drawn in
  [ratio x L, L] (the range ratio of the benchmark_serving.py InferenceMAX runs), ignore-EOS.
  No prefix is ever shared: routing cannot help, any loss is overhead.
- `SharedPrefix`: groups of users sharing a long system prompt, each request a fresh question
  (the shape of llm-d's prefix benchmark), sized with `SharedPrefix.sized_for` so the prefixes
  together exceed one replica's KV cache but fit in the pool's. Its warm-up asks every group once,
  through the mode under test, so the measured window is the steady state, not the cold start.
- `CachePressure`: prequal's cache-pressure shape: shared prefixes in tiers of popularity (a few
  hot groups take 30% of the requests, more warm ones 40%, many cold ones 30%), sized with
  `CachePressure.sized_for` so that all prefixes together are 2-3x the pool's KV cache: no
  routing keeps every prefix cached, and the hit rate measures which ones it chooses to keep.
- `MultiTurn`: chat conversations whose every turn resends the whole history, answers included.
- `TraceReplay`: a Mooncake-format trace (`loadtest.trace`): each record one completion whose
  prompt shares text with the others exactly where their hash ids are equal, sent at the trace's
  arrival time multiplied by `time_scale` (0.1 replays ten times faster).
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar, Protocol

from loadtest.text import sized_text
from loadtest.trace import TraceRecord, load_trace, prompt_text


@dataclass(frozen=True, slots=True)
class Session:
    """Requests one simulated user sends one after another (a single turn unless multi-turn).

    Chat sessions resend the history each turn: system prompt, then every earlier question and
    the answer the server actually gave. `chat=False` sends `prompts[0]` to /v1/completions.
    """

    prompts: tuple[str, ...]
    max_tokens: tuple[int, ...]
    system: str | None = None
    chat: bool = True
    at: float | None = None  # seconds after the run's start it arrives (trace replay); None: any time

    def __len__(self) -> int:
        return len(self.prompts)

    def truncated(self, turns: int) -> Session:
        return replace(self, prompts=self.prompts[:turns], max_tokens=self.max_tokens[:turns])


class Workload(Protocol):
    kind: ClassVar[str]

    @property
    def min_requests(self) -> int:
        """Requests a run needs before the workload shows its shape (0: any number will do)."""
        ...

    def sessions(self, rng: random.Random) -> Iterator[Session]:
        """An endless stream of sessions."""
        ...

    def warmup(self, rng: random.Random) -> list[Session]:
        """Sessions that bring the replicas to the workload's steady state before measuring."""
        ...


def random_text(rng: random.Random, tokens: int, *, common: bool = True) -> str:
    """`tokens` tokens of random sentences: prose (`common` words), or rare words."""
    return sized_text(rng, tokens, common=common)


def draw_length(rng: random.Random, length: int, range_ratio: float) -> int:
    """A length uniform in [range_ratio x length, length], at least 1."""
    return max(1, rng.randint(math.ceil(length * range_ratio), length))


@dataclass(frozen=True, slots=True)
class Uniform:
    kind: ClassVar[str] = "uniform"
    min_requests: ClassVar[int] = 0
    input_tokens: int = 1024
    output_tokens: int = 512
    range_ratio: float = 0.8

    def sessions(self, rng: random.Random) -> Iterator[Session]:
        while True:
            prompt = random_text(rng, draw_length(rng, self.input_tokens, self.range_ratio), common=False)
            output = draw_length(rng, self.output_tokens, self.range_ratio)
            yield Session((prompt,), (output,), chat=False)

    def warmup(self, rng: random.Random) -> list[Session]:
        return []  # nothing to prime: no prompt is ever seen twice


@dataclass(frozen=True, slots=True)
class SharedPrefix:
    kind: ClassVar[str] = "shared-prefix"
    groups: int = 150
    prefix_tokens: int = 6000
    question_tokens: int = 1200
    output_tokens: int = 128

    def sessions(self, rng: random.Random) -> Iterator[Session]:
        prefixes = self._prefixes(rng)
        while True:
            system = prefixes[rng.randrange(self.groups)]
            question = random_text(rng, self.question_tokens)
            yield Session((question,), (self.output_tokens,), system=system)

    def warmup(self, rng: random.Random) -> list[Session]:
        """One one-token request per group (same prefixes as `sessions` from the same seed): in
        steady state every prefix has been seen; the mode's own routing decides where it is kept."""
        return [
            Session((random_text(rng, self.question_tokens),), (1,), system=system)
            for system in self._prefixes(rng)
        ]

    def _prefixes(self, rng: random.Random) -> list[str]:
        return [random_text(rng, self.prefix_tokens) for _ in range(self.groups)]

    @property
    def min_requests(self) -> int:
        """Each prefix asked ~10 times in the measured window, so every group weighs in."""
        return 10 * self.groups

    def sized_for(self, kv_tokens: int, replicas: int, fill: float = 0.75) -> SharedPrefix:
        """Enough groups that all prefixes take `fill` x the pool's KV cache (`kv_tokens` per replica).

        With fill 0.75 and more than one replica, one replica cannot hold every prefix (round-robin
        keeps evicting them), while a pool that keeps each group on one replica holds them all with
        room left for the requests' own blocks.
        """
        return replace(self, groups=max(1, math.ceil(fill * replicas * kv_tokens / self.prefix_tokens)))


@dataclass(frozen=True, slots=True)
class CachePressure:
    kind: ClassVar[str] = "cache-pressure"
    hot_groups: int = 8  # prequal's tiers: 8 hot, 72 warm, 220 cold groups
    warm_groups: int = 72
    cold_groups: int = 220
    hot_share: float = 0.3  # of the requests; cold groups take the rest
    warm_share: float = 0.4
    prefix_tokens: int = 6000
    question_tokens: int = 400
    output_tokens: int = 128

    @property
    def groups(self) -> int:
        return self.hot_groups + self.warm_groups + self.cold_groups

    @property
    def min_requests(self) -> int:
        """Each warm group asked a few times in the measured window."""
        return math.ceil(3 * self.warm_groups / self.warm_share)

    def sessions(self, rng: random.Random) -> Iterator[Session]:
        prefixes = self._prefixes(rng)
        tiers = (
            (0, self.hot_groups),
            (self.hot_groups, self.warm_groups),
            (self.hot_groups + self.warm_groups, self.cold_groups),
        )
        weights = (self.hot_share, self.warm_share, max(0.0, 1.0 - self.hot_share - self.warm_share))
        while True:
            first, count = rng.choices(tiers, weights)[0]
            system = prefixes[first + rng.randrange(count)]
            yield Session((random_text(rng, self.question_tokens),), (self.output_tokens,), system=system)

    def warmup(self, rng: random.Random) -> list[Session]:
        """One one-token request per hot and warm group (same prefixes as `sessions`): the cold
        ones are not expected to stay cached anyway."""
        popular = self._prefixes(rng)[: self.hot_groups + self.warm_groups]
        return [Session((random_text(rng, self.question_tokens),), (1,), system=system) for system in popular]

    def _prefixes(self, rng: random.Random) -> list[str]:
        return [random_text(rng, self.prefix_tokens) for _ in range(self.groups)]

    def sized_for(self, kv_tokens: int, replicas: int, pressure: float = 2.5) -> CachePressure:
        """Groups in the same proportions as now, enough that all prefixes take `pressure` x the
        pool's KV cache (`kv_tokens` per replica); at least one group per tier."""
        total = math.ceil(pressure * replicas * kv_tokens / self.prefix_tokens)
        hot = max(1, round(total * self.hot_groups / self.groups))
        warm = max(1, round(total * self.warm_groups / self.groups))
        return replace(self, hot_groups=hot, warm_groups=warm, cold_groups=max(1, total - hot - warm))


@dataclass(frozen=True, slots=True)
class MultiTurn:
    kind: ClassVar[str] = "multi-turn"
    min_requests: ClassVar[int] = 0
    turns: int = 5
    first_tokens: int = 1000
    turn_tokens: int = 200
    output_tokens: int = 200

    def sessions(self, rng: random.Random) -> Iterator[Session]:
        while True:
            prompts = (
                random_text(rng, self.first_tokens),
                *(random_text(rng, self.turn_tokens) for _ in range(self.turns - 1)),
            )
            yield Session(prompts, (self.output_tokens,) * self.turns)

    def warmup(self, rng: random.Random) -> list[Session]:
        return []  # every conversation is new


@dataclass(frozen=True, slots=True)
class TraceReplay:
    kind: ClassVar[str] = "trace"
    path: str = ""
    time_scale: float = 1.0  # real seconds per trace second
    first: int | None = None  # the first N records (of the window)
    start_s: float = 0.0  # the window, in trace seconds after its first arrival
    end_s: float | None = None

    @property
    def min_requests(self) -> int:
        """Every selected record is one request."""
        return len(_records(self.path, self.first, self.start_s, self.end_s))

    def sessions(self, rng: random.Random) -> Iterator[Session]:
        """The records in trace order; the first selected one arrives at 0."""
        records = _records(self.path, self.first, self.start_s, self.end_s)
        origin = records[0].timestamp_ms if records else 0.0
        for record in records:
            at = (record.timestamp_ms - origin) / 1000 * self.time_scale
            yield Session((prompt_text(record),), (max(1, record.output_length),), chat=False, at=at)

    def warmup(self, rng: random.Random) -> list[Session]:
        return []  # the trace's own first requests warm the cache, as in production

    @property
    def mean_rate(self) -> float:
        """Arrivals per second of the selected records as `sessions` times them (a ladder rescales
        their gaps to reach each stage's rate, keeping the trace's bursts)."""
        records = _records(self.path, self.first, self.start_s, self.end_s)
        span = (records[-1].timestamp_ms - records[0].timestamp_ms) / 1000 * self.time_scale if records else 0
        return (len(records) - 1) / span if span > 0 else 0.0


@functools.lru_cache(maxsize=4)
def _records(path: str, first: int | None, start_s: float, end_s: float | None) -> tuple[TraceRecord, ...]:
    return tuple(load_trace(path, first=first, start_s=start_s, end_s=end_s))


KINDS: dict[
    str, type[Uniform] | type[SharedPrefix] | type[CachePressure] | type[MultiTurn] | type[TraceReplay]
] = {w.kind: w for w in (Uniform, SharedPrefix, CachePressure, MultiTurn, TraceReplay)}


def to_dict(workload: Workload) -> dict[str, Any]:
    """A JSON-able description that `from_dict` turns back into the same workload."""
    return {"kind": workload.kind, **asdict(workload)}  # type: ignore[call-overload]


def from_dict(doc: dict[str, Any]) -> Workload:
    params = dict(doc)
    return KINDS[params.pop("kind")](**params)


def with_params(workload: Workload, overrides: dict[str, str]) -> Workload:
    """The workload with fields replaced from `name=value` strings (CLI `--set`), type-checked."""
    types = {f.name: type(getattr(workload, f.name)) for f in fields(workload)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - set(types))
    if unknown:
        raise ValueError(f"{workload.kind} has no parameter {', '.join(unknown)}; known: {sorted(types)}")
    return replace(workload, **{k: types[k](v) for k, v in overrides.items()})  # type: ignore[type-var]


class Deal:
    """Client `index`'s share of the global session stream, taken window by window.

    Every client process generates the same global stream and keeps the sessions dealt to it (in
    proportion to `shares`), so they agree on who sends what without talking to each other. A
    window cut at `max_requests` requests (turns) in all stops every client at the same place of
    the stream, and the next window (a ladder's next stage) goes on from there.
    """

    def __init__(self, workload: Workload, seed: int, shares: list[int], index: int) -> None:
        self._stream = enumerate(workload.sessions(random.Random(seed)))
        self._owners = _owners(shares)
        self._index = index

    def take(self, max_requests: int | None) -> Iterator[Session]:
        """This client's sessions of the next window (endless when `max_requests` is None)."""
        sent = 0
        while max_requests is None or sent < max_requests:
            if (item := next(self._stream, None)) is None:
                return  # a finite stream (a trace) has run out
            number, session = item
            if max_requests is not None:
                session = session.truncated(max_requests - sent)
                sent += len(session)
            if self._owners[number % len(self._owners)] == self._index:
                yield session


def assigned_sessions(
    workload: Workload, seed: int, shares: list[int], index: int, max_requests: int | None
) -> Iterator[Session]:
    """Client `index`'s sessions of a single window of at most `max_requests` requests in all."""
    return Deal(workload, seed, shares, index).take(max_requests)


def assigned_warmup(workload: Workload, seed: int, shares: list[int], index: int) -> list[Session]:
    """Client `index`'s share of the workload's warm-up sessions, dealt like `assigned_sessions`."""
    owners = _owners(shares)
    sessions = workload.warmup(random.Random(seed))
    return [session for number, session in enumerate(sessions) if owners[number % len(owners)] == index]


def _owners(shares: list[int]) -> list[int]:
    """Who sends the sessions of one round: each client as many as its share of the concurrency,
    interleaved, so every client's sessions are spread over the stream (each open-loop client
    then sends at its share of the rate from the first session on)."""
    turns = sorted(((k + 0.5) / share, client) for client, share in enumerate(shares) for k in range(share))
    return [client for _, client in turns]
