"""Prefix-cache indexes: which replica holds which prompt blocks.

A prompt is cut into fixed-size blocks, each named by a hash chained over everything before it
(equal hash = equal prefix). The approximate index (`PrefixIndex`) cannot see a replica's KV cache,
so it remembers the picker's own decisions: every pick records the request's blocks for the chosen
endpoint, and one LRU per endpoint, sized like that replica's KV cache, forgets what the replica
would have evicted by now. The precise index (`KVBlockIndex`) holds what the engines themselves
report storing and evicting (their KV events), keyed by the engines' own block hashes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import xxhash

from picker.datalayer.endpoint import Endpoint

_xxh64 = xxhash.xxh64_intdigest
# The block -> owners map is split so that no single dict grows huge: a dict rebuilds its whole
# table when it grows or has churned, and at ~300k entries that stalled the event loop ~15 ms.
_SHARDS = 64
_SHARD_MASK = _SHARDS - 1


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


class BlockOwners:
    """Block hash -> the endpoints holding it, as a bitmask over small per-endpoint slots.

    Not a set per block: walking a prompt's blocks is integer arithmetic, and the index holds no
    per-block objects for the garbage collector to scan (a set per block made full collections take
    ~100 ms once the index was warm). Shared by the approximate index (what the picker sent where)
    and the precise one (what the engines report holding).
    """

    __slots__ = ("_endpoints", "_free", "_owners", "_slots")

    def __init__(self) -> None:
        # block hash -> bitmask of endpoint slots, sharded by the hash's low bits
        self._owners: list[dict[int, int]] = [{} for _ in range(_SHARDS)]
        self._slots: dict[Endpoint, int] = {}
        self._endpoints: list[Endpoint] = []  # by slot; a freed slot's entry is stale until reused
        self._free: list[int] = []

    def __len__(self) -> int:
        """Distinct blocks known for any endpoint."""
        return sum(map(len, self._owners))

    def clear(self) -> None:
        for shard in self._owners:
            shard.clear()
        self._slots.clear()
        self._endpoints.clear()
        self._free.clear()

    def _mask(self, h: int) -> int:
        """Slots of the endpoints holding block `h`."""
        return self._owners[h & _SHARD_MASK].get(h, 0)

    def _settle(self, matched: dict[Endpoint, int], bits: int, depth: int) -> None:
        """Record `depth` for every endpoint whose slot bit is set in `bits`."""
        endpoints = self._endpoints
        while bits:
            low = bits & -bits
            matched[endpoints[low.bit_length() - 1]] = depth
            bits ^= low

    def _slot(self, endpoint: Endpoint) -> int:
        slot = self._slots.get(endpoint)
        if slot is None:
            if self._free:
                slot = self._free.pop()
                self._endpoints[slot] = endpoint
            else:
                slot = len(self._endpoints)
                self._endpoints.append(endpoint)
            self._slots[endpoint] = slot
        return slot

    def _release(self, endpoint: Endpoint) -> int | None:
        """Free `endpoint`'s slot; its bit (for the caller to clear from its blocks), or None."""
        slot = self._slots.pop(endpoint, None)
        if slot is None:
            return None
        self._free.append(slot)
        return 1 << slot

    def _own(self, h: int, bit: int) -> None:
        owners = self._owners[h & _SHARD_MASK]
        owners[h] = owners.get(h, 0) | bit

    def _unown(self, h: int, bit: int) -> None:
        owners = self._owners[h & _SHARD_MASK]
        mask = owners[h] & ~bit
        if mask:
            owners[h] = mask
        else:
            del owners[h]


class PrefixIndex(BlockOwners):
    """What the picker gave each endpoint: the blocks' owners plus one LRU of block hashes per
    endpoint, sized like that endpoint's KV cache."""

    __slots__ = ("_lru", "_size")

    def __init__(self) -> None:
        super().__init__()
        # endpoint -> block hash -> the engine blocks it stands for: 1, or for a prompt's last
        # indexed block also the prompt's tail past the index (the engine stores that too)
        self._lru: dict[Endpoint, OrderedDict[int, int]] = {}
        self._size: dict[Endpoint, int] = {}  # the sum of an endpoint's LRU values

    def entries(self) -> int:
        """Blocks recorded over all endpoints (a block two endpoints hold counts twice)."""
        return sum(map(len, list(self._lru.values())))

    def held(self, endpoint: Endpoint) -> int:
        """Blocks currently recorded for `endpoint`."""
        lru = self._lru.get(endpoint)
        return len(lru) if lru is not None else 0

    def tail(self, endpoint: Endpoint, h: int) -> int:
        """The blocks past the index recorded with block `h` for `endpoint` (see `record`)."""
        lru = self._lru.get(endpoint)
        return lru.get(h, 1) - 1 if lru is not None else 0

    def match(self, hashes: Sequence[int]) -> dict[Endpoint, int]:
        """Length in blocks of each endpoint's longest recorded prefix of `hashes` (if > 0).

        Along a prompt the owner masks only ever lose bits (see `record`), so instead of visiting
        every block a binary search finds each block where some endpoint stops matching: about
        log2(blocks) lookups per distinct stopping point, and it stops once no endpoint is left.
        Nothing is looked up per endpoint. Callers read their candidates from the result.
        """
        matched: dict[Endpoint, int] = {}
        mask = self._mask
        end = len(hashes)
        alive = mask(hashes[0]) if end else 0
        depth = 1  # blocks known to be held by every endpoint in `alive`
        while alive:
            low, high = depth, end  # the first block some endpoint of `alive` lacks is in [low, high]
            while low < high:
                mid = (low + high) // 2
                if mask(hashes[mid]) & alive == alive:
                    low = mid + 1
                else:
                    high = mid
            still = alive & mask(hashes[low]) if low < end else 0
            self._settle(matched, alive ^ still, low)
            alive, depth = still, low + 1
        return matched

    def record(self, endpoint: Endpoint, hashes: Sequence[int], capacity: int, tail: int = 0) -> None:
        """Note that `endpoint` now holds `hashes`, keeping at most `capacity` blocks for it.

        `tail`: the prompt's blocks past the indexed ones. The engine holds those too, so they
        count against the capacity, charged to the last indexed block: a 13k-token prompt of
        which the index sees the first 4k fills 13k tokens of cache, and counting 4k kept three
        times too many prompts "cached". The charge is the largest tail that block was recorded
        with (a conversation's next turn extends the last one's tail, not adds to it).

        The blocks are touched last-to-first so the prefix's first block is the most recent: like
        vLLM, which frees a finished request's blocks tail first, eviction then shortens a prefix
        from its end and what stays is still a usable prefix. Since a block's hash also names all
        the blocks before it, every record touching a block touches its predecessors after it, so
        an endpoint always holds a leading run of any prompt's blocks: the invariant `match`
        relies on (only a 64-bit hash collision could break it, and then only a score is off).
        """
        if not hashes:
            return
        lru = self._lru.get(endpoint)
        if lru is None:
            lru = self._lru[endpoint] = OrderedDict()
        size = self._size.get(endpoint, 0)
        bit = 1 << self._slot(endpoint)
        shards = self._owners
        touch = lru.move_to_end
        for h in reversed(hashes):
            if h in lru:
                touch(h)
            else:
                lru[h] = 1
                size += 1
                owners = shards[h & _SHARD_MASK]
                owners[h] = owners.get(h, 0) | bit
        last, charge = hashes[-1], tail + 1
        if charge > lru[last]:
            size += charge - lru[last]
            lru[last] = charge
        if size > capacity:  # inlined `_unown`: a prompt of new blocks evicts as many, each a call
            keep = ~bit
            evict = lru.popitem
            while size > capacity and lru:
                h, blocks = evict(False)
                size -= blocks
                owners = shards[h & _SHARD_MASK]
                mask = owners[h] & keep
                if mask:
                    owners[h] = mask
                else:
                    del owners[h]
        self._size[endpoint] = size

    def drop_endpoint(self, endpoint: Endpoint) -> None:
        """Forget everything recorded for `endpoint` (it left the pool)."""
        bit = self._release(endpoint)
        self._size.pop(endpoint, None)
        if bit is not None:
            for h in self._lru.pop(endpoint, ()):
                self._unown(h, bit)

    def clear(self) -> None:
        super().clear()
        self._lru.clear()
        self._size.clear()


class KVBlockIndex(BlockOwners):
    """What each engine reports holding, from its KV events: exact where `PrefixIndex` guesses.

    Engines evict in their own order (vLLM frees a request's blocks tail first, but nothing
    promises a leading run survives), so `match` walks the blocks in order rather than binary
    searching as `PrefixIndex.match` may.

    An engine reports blocks once it has computed them, a prefill's time after the request was
    routed: `expect` holds a routed request's blocks as the endpoint's until then (until a
    deadline), so the requests right behind it that share its prefix follow it instead of
    spreading while its prefill runs. An event about a block settles it either way.
    """

    __slots__ = ("_expected", "_held")

    def __init__(self) -> None:
        super().__init__()
        self._held: dict[Endpoint, set[int]] = {}
        # blocks held on expectation only -> their deadline, oldest first (deadlines only grow)
        self._expected: dict[Endpoint, OrderedDict[int, float]] = {}

    def held(self, endpoint: Endpoint) -> int:
        """Blocks `endpoint` reported holding (or is expected to)."""
        return len(self._held.get(endpoint, ()))

    def entries(self) -> int:
        """Blocks held over all endpoints (a block two endpoints hold counts twice)."""
        return sum(map(len, list(self._held.values())))

    def stored(self, endpoint: Endpoint, hashes: Sequence[int]) -> None:
        held, bit = self._holding(endpoint)
        expected = self._expected.get(endpoint)
        for h in hashes:
            if h not in held:
                held.add(h)
                self._own(h, bit)
            elif expected:
                expected.pop(h, None)

    def expect(self, endpoint: Endpoint, hashes: Sequence[int], until: float) -> None:
        """`endpoint` was sent these blocks: count them as its own until `until` unless it reports
        them (or their removal) before."""
        held, bit = self._holding(endpoint)
        expected = self._expected.get(endpoint)
        if expected is None:
            expected = self._expected[endpoint] = OrderedDict()
        for h in hashes:
            if h not in held:
                held.add(h)
                self._own(h, bit)
                expected[h] = until
            elif h in expected:
                expected[h] = until
                expected.move_to_end(h)

    def expire(self, now: float) -> None:
        """Drop expectations past their deadline that no event confirmed."""
        for endpoint, expected in self._expected.items():
            if expected and next(iter(expected.values())) <= now:
                held, bit = self._held[endpoint], 1 << self._slot(endpoint)
                while expected and next(iter(expected.values())) <= now:
                    h = expected.popitem(last=False)[0]
                    held.discard(h)
                    self._unown(h, bit)

    def removed(self, endpoint: Endpoint, hashes: Sequence[int]) -> None:
        held = self._held.get(endpoint)
        if not held:
            return
        bit = 1 << self._slot(endpoint)
        expected = self._expected.get(endpoint)
        for h in hashes:
            if h in held:
                held.discard(h)
                self._unown(h, bit)
                if expected:
                    expected.pop(h, None)

    def cleared(self, endpoint: Endpoint) -> None:
        """The engine dropped its whole cache (vLLM's AllBlocksCleared, or a lost event stream)."""
        self._expected.pop(endpoint, None)
        held = self._held.pop(endpoint, None)
        if held:
            bit = 1 << self._slot(endpoint)
            for h in held:
                self._unown(h, bit)

    def drop_endpoint(self, endpoint: Endpoint) -> None:
        """Forget `endpoint` (it left the pool)."""
        self.cleared(endpoint)
        self._release(endpoint)

    def clear(self) -> None:
        super().clear()
        self._held.clear()
        self._expected.clear()

    def _holding(self, endpoint: Endpoint) -> tuple[set[int], int]:
        """`endpoint`'s held blocks (created if new) and its slot bit."""
        held = self._held.get(endpoint)
        if held is None:
            held = self._held[endpoint] = set()
        return held, 1 << self._slot(endpoint)

    def match(self, hashes: Sequence[int]) -> dict[Endpoint, int]:
        """Length in blocks of each endpoint's cached prefix of `hashes` (if > 0)."""
        matched: dict[Endpoint, int] = {}
        mask = self._mask
        alive = mask(hashes[0]) if hashes else 0
        for depth, h in enumerate(hashes):
            if not alive:
                break
            still = alive & mask(h)
            if still != alive:
                self._settle(matched, alive ^ still, depth)
                alive = still
        else:
            self._settle(matched, alive, len(hashes))
        return matched
