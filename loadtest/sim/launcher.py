"""Run the simulator in a child process (`python -m loadtest.sim`) for end-to-end tests and demos.

A separate process keeps the replicas' CPU use apart from the picker's and the load generator's,
as real replicas would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Self

import orjson


class SimProcess:
    """`async with SimProcess("--replicas", "4") as sim:` then route to `sim.addresses`."""

    def __init__(self, *args: str, ready_timeout: float = 30.0, stop_timeout: float = 5.0) -> None:
        self.args = args
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.addresses: list[str] = []
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> list[str]:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadtest.sim", *self.args, stdout=asyncio.subprocess.PIPE
        )
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), self.ready_timeout)
            if not line:
                raise RuntimeError(f"simulator exited with {await self.process.wait()} before listening")
            self.addresses = orjson.loads(line)["addresses"]
        except BaseException:
            await self.stop()
            raise
        return self.addresses

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
