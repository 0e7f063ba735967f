"""Approximate prefix-cache index: which replica was last sent which prompt blocks.

The picker cannot see a replica's KV cache, so it remembers its own decisions: a request's prompt
is cut into fixed-size blocks, each named by a hash chained over everything before it (equal hash
= equal prefix), and every pick records the blocks for the chosen endpoint. One LRU per endpoint,
sized like that replica's KV cache, forgets what the replica would have evicted by now.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import xxhash

from picker.datalayer.endpoint import Endpoint

_xxh64 = xxhash.xxh64_intdigest


def block_hashes(prompt: str, model: str, block_bytes: int, max_blocks: int) -> list[int]:
    """xxh64 chain over the prompt's full blocks (at most `max_blocks`).

    Block i is hashed with block i-1's hash as seed, so a hash names the whole prefix up to it; the
    chain starts from the model name so two models never share entries. Blocks are cut from the
    UTF-8 bytes (one slice + one C call per block): for English text a byte is about a character.
    """
    data = prompt[: max_blocks * block_bytes].encode()
    end = min(len(data) // block_bytes, max_blocks) * block_bytes
    h = _xxh64(model.encode())
    return [h := _xxh64(data[i : i + block_bytes], h) for i in range(0, end, block_bytes)]


class PrefixIndex:
    """Block hash -> endpoints that were given it, plus one LRU of block hashes per endpoint."""

    __slots__ = ("_lru", "_owners")

    def __init__(self) -> None:
        self._owners: dict[int, set[Endpoint]] = {}
        self._lru: dict[Endpoint, OrderedDict[int, None]] = {}

    def __len__(self) -> int:
        """Distinct blocks known for any endpoint."""
        return len(self._owners)

    def held(self, endpoint: Endpoint) -> int:
        """Blocks currently recorded for `endpoint`."""
        lru = self._lru.get(endpoint)
        return len(lru) if lru is not None else 0

    def match(self, hashes: Sequence[int], candidates: Iterable[Endpoint]) -> dict[Endpoint, int]:
        """Length in blocks of each candidate's longest recorded prefix of `hashes` (if > 0).

        One walk over the blocks narrows the set of endpoints still matching and stops when it is
        empty: O(blocks + candidates) set operations instead of a lookup per endpoint per block.
        """
        matched: dict[Endpoint, int] = {}
        owners_of = self._owners.get
        first = owners_of(hashes[0]) if hashes else None
        if first is None:
            return matched
        alive = first.intersection(candidates)
        depth = 1
        if alive:
            for h in hashes[1:]:
                owners = owners_of(h)
                if owners is None:
                    break
                if not alive <= owners:
                    for endpoint in alive - owners:
                        matched[endpoint] = depth
                    alive &= owners
                    if not alive:
                        break
                depth += 1
        for endpoint in alive:
            matched[endpoint] = depth
        return matched

    def record(self, endpoint: Endpoint, hashes: Sequence[int], capacity: int) -> None:
        """Note that `endpoint` now holds `hashes`, keeping at most `capacity` blocks for it.

        The blocks are touched last-to-first so the prefix's first block is the most recent: like
        vLLM, which frees a finished request's blocks tail first, eviction then shortens a prefix
        from its end and what stays is still a usable prefix.
        """
        lru = self._lru.get(endpoint)
        if lru is None:
            lru = self._lru[endpoint] = OrderedDict()
        owners = self._owners
        for h in reversed(hashes):
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                holders = owners.get(h)
                if holders is None:
                    owners[h] = {endpoint}
                else:
                    holders.add(endpoint)
        while len(lru) > capacity:
            self._unown(lru.popitem(last=False)[0], endpoint)

    def drop_endpoint(self, endpoint: Endpoint) -> None:
        """Forget everything recorded for `endpoint` (it left the pool)."""
        for h in self._lru.pop(endpoint, ()):
            self._unown(h, endpoint)

    def clear(self) -> None:
        self._owners.clear()
        self._lru.clear()

    def _unown(self, h: int, endpoint: Endpoint) -> None:
        holders = self._owners[h]
        holders.discard(endpoint)
        if not holders:
            del self._owners[h]
