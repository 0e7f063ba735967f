"""The KV-cache block pool of one replica, with vLLM V1's automatic prefix caching.

Blocks that no request holds stay in a free queue with their hash, so a later request with the
same prefix can reuse them until allocation evicts them (least recently freed first). Requests
free their blocks tail first, so a prompt's shared head outlives its private tail. Evicted hashes
are collected in `evicted` when someone (the KV-event publisher) wants them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


class KVCache:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        # Blocks with ref_count 0, in eviction order (head first). Cached ones keep their hash.
        self._free: OrderedDict[int, Block] = OrderedDict((i, Block(i)) for i in range(num_blocks))
        self._cached: dict[int, Block] = {}
        self.evicted: list[int] | None = None  # a list: hashes evicted since it was last emptied

    @property
    def num_free(self) -> int:
        """Blocks allocatable now, cached-but-unused ones included (vLLM counts them free)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """`vllm:kv_cache_usage_perc`: the share of blocks some request holds."""
        return 1.0 - len(self._free) / self.num_blocks

    def longest_hit(self, hashes: Sequence[int], max_blocks: int) -> list[Block]:
        """The cached blocks matching the first hashes, stopping at the first miss."""
        if not self.prefix_caching:
            return []
        hits = []
        for block_hash in hashes[:max_blocks]:
            block = self._cached.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_allocate(self, new_blocks: int, hits: Sequence[Block] = ()) -> bool:
        """Whether `new_blocks` fit once `hits` (which may sit in the free queue) are taken."""
        reusable = sum(1 for block in hits if block.ref_count == 0)
        return new_blocks <= len(self._free) - reusable

    def touch(self, blocks: Sequence[Block]) -> None:
        """Take a reference on cache hits, pulling unused ones out of the free queue."""
        for block in blocks:
            if block.ref_count == 0:
                del self._free[block.block_id]
            block.ref_count += 1

    def allocate(self, count: int) -> list[Block]:
        """`count` fresh blocks, evicting the cached content of the oldest free ones."""
        if count > len(self._free):
            raise ValueError(f"{count} blocks requested, {len(self._free)} free")
        blocks = []
        for _ in range(count):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                if self.evicted is not None:
                    self.evicted.append(block.block_hash)
                block.block_hash = None
            block.ref_count = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Sequence[Block]) -> None:
        """Drop a request's references, tail first so its last blocks are evicted first."""
        for block in reversed(blocks):
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block.block_id] = block

    def cache(self, block: Block, block_hash: int) -> bool:
        """Publish a fully computed block; False if it was not (a duplicate of a cached block
        stays private)."""
        if not self.prefix_caching or block_hash in self._cached:
            return False
        block.block_hash = block_hash
        self._cached[block_hash] = block
        return True

    def reset(self) -> bool:
        """Forget every cached hash, as vLLM's reset_prefix_cache; refused (False) while a
        request holds blocks."""
        if len(self._free) < self.num_blocks:
            return False
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        return True
