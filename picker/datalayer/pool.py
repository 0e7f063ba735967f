"""The set of endpoints the picker may route to, kept in step with a discovery source."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from picker.datalayer.endpoint import Endpoint


class EndpointPool:
    """Endpoints by address. Discovery replaces the address set; state of kept endpoints survives."""

    def __init__(self) -> None:
        self._by_address: dict[str, Endpoint] = {}
        self._snapshot: tuple[Endpoint, ...] = ()
        self._removed_listeners: list[Callable[[Endpoint], None]] = []
        self.synced = asyncio.Event()  # set once discovery has published its first address set

    def set_addresses(self, addresses: Iterable[str]) -> None:
        wanted = dict.fromkeys(addresses)
        for address in list(self._by_address):
            if address not in wanted:
                gone = self._by_address.pop(address)
                for listener in self._removed_listeners:
                    listener(gone)
        for address in wanted:
            if address not in self._by_address:
                self._by_address[address] = Endpoint(address)
        self._snapshot = tuple(self._by_address.values())
        self.synced.set()

    def on_removed(self, listener: Callable[[Endpoint], None]) -> None:
        """Call `listener` with each endpoint that leaves the pool (e.g. to drop its prefix entries)."""
        self._removed_listeners.append(listener)

    def get(self, address: str) -> Endpoint | None:
        return self._by_address.get(address)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._snapshot

    def __len__(self) -> int:
        return len(self._snapshot)
