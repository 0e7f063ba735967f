"""Run each mode on its own fresh stack, with several client processes started together.

Per mode: start the stack, start the clients (each warms up, then reports ready), snapshot the
replicas' counters and every process's CPU, release all clients at once, follow their progress,
snapshot again, tear down. Only the window between the snapshots is measured.

A request-rate ladder (capacity at an SLO) measures one window per stage on the same stack, rates
ascending, after an unmeasured warm-up stage at the first rate: that is how a capacity test of a
serving pool goes (llm-d's and prequal's ladders run against one deployment), the caches stay as
the mode's routing left them, and a fresh stack per stage would measure cold caches at every rate.
Each stage drains before the next starts, so a stage's backlog is charged to the stage that made it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
from rich.progress import Progress, TaskID

from loadtest.client import ClientJob, ClientResult, Stage
from loadtest.observe import HostCpu, counter_delta, process_cpu, scrape_counters
from loadtest.processes import log_tail, stop_process
from loadtest.stack import PoolSpec, Stack, start_stack
from loadtest.stats import Measurement, ModeResult, meets_slo, summarize
from loadtest.workloads import Workload, to_dict

STREAMS_PER_CLIENT = 64  # concurrent streams one client process handles without saturating
MAX_WARMUP = 16
LADDER_CONCURRENCY = 1024  # a ladder's default cap on open streams: high, so the replicas queue
LADDER_STAGE_SECONDS = 20.0  # a ladder stage's length when neither requests nor duration is given

CLIENT_EXIT_GRACE = 10.0  # seconds a client has to exit after its last result


@dataclass(frozen=True, slots=True)
class RunPlan:
    workload_name: str  # what the user asked for (e.g. heterogeneous = uniform on a mixed pool)
    workload: Workload
    modes: tuple[str, ...]
    concurrencies: tuple[int, ...]
    pool: PoolSpec
    out: Path
    requests: int | None = None  # per mode; None: see requests_at, unless `duration` is set
    duration: float | None = None
    clients: int | None = None  # client processes; None: one per STREAMS_PER_CLIENT, <= cores
    seed: int = 0
    request_timeout: float = 600.0
    picker_args: tuple[str, ...] = ()
    repeats: int = 1  # measure each mode this many times, interleaved, and pool the samples
    ramp_up: float = 0.0  # seconds over which the closed-loop workers start
    request_rate: float | None = None  # open loop: Poisson arrivals per second, concurrency caps them
    ladder: tuple[float, ...] = ()  # rates (/s) of a capacity ladder, ascending; each a stage
    warmup_stage: float = 10.0  # seconds at the ladder's first rate before measuring (0: none)
    slo_ttft_p90_ms: float | None = None  # the SLO capacity is measured at (and the oracle routes by)
    max_misses: int = 2  # stop a mode's ladder after this many stages in a row miss the SLO

    def describe(self) -> dict[str, Any]:
        """The settings a report states (JSON-able)."""
        pool = self.pool
        return {
            "workload": to_dict(self.workload),
            "modes": list(self.modes),
            "concurrency": list(self.concurrencies),
            **(
                {
                    "each stage": f"{self.requests} requests"
                    if self.requests
                    else f"{self.stages()[-1].duration} s"
                }
                if self.ladder
                else {
                    "requests per mode": [self.requests_at(c) for c in self.concurrencies],
                    "duration per mode (s)": self.duration,
                }
            ),
            "replicas": pool.replicas,
            "profiles": pool.replica_profiles,
            "KV tokens per replica": pool.kv_tokens,
            "speed": pool.speed,
            "client processes": self.clients or "auto",
            "repeats": self.repeats,
            "ramp-up (s)": self.ramp_up,
            "request rate (/s)": list(self.ladder) or self.request_rate or "closed loop",
            **(self._ladder_settings() if self.ladder else {}),
            "seed": self.seed,
            "picker args": list(self.picker_args),
        }

    def _ladder_settings(self) -> dict[str, Any]:
        return {
            "warm-up stage (s)": self.warmup_stage,
            "SLO TTFT p90 (ms)": self.slo_ttft_p90_ms,
            "stop after misses in a row": self.max_misses,
        }

    def stages(self) -> list[Stage]:
        """The ladder's windows: the warm-up stage (if any), then one per rate."""
        bounded = self.requests is not None or self.duration is not None
        duration = self.duration if bounded else LADDER_STAGE_SECONDS
        first = self.ladder[0]
        if self.requests is None:
            warmup = Stage(first, duration=self.warmup_stage)
        else:  # every window a cut of the global stream, so the clients agree where each ends
            warmup = Stage(first, max_requests=math.ceil(first * self.warmup_stage))
        warmups = [warmup] if self.warmup_stage > 0 else []
        return warmups + [Stage(rate, self.requests, duration) for rate in self.ladder]

    def requests_at(self, concurrency: int) -> int | None:
        """InferenceMAX's num_prompts = 10 x concurrency, or more if the workload needs more."""
        if self.requests is None and self.duration is None:
            return max(10 * concurrency, self.workload.min_requests)
        return self.requests

    def shares(self, concurrency: int) -> list[int]:
        """Concurrency of each client process (as even as possible)."""
        count = self.clients or min(os.cpu_count() or 1, math.ceil(concurrency / STREAMS_PER_CLIENT))
        count = max(1, min(count, concurrency))
        return [concurrency // count + (i < concurrency % count) for i in range(count)]


async def run_plan(plan: RunPlan, progress: Progress) -> AsyncIterator[tuple[int, str, ModeResult]]:
    """Every (concurrency, mode), in order; with repeats the modes take turns (A B C A B C), so a
    slow drift in what else the machine is doing spreads over all of them."""
    for concurrency in plan.concurrencies:
        measured: dict[str, list[Measurement]] = {mode: [] for mode in plan.modes}
        for repeat in range(plan.repeats):
            for mode in plan.modes:
                label = f"{mode} c={concurrency}" + (f" #{repeat + 1}" if plan.repeats > 1 else "")
                measured[mode].append(await measure_mode(plan, mode, concurrency, progress, label))
        for mode, measurements in measured.items():
            yield concurrency, mode, summarize(measurements)


async def measure_mode(
    plan: RunPlan, mode: str, concurrency: int, progress: Progress, label: str
) -> Measurement:
    """One run of one mode on a freshly started stack."""
    logs = plan.out / "logs" / label.replace(" c=", "-c").replace(" #", "-")
    async with _running(plan, mode, logs, concurrency) as (stack, jobs, clients):
        total = plan.duration or plan.requests_at(concurrency) or 0
        return await _window(
            stack, clients, jobs, 0, progress.add_task(label, total=total), progress, plan.duration
        )


async def run_ladder(plan: RunPlan, progress: Progress) -> AsyncIterator[tuple[float, str, ModeResult]]:
    """Every (rate, mode) of a capacity ladder, mode by mode, each on one warm stack (see the
    module's docstring); a mode's ladder stops after `max_misses` stages in a row miss the SLO,
    since higher rates only queue more."""
    concurrency = max(plan.concurrencies)
    stages = plan.stages()
    warmups = len(stages) - len(plan.ladder)
    for mode in plan.modes:
        logs = plan.out / "logs" / mode
        async with _running(plan, mode, logs, concurrency, stages) as (stack, jobs, clients):
            misses = 0
            for number, stage in enumerate(stages):
                label = f"{mode} {stage.rate:g}/s" + (" warm-up" if number < warmups else "")
                task = progress.add_task(label, total=stage.duration or stage.max_requests or 0)
                measured = await _window(stack, clients, jobs, number, task, progress, stage.duration)
                if number < warmups:
                    continue
                result = summarize([measured])
                yield stage.rate, mode, result
                misses = 0 if meets_slo(result, plan.slo_ttft_p90_ms) else misses + 1
                if misses >= plan.max_misses:
                    break


@contextlib.asynccontextmanager
async def _running(
    plan: RunPlan, mode: str, logs: Path, concurrency: int, stages: Sequence[Stage] = ()
) -> AsyncIterator[tuple[Stack, list[ClientJob], list[_ClientProcess]]]:
    """`mode`'s stack, freshly started, with its load clients warmed up and waiting for "go"."""
    scratch = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="loadtest-"))
    try:
        async with start_stack(mode, plan.pool, logs, plan.picker_args) as stack:
            jobs = _jobs(plan, stack, concurrency, scratch, stages)
            async with _clients(jobs, logs) as clients:
                yield stack, jobs, clients
    finally:
        await asyncio.to_thread(shutil.rmtree, scratch, ignore_errors=True)


async def _window(
    stack: Stack, clients: list[_ClientProcess], jobs: Sequence[ClientJob], number: int, task: TaskID,
    progress: Progress, duration: float | None,
) -> Measurement:  # fmt: skip
    """Measure window `number` of the running clients: snapshot, release, follow, snapshot."""
    pids = stack.processes | {"runner": os.getpid()}
    messages = await _extproc_messages(stack)
    counters, cpu, host = await scrape_counters(stack.replicas), process_cpu(pids), HostCpu.now()
    last = number == len(jobs[0].stages or [None]) - 1
    await _release(clients, _progress_updater(progress, task, duration), last)
    after = await scrape_counters(stack.replicas)
    cpu = {role: seconds - cpu[role] for role, seconds in process_cpu(pids).items()}
    host_busy = HostCpu.now().busy_share_since(host)
    messages = {k: v - messages.get(k, 0.0) for k, v in (await _extproc_messages(stack)).items()}
    progress.update(task, completed=progress.tasks[task].total or 0)
    results = [await asyncio.to_thread(ClientResult.load, job.window_path(number)) for job in jobs]
    deltas = counter_delta(counters, after)
    return Measurement(
        clients=results,
        replica_counters={name: deltas[address] for name, address in stack.names.items()},
        replica_profiles={name: stack.profiles[address] for name, address in stack.names.items()},
        process_cpu=cpu,
        host_cpu_busy=host_busy,
        extproc_messages=messages,
    )


_EXTPROC = "http.inference.ext_proc."


async def _extproc_messages(stack: Stack) -> dict[str, float]:
    """Envoy's count of ext_proc messages so far, each way (none without a picker)."""
    if stack.envoy is None or "picker" not in stack.processes:
        return {}
    try:
        stats = await stack.envoy.stats("ext_proc")
    except httpx.HTTPError as exc:  # Envoy died: the requests' own results still count
        print(f"warning: Envoy's stats unreadable ({exc!r}); see {stack.envoy.log_path}", file=sys.stderr)
        return {}
    return {way: float(stats[_EXTPROC + f"stream_msgs_{way}"]) for way in ("sent", "received")}


def _jobs(
    plan: RunPlan, stack: Stack, concurrency: int, scratch: Path, stages: Sequence[Stage] = ()
) -> list[ClientJob]:
    shares = plan.shares(concurrency)
    warmup = min(concurrency, MAX_WARMUP)
    return [
        ClientJob(
            index=i,
            shares=shares,
            targets=stack.targets,
            model=stack.model,
            workload=to_dict(plan.workload),
            seed=plan.seed,
            result_path=str(scratch / f"client-{i}.json"),
            max_requests=plan.requests_at(concurrency),
            duration=plan.duration,
            warmup=max(1, warmup * share // concurrency),
            request_timeout=plan.request_timeout,
            ramp_up=plan.ramp_up,
            request_rate=plan.request_rate,
            stages=list(stages),
            router="oracle" if stack.mode == "oracle" else "round-robin",
            slo_ttft_p90_ms=plan.slo_ttft_p90_ms,
        )
        for i, share in enumerate(shares)
    ]


def _progress_updater(progress: Progress, task: TaskID, duration: float | None) -> Callable[[int], None]:
    """Progress in requests finished, or in seconds elapsed for a timed run."""
    if duration is None:
        return lambda done: progress.update(task, completed=done)
    started = time.monotonic()
    return lambda _: progress.update(task, completed=min(duration, time.monotonic() - started))


@dataclass(slots=True)
class _ClientProcess:
    process: asyncio.subprocess.Process
    log: Path
    done: int = 0

    async def message(self) -> dict[str, object]:
        assert self.process.stdout is not None
        line = await self.process.stdout.readline()
        if not line:
            code = await self.process.wait()
            raise RuntimeError(f"load client exited with {code}:\n{log_tail(self.log)}")
        message: dict[str, object] = orjson.loads(line)
        if "error" in message:
            raise RuntimeError(f"load client failed: {message['error']}\n{log_tail(self.log)}")
        return message


@contextlib.asynccontextmanager
async def _clients(jobs: Sequence[ClientJob], logs: Path) -> AsyncIterator[list[_ClientProcess]]:
    """Start one `python -m loadtest client` per job and wait until every one has warmed up."""
    clients: list[_ClientProcess] = []
    try:
        for job in jobs:
            log = logs / f"client-{job.index}.log"
            with log.open("ab") as stderr:
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "loadtest", "client",
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr,
                )  # fmt: skip
            clients.append(_ClientProcess(process, log))
            assert process.stdin is not None
            process.stdin.write(orjson.dumps(asdict(job)) + b"\n")
        for client in clients:
            message = await client.message()
            if message.get("ready") is not True:
                raise RuntimeError(f"load client: expected ready, got {message}")
        yield clients
    finally:
        await asyncio.gather(*(_stop(c.process) for c in clients))


async def _stop(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):  # exited on its own meanwhile
        await stop_process(process, grace=5.0)


async def _release(
    clients: Sequence[_ClientProcess], on_progress: Callable[[int], None], last: bool = True
) -> None:
    """Say go to every client, then follow their progress until each has written its result (and,
    after its `last` window, exited)."""
    for client in clients:
        assert client.process.stdin is not None
        client.process.stdin.write(b"go\n")
        client.done = 0
    await asyncio.gather(*(c.process.stdin.drain() for c in clients if c.process.stdin))

    async def follow(client: _ClientProcess) -> None:
        while True:
            message = await client.message()
            client.done = int(message["done"])  # type: ignore[call-overload]
            on_progress(sum(c.done for c in clients))
            if message.get("finished"):
                if last:  # a client that lingers after its result is stopped by `_clients`
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(client.process.wait(), CLIENT_EXIT_GRACE)
                return

    await asyncio.gather(*(follow(c) for c in clients))
