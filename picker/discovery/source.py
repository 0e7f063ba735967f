"""The contract every discovery source fulfils."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

Publish = Callable[[Iterable[str]], None]


class EndpointSource(Protocol):
    """Publishes the complete current set of `ip:port` addresses each time it changes.

    The first publish marks discovery as synced (readiness waits for it). `run` lasts until
    cancelled and handles its own retries; it must never publish a partial set.
    """

    async def run(self, publish: Publish) -> None: ...
