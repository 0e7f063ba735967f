"""Prompt text of an exact number of tokens, in the simulator's made-up language.

Load tests ask for prompts by token count, as `vllm bench serve` does, but send text, as users
do: so the text is sized with the same `tokenizer.json` the replicas load. Each word's token
count is measured once (a byte-level BPE tokenizes every space-led word on its own, so counts
add up), and text is drawn word by word until the count is met exactly. How many characters a
token covers then depends on what is written: ~4.4 for prose of common words, ~3.4 for rare ones.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

from tokenizers import Tokenizer

from vllm_sim.text import SENTENCE_WORDS, lexicon, words
from vllm_sim.tokenizer import DEFAULT_TOKENIZER

_BATCH = 256  # words drawn at a time


class TextSizer:
    """Writes text of exactly N tokens (without BOS or template) for one tokenizer."""

    def __init__(self, path: Path = DEFAULT_TOKENIZER) -> None:
        tokenizer = Tokenizer.from_file(str(path))
        vocabulary = lexicon()

        def counts(texts: list[str]) -> dict[str, int]:
            encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
            return {word: len(e.ids) for word, e in zip(vocabulary, encoded, strict=True)}

        self._bare = counts(list(vocabulary))  # a text's first word
        self._spaced = counts([" " + word for word in vocabulary])  # every later one
        self._period = len(tokenizer.encode(".", add_special_tokens=False).ids)
        self._one_bare = [w for w, n in self._bare.items() if n == 1]
        self._one_spaced = [w for w, n in self._spaced.items() if n == 1]

    def text(self, rng: random.Random, tokens: int, *, common: bool = True, lead_space: bool = False) -> str:
        """`tokens` tokens of sentences: common words (prose) or any word of the lexicon (rare).

        With `lead_space` the text starts with a space, so that it tokenizes the same wherever it
        is appended to other such text (blocks of a longer prompt)."""
        return "".join(piece for piece, _ in self.pieces(rng, tokens, common=common, lead_space=lead_space))

    def pieces(
        self, rng: random.Random, tokens: int, *, common: bool = True, lead_space: bool = False
    ) -> list[tuple[str, int]]:
        """`text`'s words (and periods), each with its token count: any prefix of them is a prefix
        of the text's tokens."""
        pieces: list[tuple[str, int]] = []
        remaining = tokens
        until = rng.randint(*SENTENCE_WORDS)
        drawn: list[str] = []
        while remaining > 0:
            if not drawn:
                drawn = words(rng, _BATCH, common=common)
            word = drawn.pop()
            first = not pieces and not lead_space
            counts, ones = (self._bare, self._one_bare) if first else (self._spaced, self._one_spaced)
            if counts[word] > remaining:
                word = rng.choice(ones)
            pieces.append((word if first else " " + word, counts[word]))
            remaining -= counts[word]
            if len(pieces) >= until and remaining >= self._period:
                pieces.append((".", self._period))
                remaining -= self._period
                until += rng.randint(*SENTENCE_WORDS)
        return pieces

    def fill(self, rng: random.Random, tokens: int) -> str:
        """`tokens` one-token words, each after a space (to pad text to an exact length)."""
        return "".join(" " + rng.choice(self._one_spaced) for _ in range(tokens))


@functools.cache
def sizer(path: Path = DEFAULT_TOKENIZER) -> TextSizer:
    return TextSizer(path)


def sized_text(rng: random.Random, tokens: int, *, common: bool = True, lead_space: bool = False) -> str:
    """`TextSizer.text` with the simulator's default tokenizer."""
    return sizer().text(rng, tokens, common=common, lead_space=lead_space)
