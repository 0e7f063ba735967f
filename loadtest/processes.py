"""The processes tests and load tests start: ports, readiness, stopping, the picker, the simulator.

Everything here drives real subprocesses (`python -m picker serve`, `envoy`, `python -m vllm_sim`),
so readiness is polled with a deadline or read from the child's output: there is no in-process
event to wait on. A separate simulator process keeps the replicas' CPU use apart from the
picker's and the load generator's, as real replicas would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import random
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vllm_sim.cli import parse_args as parse_sim_args

_T = TypeVar("_T")

READY_TIMEOUT = 30.0
PORTS_FROM = 20000  # listening ports of the processes a test or run starts


def free_port() -> int:
    """A port free right now (for processes that take a port rather than report one).

    Drawn below the kernel's ephemeral range: a port the kernel hands out itself can be taken, before
    the process binds it, as the source port of one of the run's many loopback connections.
    """
    low = _ephemeral_low()
    while True:
        port = random.randrange(PORTS_FROM, low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def free_ports(count: int) -> int:
    """The first of `count` consecutive ports free right now (for `--kv-events-port`, whose
    replica i takes port + i)."""
    while True:
        first = free_port()
        with contextlib.ExitStack() as held:
            try:
                for port in range(first + 1, first + count):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return first


@functools.cache
def _ephemeral_low() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    return max(low, PORTS_FROM + 1000)


async def poll_until(
    probe: Callable[[], Awaitable[_T | None]], *, within: float, what: str, interval: float = 0.05
) -> _T:
    """Await `probe()` until it returns something other than None (for external processes)."""
    try:
        async with asyncio.timeout(within):
            while True:
                result = await probe()
                if result is not None:
                    return result
                await asyncio.sleep(interval)
    except TimeoutError:
        raise TimeoutError(f"{what}: not ready after {within:g}s") from None


async def stop_process(process: asyncio.subprocess.Process, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if the process has not exited after `grace` seconds."""
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=grace)
        except TimeoutError:
            process.kill()
            await process.wait()


def log_tail(path: Path, lines: int = 30) -> str:
    """The end of a process log, for error messages."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass(frozen=True, slots=True)
class PickerProcess:
    process: asyncio.subprocess.Process
    grpc_port: int
    health_port: int
    metrics_port: int
    log_path: Path

    @property
    def address(self) -> str:
        """The ext_proc address, as `Envoy.start(..., picker=[p.address])` takes it."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int:
        return self.process.pid


PORT_ATTEMPTS = 3  # picker starts tried when a chosen free port was taken meanwhile


@contextlib.asynccontextmanager
async def start_picker(
    endpoints: Sequence[str], log_path: Path, args: Sequence[str] = (), *, secure: bool = False
) -> AsyncIterator[PickerProcess]:
    """`python -m picker serve` on free loopback ports; yields once `readiness` is SERVING.

    Logs at warning level unless `args` say otherwise: per-request lines would cost the CPU a run
    measures. Stopped with SIGTERM (its graceful shutdown) on exit. A free port can be taken by
    another process before the picker binds it: that start is retried on fresh ports.
    """
    for attempt in range(PORT_ATTEMPTS):
        ports = free_port(), free_port(), free_port()
        argv = [
            *("-m", "picker", "serve", f"--secure-serving={str(secure).lower()}", "--grace-period=1"),
            *("--bind-address", "127.0.0.1", "--grpc-port", str(ports[0])),
            *("--grpc-health-port", str(ports[1]), "--metrics-port", str(ports[2])),
            *("--endpoints", ",".join(endpoints), "--log-level", "warning", *args),
        ]
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable, *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log
            )
        try:
            await wait_picker_ready(process, ports[1], log_path)
            break
        except BaseException as exc:
            await stop_process(process)
            if "Address already in use" not in str(exc) or attempt == PORT_ATTEMPTS - 1:
                raise
    try:
        yield PickerProcess(process, *ports, log_path)
    finally:
        await stop_process(process)


async def wait_picker_ready(process: asyncio.subprocess.Process, health_port: int, log_path: Path) -> None:
    """Until the gRPC health service says `readiness` SERVING (the picker has scraped the pool)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="readiness")

        async def ready() -> bool | None:
            if process.returncode is not None:
                raise RuntimeError(f"picker exited with {process.returncode}:\n{log_tail(log_path)}")
            try:
                answer = await health.Check(request, timeout=1.0)
            except grpc.aio.AioRpcError:
                return None
            return True if answer.status == health_pb2.HealthCheckResponse.SERVING else None

        await poll_until(ready, within=READY_TIMEOUT, what="picker readiness")


class RestartablePicker:
    """The picker on fixed ports, so Envoy's ext_proc cluster finds it again after a restart."""

    def __init__(self, endpoints: Sequence[str], logs: Path, stack: contextlib.AsyncExitStack) -> None:
        self.grpc_port, self.metrics_port = free_port(), free_port()
        self._endpoints, self._logs, self._stack = endpoints, logs, stack
        self._args = ("--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port))
        self._starts = itertools.count()
        self.process: PickerProcess | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    async def start(self) -> None:
        log = self._logs / f"picker-{next(self._starts)}.log"
        # Later occurrences of --grpc-port / --metrics-port win over start_picker's free ports.
        self.process = await self._stack.enter_async_context(start_picker(self._endpoints, log, self._args))

    async def stop(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.process.send_signal(sig)
        await self.process.process.wait()


_SIM_READY = re.compile(r"replica (\S+) ready on (\S+) profile=(\S+)")


class SimProcess:
    """`async with SimProcess("--replicas", "4", "--port", "0") as sim:` then use `sim.addresses`.

    Takes `python -m vllm_sim`'s arguments and waits for every replica's ready line. With a fixed
    `--port` it can be killed, frozen (`signal`) and started again on the same port.
    """

    def __init__(self, *args: str, ready_timeout: float = 30.0, stop_timeout: float = 5.0) -> None:
        self.args = args
        try:
            self.replicas = parse_sim_args(args).replicas
        except SystemExit:  # argparse has printed why
            raise ValueError(f"invalid simulator arguments {args}") from None
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.addresses: list[str] = []
        self.profiles: list[str] = []
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> list[str]:
        self.addresses, self.profiles = [], []
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vllm_sim", *self.args, stdout=asyncio.subprocess.PIPE
        )
        try:
            async with asyncio.timeout(self.ready_timeout):
                while len(self.addresses) < self.replicas:
                    await self._read_ready_line()
        except BaseException:
            await self.stop()
            raise
        return self.addresses

    async def _read_ready_line(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        line = (await self.process.stdout.readline()).decode()
        if not line:
            code = await self.process.wait()
            raise RuntimeError(f"simulator exited with {code} before all replicas were ready")
        match = _SIM_READY.fullmatch(line.strip())
        if match:
            self.addresses.append(match[2])
            self.profiles.append(match[3])

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        os.kill(self.process.pid, sig)

    async def kill(self) -> None:
        """SIGKILL, like a crash: connections reset, the port refuses until `start` again."""
        assert self.process is not None
        self.process.kill()
        await self.process.wait()

    async def stop(self) -> None:
        """SIGTERM (after SIGCONT: a frozen process cannot act on it), SIGKILL after `stop_timeout`."""
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGCONT)
        await stop_process(process, self.stop_timeout)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
