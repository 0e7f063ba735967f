"""Fault tests reuse the end-to-end fixtures and add replicas that can die and come back.

- `fake_vllm`, `envoy`, `picker_server`, `refused_address`: as in `tests/e2e/conftest.py`.
- `killable_vllm(n, **options)` -> `list[Killable]`: fake vLLM replicas whose `kill()` closes
  the listener and every connection at once (the port then refuses, like a crashed server) and
  whose `revive()` serves again on the same port.
- `config_file(**sections)` -> the path of a picker YAML config written for the test.
- `picker_metrics(picker)` -> the samples on a picker process's Prometheus page.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiohttp import web

from tests.e2e.conftest import (  # noqa: F401  (fixtures and helpers, re-exported for this directory)
    FakeVLLM,
    envoy,
    fake_vllm,
    metric,
    picker_metrics,
    picker_server,
    refused_address,
)

CHAT = "/v1/chat/completions"


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": content}], **extra}


@dataclass
class Killable:
    """A FakeVLLM whose server can be killed and revived on the same port."""

    replica: FakeVLLM
    _runner: web.AppRunner | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return self.replica.address

    async def revive(self) -> None:
        # No grace for handlers in progress: a crash does not wait for them either.
        runner = web.AppRunner(self.replica.app(), access_log=None, shutdown_timeout=0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.replica.port).start()
        self.replica.port = runner.addresses[0][1]
        self._runner = runner

    async def kill(self) -> None:
        """Like a crash: every connection reset at once, then the port refuses."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        assert runner.server is not None
        for connection in runner.server.connections:
            if connection.transport is not None:
                connection.transport.abort()
        await runner.cleanup()


@pytest.fixture
async def killable_vllm() -> AsyncIterator[Callable[..., Awaitable[list[Killable]]]]:
    names = itertools.count()
    started: list[Killable] = []

    async def start(n: int = 1, **options: Any) -> list[Killable]:
        new = [Killable(FakeVLLM(str(next(names)), **options)) for _ in range(n)]
        for replica in new:
            await replica.revive()
        started.extend(new)
        return new

    yield start
    for replica in started:
        await replica.kill()


@pytest.fixture
def config_file(tmp_path: Path) -> Callable[..., str]:
    """Factory: `config_file(metrics={...}, saturation={...})` -> path for `--config-file`."""
    counter = itertools.count()

    def write(**sections: Any) -> str:
        path = tmp_path / f"picker-config-{next(counter)}.yaml"
        path.write_text(yaml.safe_dump(sections))
        return str(path)

    return write


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30.0) as http:
        yield http


