"""One load-client process: closed-loop streaming requests, timed the way `vllm bench serve` times them.

The runner starts several of these (`python -m loadtest client`), because one asyncio process
parsing SSE saturates a core long before the replicas do. Each reads a `ClientJob` as one JSON
line on stdin, warms up, prints `{"ready": true}`, waits for a `go` line, runs its share of the
concurrency, writes a `ClientResult` to `job.result_path` and prints `{"finished": true}`. While
running it prints `{"done": n, "errors": e}` a few times a second for the progress bar.

Timings per request: TTFT = first content token; ITL = every gap between successive content
chunks (pooled); TPOT = (E2E - TTFT) / (output tokens - 1); E2E = until `[DONE]`. Output and
prompt token counts come from the final usage chunk (`stream_options.include_usage`), since a
server may pack several tokens into one chunk. Failures are counted by kind: `http_<status>`,
`connection` (no response), `timeout`, `truncated` (the stream ended before `[DONE]`),
`stream_error` (an error event inside the stream) and `malformed` (not OpenAI-shaped SSE).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from loadtest.oracle import OracleRouter
from loadtest.workloads import (
    Deal,
    Session,
    SharedPrefix,
    TraceReplay,
    assigned_warmup,
    from_dict,
    random_text,
)
from vllm_sim import REPLICA_HEADER

PROGRESS_INTERVAL = 0.25
WARMUP_PROMPT_TOKENS = 32
WARMUP_OUTPUT_TOKENS = 4


@dataclass(frozen=True, slots=True)
class Stage:
    """One window of a request-rate ladder: open-loop arrivals at `rate` per second over all
    clients (Poisson, `rate` x `duration` of them in a timed window; a trace keeps its own
    arrival pattern, its gaps rescaled to that mean rate),
    until `max_requests` have been sent in all or `duration` seconds have passed. The window ends
    when its last request does, so a stage's backlog never spills into the next one."""

    rate: float
    max_requests: int | None = None
    duration: float | None = None


@dataclass(frozen=True, slots=True)
class ClientJob:
    index: int
    shares: list[int]  # concurrency of every client process; this one runs shares[index]
    targets: list[str]  # base URLs, used round-robin per request (one Envoy, or the replicas)
    model: str
    workload: dict[str, Any]  # workloads.to_dict
    seed: int
    result_path: str
    max_requests: int | None = None  # in all clients together
    duration: float | None = None  # stop starting requests after this many seconds
    warmup: int = 0  # requests before `ready`, not measured
    ramp_up: float = 0.0  # seconds over which all clients' workers start, evenly (0: all at once)
    request_rate: float | None = None  # open loop: sessions per second over all clients (Poisson)
    request_timeout: float = 600.0
    # A ladder: one window per stage, each released by its own `go` and written to its own
    # result file; empty: a single window as max_requests, duration and request_rate say.
    stages: list[Stage] = field(default_factory=list)
    router: str = "round-robin"  # over `targets`; or "oracle" (`loadtest.oracle`: targets are replicas)
    slo_ttft_p90_ms: float | None = None  # the SLO the oracle routes by

    @property
    def concurrency(self) -> int:
        return self.shares[self.index]

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ClientJob:
        return cls(**doc | {"stages": [Stage(**stage) for stage in doc.get("stages", ())]})

    def window_path(self, number: int) -> Path:
        """Where window `number`'s result goes."""
        return Path(self.result_path if not self.stages else f"{self.result_path}.{number}")


@dataclass(slots=True)
class ClientResult:
    """Raw measurements of one client over its measured window (monotonic clock, seconds)."""

    started: float = 0.0
    ended: float = 0.0
    completed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)  # by kind: http_503, timeout, ...
    replicas: Counter[str] = field(default_factory=Counter)  # requests per x-sim-replica
    cpu_seconds: float = 0.0

    @property
    def finished(self) -> int:
        return self.completed + sum(self.errors.values())

    def dump(self, path: Path) -> None:
        # Not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs, counting the pairs.
        path.write_bytes(orjson.dumps({f.name: getattr(self, f.name) for f in fields(self)}))

    @classmethod
    def load(cls, path: Path) -> ClientResult:
        doc = orjson.loads(path.read_bytes())
        return cls(**doc | {"errors": Counter(doc["errors"]), "replicas": Counter(doc["replicas"])})


@dataclass(slots=True)
class Outcome:
    """One request as the client saw it."""

    error: str | None = None
    replica: str | None = None
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    text: str = ""


def request_body(model: str, session: Session, turn: int, history: list[dict[str, str]]) -> dict[str, Any]:
    """The OpenAI body of one turn; `history` holds the chat messages already exchanged."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": session.max_tokens[turn],
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if session.chat:
        body["messages"] = [*history, {"role": "user", "content": session.prompts[turn]}]
    else:
        body["prompt"] = session.prompts[turn]
    return body


class StreamError(Exception):
    """The server reported an error inside a stream that had started well (vLLM sends `{"error":...}`)."""


async def stream_request(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Outcome:
    """POST one streaming request and time its chunks; failures become `Outcome.error` kinds."""
    outcome = Outcome()
    chat = "messages" in body
    pieces: list[str] = []
    start = time.perf_counter()
    last = start
    headers_seen = done = False
    try:
        async with http.post(url, data=orjson.dumps(body), headers={"content-type": "application/json"}) as r:
            headers_seen = True
            outcome.replica = r.headers.get(REPLICA_HEADER)
            if r.status != 200:
                await r.read()
                outcome.error = f"http_{r.status}"
                return outcome
            buffer = b""
            async for data in r.content.iter_any():
                now = time.perf_counter()
                buffer += data
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    payload = event.removeprefix(b"data: ")
                    if payload == b"[DONE]":
                        done = True
                        continue
                    chunk = orjson.loads(payload)
                    if "error" in chunk:
                        raise StreamError
                    if usage := chunk.get("usage"):
                        outcome.prompt_tokens = usage.get("prompt_tokens", 0)
                        outcome.output_tokens = usage.get("completion_tokens", 0)
                    if not chunk["choices"]:
                        continue
                    choice = chunk["choices"][0]
                    text = choice.get("delta", {}).get("content") if chat else choice.get("text")
                    if not text:
                        continue
                    pieces.append(text)
                    if outcome.ttft is None:
                        outcome.ttft = now - start
                    else:
                        outcome.itl.append(now - last)
                    last = now
    except TimeoutError:
        outcome.error = "timeout"
    except aiohttp.ClientPayloadError:
        outcome.error = "truncated"
    except StreamError:
        outcome.error = "stream_error"
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):  # not OpenAI-shaped SSE
        outcome.error = "malformed"
    except aiohttp.ClientError:
        outcome.error = "truncated" if headers_seen else "connection"
    else:
        if not done or outcome.ttft is None:
            outcome.error = "truncated"
    outcome.e2e = time.perf_counter() - start
    outcome.text = "".join(pieces)
    outcome.output_tokens = outcome.output_tokens or len(pieces)
    return outcome


class Client:
    """Runs `job.concurrency` closed-loop workers over this client's share of the sessions."""

    def __init__(self, job: ClientJob, http: aiohttp.ClientSession) -> None:
        self.job = job
        self.http = http
        self.result = ClientResult()
        self._targets = itertools.islice(itertools.cycle(job.targets), job.index, None)
        self._paths = {True: "/v1/chat/completions", False: "/v1/completions"}
        self._deadline = float("inf")
        self._oracle = (
            OracleRouter(http, job.targets, job.slo_ttft_p90_ms) if job.router == "oracle" else None
        )
        self._workload = from_dict(job.workload)
        self._deal = Deal(self._workload, job.seed, job.shares, job.index)

    async def _url(self, body: dict[str, Any], chat: bool) -> str:
        """The next target round-robin, or the oracle's pick (round-robin if its probes fail)."""
        target = next(self._targets)
        if self._oracle is not None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, KeyError):
                target = await self._oracle.pick(body)
        return target + self._paths[chat]

    async def warm_up(self) -> None:
        """Open connections and exercise every hop with short unrelated prompts, then send this
        client's share of the workload's own warm-up (e.g. every shared prefix once); not measured."""
        rng = random.Random(f"warmup-{self.job.seed}-{self.job.index}")
        probes = [
            Session((random_text(rng, WARMUP_PROMPT_TOKENS),), (WARMUP_OUTPUT_TOKENS,), chat=False)
            for _ in range(self.job.warmup)
        ]
        outcomes: list[Outcome] = []
        await asyncio.gather(*(self._converse(probe, outcomes.append) for probe in probes))
        primes = assigned_warmup(self._workload, self.job.seed, self.job.shares, self.job.index)
        await self._drive(iter(primes), outcomes.append, ramp_up=0.0)
        failed = Counter(o.error for o in outcomes if o.error)
        if failed:
            raise RuntimeError(f"warm-up failed: {dict(failed)}")

    async def run(self, stage: Stage | None = None, number: int = 0) -> ClientResult:
        """One measured window: the job's own, or stage `number` of its ladder; each window takes
        the sessions after the previous window's."""
        job = self.job
        self.result = ClientResult()
        max_requests, duration = (
            (job.max_requests, job.duration) if stage is None else (stage.max_requests, stage.duration)
        )
        sessions = self._deal.take(max_requests)
        cpu = time.process_time()
        self.result.started = time.monotonic()
        self._deadline = float("inf") if duration is None else self.result.started + duration
        rate = job.request_rate if stage is None else stage.rate
        if isinstance(self._workload, TraceReplay):
            factor = 1.0 if rate is None else self._workload.mean_rate / rate
            await self._arrive((session, (session.at or 0.0) * factor) for session in sessions)
        elif rate is not None and duration is not None:
            await self._arrive(self._poisson_window(sessions, rate * duration, duration, number))
        elif rate is not None:
            await self._arrive(self._poisson(sessions, rate * job.concurrency / sum(job.shares), number))
        else:
            await self._drive(sessions, self._record, job.ramp_up)
        self.result.ended = time.monotonic()
        self.result.cpu_seconds = time.process_time() - cpu
        return self.result

    async def _drive(
        self, sessions: Iterator[Session], record: Callable[[Outcome], None], ramp_up: float
    ) -> None:
        """`job.concurrency` closed-loop workers sharing `sessions`, started evenly over `ramp_up` s."""
        job = self.job
        first = sum(job.shares[: job.index])  # this client's first worker, counted over all clients
        step = ramp_up / sum(job.shares)

        async def worker(delay: float) -> None:
            await asyncio.sleep(delay)  # a ramp-up: the schedule is the point, not a synchronisation
            for session in sessions:  # each worker takes the next session
                if not await self._converse(session, record):
                    return

        await asyncio.gather(*(worker((first + i) * step) for i in range(job.concurrency)))

    def _poisson(
        self, sessions: Iterator[Session], rate: float, number: int
    ) -> Iterator[tuple[Session, float]]:
        """Each session with its arrival time: a seeded Poisson process of `rate` per second
        (seeded per client and window)."""
        rng = random.Random(f"arrivals-{self.job.seed}-{self.job.index}" + (f"-{number}" if number else ""))
        at = 0.0
        for session in sessions:
            yield session, at
            at += rng.expovariate(rate)

    def _poisson_window(
        self, sessions: Iterator[Session], count: float, duration: float, number: int
    ) -> Iterator[tuple[Session, float]]:
        """A Poisson process over a timed window, conditioned on its count: `count` arrivals in
        all clients (this client its share), at times drawn uniformly over the window and sorted,
        which is how a Poisson process's arrivals fall once their number is known. So a stage
        offers the rate it is named for and keeps Poisson's bursts: unconditioned, a 10 s stage's
        count varies by +-10% (a 12/s stage drew 141 requests), enough to fail a stage every mode
        passes one rate higher."""
        job = self.job
        before, total = sum(job.shares[: job.index]), sum(job.shares)
        mine = round(count * (before + job.concurrency) / total) - round(count * before / total)
        rng = random.Random(f"window-{job.seed}-{job.index}-{number}")
        return zip(sessions, sorted(rng.uniform(0.0, duration) for _ in range(mine)), strict=False)

    async def _arrive(self, arrivals: Iterator[tuple[Session, float]]) -> None:
        """Open loop, as `vllm bench serve --request-rate R --max-concurrency C`: each session
        starts at its arrival time (seconds after the first one's) whether or not earlier ones are
        done, at most `job.concurrency` at once (a session waiting for a slot starts its clock when
        it gets one, as vLLM's does). Making a session's prompt takes time too: a session made
        late starts at once, and the ones after it keep to the schedule."""
        slots = asyncio.Semaphore(self.job.concurrency)
        origin: float | None = None  # when arrival time 0 is: once the first session is made

        async def start(session: Session) -> None:
            async with slots:
                await self._converse(session, self._record)

        async with asyncio.TaskGroup() as started:
            for session, at in arrivals:
                origin = time.monotonic() - at if origin is None else origin
                if (delay := origin + at - time.monotonic()) > 0:
                    await asyncio.sleep(delay)  # the arrival schedule itself
                if time.monotonic() >= self._deadline:
                    break
                started.create_task(start(session))

    async def _converse(self, session: Session, record: Callable[[Outcome], None]) -> bool:
        """Send a session's turns in order; False once the deadline has passed."""
        history = [{"role": "system", "content": session.system}] if session.system else []
        for turn in range(len(session)):
            if time.monotonic() >= self._deadline:
                return False
            body = request_body(self.job.model, session, turn, history)
            outcome = await stream_request(self.http, await self._url(body, session.chat), body)
            record(outcome)
            if outcome.error:
                break  # a conversation cannot go on without its answer
            if session.chat:
                history = [*body["messages"], {"role": "assistant", "content": outcome.text}]
        return True

    def _record(self, outcome: Outcome) -> None:
        result = self.result
        if outcome.replica is not None:
            result.replicas[outcome.replica] += 1
        if outcome.error:
            result.errors[outcome.error] += 1
            return
        assert outcome.ttft is not None
        result.completed += 1
        result.input_tokens += outcome.prompt_tokens
        result.output_tokens += outcome.output_tokens
        result.ttft.append(outcome.ttft)
        result.e2e.append(outcome.e2e)
        result.itl += outcome.itl
        if outcome.output_tokens > 1:
            result.tpot.append((outcome.e2e - outcome.ttft) / (outcome.output_tokens - 1))


@dataclass(frozen=True, slots=True)
class Record:
    """One request of a `SteadyLoad`, times in seconds since the load's `t0`."""

    started: float
    ended: float
    group: int  # which shared prefix (system prompt) it carried, numbered as first seen
    error: str | None
    replica: str | None  # the x-sim-replica header (e.g. the upstream address Envoy reports)


class SteadyLoad:
    """`concurrency` closed-loop workers sending a shared-prefix workload's chat requests to one
    URL until `stop` is set, each request recorded (for runs that inject faults or watch memory,
    where what matters is what happened when, not `vllm bench serve` statistics)."""

    def __init__(
        self, workload: SharedPrefix, url: str, model: str, *, concurrency: int, seed: int = 0,
        t0: float | None = None, request_timeout: float = 60.0,
    ) -> None:  # fmt: skip
        self.url, self.model = url + "/v1/chat/completions", model
        self.concurrency, self.request_timeout = concurrency, request_timeout
        self.t0 = time.monotonic() if t0 is None else t0
        # Groups are drawn at random, not cycled: a cycle in step with round-robin fakes affinity.
        self._sessions = workload.sessions(random.Random(seed))
        self._groups: dict[str | None, int] = {}
        self.records: list[Record] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        async with self._session() as http:
            await asyncio.gather(*(self._worker(http) for _ in range(self.concurrency)))

    async def burst(self, requests: int) -> None:
        """`requests` more requests sent at the same instant, recorded like the rest."""
        async with self._session() as http:
            await asyncio.gather(*(self._one(http) for _ in range(requests)))

    def _session(self) -> aiohttp.ClientSession:
        timeout = aiohttp.ClientTimeout(total=self.request_timeout, sock_connect=10)
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout)

    async def _worker(self, http: aiohttp.ClientSession) -> None:
        while not self.stop.is_set():
            await self._one(http)

    async def _one(self, http: aiohttp.ClientSession) -> None:
        session = next(self._sessions)
        group = self._groups.setdefault(session.system, len(self._groups))
        history = [{"role": "system", "content": session.system}] if session.system else []
        started = time.monotonic() - self.t0
        outcome = await stream_request(http, self.url, request_body(self.model, session, 0, history))
        ended = time.monotonic() - self.t0
        self.records.append(Record(started, ended, group, outcome.error, outcome.replica))


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(message).decode() + "\n")
    sys.stdout.flush()


async def report_progress(client: Client) -> None:
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL)
        emit({"done": client.result.finished, "errors": sum(client.result.errors.values())})


async def measure(job: ClientJob) -> None:
    """Warm up, report ready, then run each window once the runner says go and write its result
    (stop early if the runner goes away instead)."""
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=job.request_timeout, sock_connect=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        client = Client(job, http)
        await client.warm_up()
        emit({"ready": True})
        for number, stage in enumerate(job.stages or [None]):
            if (await asyncio.to_thread(sys.stdin.readline)).strip() != "go":
                return
            progress = asyncio.create_task(report_progress(client))
            try:
                result = await client.run(stage, number)
            finally:
                progress.cancel()
            await asyncio.to_thread(result.dump, job.window_path(number))
            emit({"done": result.finished, "errors": sum(result.errors.values()), "finished": True})


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """None: the job comes as one JSON line on stdin."""


def main(args: argparse.Namespace) -> None:
    job = ClientJob.from_json(orjson.loads(sys.stdin.readline()))
    try:
        import uvloop
    except ImportError:  # not built for every platform
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(measure(job))
    except Exception as exc:
        emit({"error": f"{type(exc).__name__}: {exc}"})
        raise SystemExit(1) from exc
