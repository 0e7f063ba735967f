"""A fixed pool given on the command line (`--endpoints ip:port,...`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from picker.discovery.source import Publish


def parse_endpoints(spec: str) -> tuple[str, ...]:
    """`"10.0.0.1:8000, 10.0.0.2:8000"` -> addresses; rejects anything that is not host:port."""
    addresses = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"endpoint {item!r} is not host:port")
        addresses.append(item)
    return tuple(dict.fromkeys(addresses))


@dataclass(frozen=True, slots=True)
class StaticSource:
    addresses: tuple[str, ...]

    async def run(self, publish: Publish) -> None:
        publish(self.addresses)
        await asyncio.Event().wait()
