"""Run each mode on its own fresh stack, with several client processes started together.

Per mode: start the stack, start the clients (each warms up, then reports ready), snapshot the
replicas' counters and every process's CPU, release all clients at once, follow their progress,
snapshot again, tear down. Only the window between the snapshots is measured.
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

import orjson
from rich.progress import Progress, TaskID

from loadtest.client import ClientJob, ClientResult
from loadtest.observe import HostCpu, counter_delta, process_cpu, scrape_counters
from loadtest.processes import log_tail, stop_process
from loadtest.stack import PoolSpec, Stack, start_stack
from loadtest.stats import Measurement, ModeResult, summarize
from loadtest.workloads import Workload, to_dict

STREAMS_PER_CLIENT = 64  # concurrent streams one client process handles without saturating
MAX_WARMUP = 16


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

    def describe(self) -> dict[str, Any]:
        """The settings a report states (JSON-able)."""
        pool = self.pool
        return {
            "workload": to_dict(self.workload),
            "modes": list(self.modes),
            "concurrency": list(self.concurrencies),
            "requests per mode": [self.requests_at(c) for c in self.concurrencies],
            "duration per mode (s)": self.duration,
            "replicas": pool.replicas,
            "profiles": pool.replica_profiles,
            "KV tokens per replica": pool.kv_tokens,
            "speed": pool.speed,
            "client processes": self.clients or "auto",
            "repeats": self.repeats,
            "ramp-up (s)": self.ramp_up,
            "request rate (/s)": self.request_rate or "closed loop",
            "seed": self.seed,
            "picker args": list(self.picker_args),
        }

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
    scratch = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="loadtest-"))
    try:
        async with start_stack(mode, plan.pool, logs, plan.picker_args) as stack:
            jobs = _jobs(plan, stack, concurrency, scratch)
            async with _clients(jobs, logs) as clients:
                pids = stack.processes | {"runner": os.getpid()}
                messages = await _extproc_messages(stack)
                counters, cpu, host = await scrape_counters(stack.replicas), process_cpu(pids), HostCpu.now()
                total = plan.duration or plan.requests_at(concurrency) or 0
                task = progress.add_task(label, total=total)
                await _release(clients, _progress_updater(progress, task, plan.duration))
                after = await scrape_counters(stack.replicas)
                cpu = {role: seconds - cpu[role] for role, seconds in process_cpu(pids).items()}
                host_busy = HostCpu.now().busy_share_since(host)
                messages = {k: v - messages[k] for k, v in (await _extproc_messages(stack)).items()}
                progress.update(task, completed=total)
        results = [await asyncio.to_thread(ClientResult.load, Path(job.result_path)) for job in jobs]
    finally:
        await asyncio.to_thread(shutil.rmtree, scratch, ignore_errors=True)
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
    stats = await stack.envoy.stats("ext_proc")
    return {way: float(stats[_EXTPROC + f"stream_msgs_{way}"]) for way in ("sent", "received")}


def _jobs(plan: RunPlan, stack: Stack, concurrency: int, scratch: Path) -> list[ClientJob]:
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


async def _release(clients: Sequence[_ClientProcess], on_progress: Callable[[int], None]) -> None:
    """Say go to every client, then follow their progress until each has written its result."""
    for client in clients:
        assert client.process.stdin is not None
        client.process.stdin.write(b"go\n")
    await asyncio.gather(*(c.process.stdin.drain() for c in clients if c.process.stdin))

    async def follow(client: _ClientProcess) -> None:
        while True:
            message = await client.message()
            client.done = int(message["done"])  # type: ignore[call-overload]
            on_progress(sum(c.done for c in clients))
            if message.get("finished"):
                await client.process.wait()
                return

    await asyncio.gather(*(follow(c) for c in clients))
