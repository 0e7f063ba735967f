"""Run the simulator in a child process (`python -m loadtest.sim`) for end-to-end tests and demos.

A separate process keeps the replicas' CPU use apart from the picker's and the load generator's,
as real replicas would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from typing import Self

from loadtest.sim.cli import parse_args

_READY = re.compile(r"replica (\S+) ready on (\S+) profile=(\S+)")


class SimProcess:
    """`async with SimProcess("--replicas", "4", "--port", "0") as sim:` then use `sim.addresses`.

    Takes the CLI's arguments; waits for every replica's ready line.
    """

    def __init__(self, *args: str, ready_timeout: float = 30.0, stop_timeout: float = 5.0) -> None:
        self.args = args
        try:
            self.replicas = parse_args(args).replicas
        except SystemExit:  # argparse has printed why
            raise ValueError(f"invalid simulator arguments {args}") from None
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.addresses: list[str] = []
        self.profiles: list[str] = []
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> list[str]:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadtest.sim", *self.args, stdout=asyncio.subprocess.PIPE
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
        match = _READY.fullmatch(line.strip())
        if match:
            self.addresses.append(match[2])
            self.profiles.append(match[3])

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if the process has not exited within `stop_timeout`."""
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), self.stop_timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
