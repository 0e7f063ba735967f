from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import pytest
from kube_fake import FakeKube
from kubernetes_asyncio.client import Configuration

from picker.discovery.kubernetes import KubernetesSource, kubernetes_source


class Published:
    """Records every set a source publishes; tests wait on it instead of sleeping."""

    def __init__(self) -> None:
        self.sets: list[frozenset[str]] = []
        self._event = asyncio.Event()

    def __call__(self, addresses: Iterable[str]) -> None:
        self.sets.append(frozenset(addresses))
        self._event.set()

    async def until(self, *expected: str) -> None:
        """Waits (at most 5 s) until the latest published set is exactly `expected`."""
        async with asyncio.timeout(5):
            while not self.sets or self.sets[-1] != frozenset(expected):
                self._event.clear()
                await self._event.wait()


@pytest.fixture
def published() -> Published:
    return Published()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client honours proxy variables; the fake API server is on 127.0.0.1."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    server = FakeKube()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def start(published: Published) -> AsyncIterator[Callable[[KubernetesSource], None]]:
    """Runs sources in the background, publishing into `published`; re-raises their failures."""
    tasks: list[asyncio.Task[None]] = []
    yield lambda source: tasks.append(asyncio.create_task(source.run(published)))
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
def source(kube: FakeKube) -> Callable[..., KubernetesSource]:
    """Makes sources (kubernetes_source's keywords) talking to the fake, with quick back-off."""

    def make(**kwargs: Any) -> KubernetesSource:
        kwargs = {"pool_name": None, "selector": None, "target_ports": None, **kwargs}
        made = kubernetes_source(
            namespace="default", configuration=Configuration(host=kube.url), **kwargs
        )
        made.backoff_initial, made.backoff_max = 0.01, 0.05
        return made

    return make
