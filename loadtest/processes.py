"""Helpers for the processes tests and load tests start: ports, readiness, stopping, the picker.

Everything here drives real subprocesses (`python -m picker serve`, `envoy`, the simulator), so
readiness is polled with a deadline: there is no in-process event to wait on.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_T = TypeVar("_T")

READY_TIMEOUT = 30.0


def free_port() -> int:
    """A port free right now (for processes that take a port rather than report one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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


@contextlib.asynccontextmanager
async def start_picker(
    endpoints: Sequence[str], log_path: Path, args: Sequence[str] = (), *, secure: bool = False
) -> AsyncIterator[PickerProcess]:
    """`python -m picker serve` on free loopback ports; yields once `readiness` is SERVING.

    Logs at warning level unless `args` say otherwise: per-request lines would cost the CPU a run
    measures. Stopped with SIGTERM (its graceful shutdown) on exit.
    """
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
