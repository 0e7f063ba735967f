"""A stand-in tokenizer: fixed 4-character tokens, hashed per KV block as vLLM's prefix cache does.

Generated tokens are also 4 characters, so a chat client that sends an answer back in its next
turn re-creates the same blocks and hits the cache, as with vLLM.
"""

from __future__ import annotations

import random

import xxhash

CHARS_PER_TOKEN = 4

# Every output token is " xyz" (consonant, vowel, consonant): four characters, like the prompt's.
VOCABULARY: tuple[str, ...] = tuple(
    f" {a}{v}{b}" for a in "bdfgklmnprst" for v in "aeiou" for b in "bdgklmnprst"
)


def count_tokens(text: str) -> int:
    """Tokens in a prompt; at least one, as a real tokenizer adds a BOS token."""
    return max(1, -(-len(text) // CHARS_PER_TOKEN))


def _hash(text: str, parent: int) -> int:
    return xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass"), seed=parent)


class TokenSequence:
    """A request's tokens (prompt, then outputs) and the hash chain of its full blocks.

    Block i's hash covers blocks 0..i (each block is seeded with its parent's hash) plus the LoRA
    adapter, so equal hashes mean equal KV content, as in vLLM's prefix cache.
    """

    __slots__ = ("_root", "_tail", "_tail_tokens", "block_size", "hashes", "num_tokens")

    def __init__(self, prompt: str, block_size: int, salt: str = "") -> None:
        self.block_size = block_size
        self.num_tokens = count_tokens(prompt)
        block_chars = block_size * CHARS_PER_TOKEN
        full = self.num_tokens // block_size
        self.hashes: list[int] = []
        self._root = _hash(salt, 0) if salt else 0
        parent = self._root
        for i in range(full):
            parent = _hash(prompt[i * block_chars : (i + 1) * block_chars], parent)
            self.hashes.append(parent)
        self._tail = prompt[full * block_chars :]
        self._tail_tokens = self.num_tokens - full * block_size

    def append(self, token: str) -> None:
        """Add one generated token; hash the block it completes."""
        self.num_tokens += 1
        self._tail += token
        self._tail_tokens += 1
        if self._tail_tokens == self.block_size:
            self.hashes.append(_hash(self._tail, self.hashes[-1] if self.hashes else self._root))
            self._tail = ""
            self._tail_tokens = 0


class OutputText:
    """Deterministic generated tokens for one request (seeded like a sampling seed)."""

    __slots__ = ("_rng",)

    def __init__(self, seed: int | None) -> None:
        self._rng = random.Random(seed)

    def next_token(self) -> str:
        return self._rng.choice(VOCABULARY)
