"""A request's token ids and the hash chain of its full KV blocks, as vLLM's prefix cache keys them.

Block i's hash covers the token ids of blocks 0..i (each block's hash is seeded with its parent's)
plus the LoRA adapter, so equal hashes mean equal KV content. vLLM hashes the same way (parent
hash, block token ids, extra keys such as the LoRA name), with SHA-256 by default; xxh3-64 here is
cheaper and its 64-bit values are what vLLM's KV events publish.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import xxhash


def block_hash(token_ids: Sequence[int], parent: int) -> int:
    return xxhash.xxh3_64_intdigest(array("I", token_ids).tobytes(), seed=parent)


def root_hash(salt: str) -> int:
    """The parent of a sequence's first block: 0, or a hash of the LoRA adapter's name."""
    return xxhash.xxh3_64_intdigest(salt.encode(), seed=0) if salt else 0


class TokenSequence:
    """A request's tokens (prompt, then outputs) and the hashes of its full blocks."""

    __slots__ = ("block_size", "hashes", "ids", "root")

    def __init__(self, ids: Sequence[int], block_size: int, salt: str = "") -> None:
        self.block_size = block_size
        self.ids = list(ids)
        self.root = root_hash(salt)
        self.hashes: list[int] = []
        parent = self.root
        for start in range(0, len(self.ids) - block_size + 1, block_size):
            parent = block_hash(self.ids[start : start + block_size], parent)
            self.hashes.append(parent)

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    def block_tokens(self, index: int) -> list[int]:
        return self.ids[index * self.block_size : (index + 1) * self.block_size]

    def parent_hash(self, index: int) -> int | None:
        """The hash block `index` was chained to (None for the first block)."""
        return self.hashes[index - 1] if index else None

    def append(self, token_id: int) -> None:
        """Add one generated token; hash the block it completes."""
        self.ids.append(token_id)
        if len(self.ids) % self.block_size == 0:
            parent = self.hashes[-1] if self.hashes else self.root
            self.hashes.append(block_hash(self.ids[-self.block_size :], parent))
