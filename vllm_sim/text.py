"""A made-up language to talk to the simulator in: a fixed lexicon of word-like strings with
Zipf-like frequencies, from which the project's tokenizer is trained and the load generator
writes its prompts.

Frequent words end up as single tokens and rare ones split into several, as English does with a
real tokenizer, so characters per token vary with what is written (common prose vs rare words)
instead of being a constant the picker could assume. Everything is seeded: the same seed gives
the same lexicon and the same text on every machine.
"""

from __future__ import annotations

import functools
import itertools
import random

# The most frequent English words open the lexicon, so generated text reads like prose.
_COMMON_WORDS = (
    "the of and to a in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no more "
    "other can its what about into than them only time could new some these two may first then "
    "do any like my now over such our man me even most made after also did many before must "
    "through back years where much your way well down should because each just those people how "
    "too little state good very make world still own see men work long get here between both "
    "life being under never day same another know while last might us great old year off come "
    "since against go came right used take three"
)
COMMON = tuple(_COMMON_WORDS.split())
_ONSETS = (
    "", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
    "bl", "br", "ch", "cl", "cr", "dr", "fl", "fr", "gl", "gr", "pl", "pr", "sh", "sl", "sp", "st",
    "str", "th", "tr", "qu", "sc",
)  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ee", "io", "ou", "oo", "y")
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck", "rt", "x", "ll")
LEXICON_SIZE = 24_000
LEXICON_SEED = 20_261_202
ZIPF_EXPONENT = 1.05
SENTENCE_WORDS = (6, 18)  # a period after every so many words


@functools.cache
def lexicon() -> tuple[str, ...]:
    """Every word, most frequent first: the common English words, then made-up ones."""
    rng = random.Random(LEXICON_SEED)
    words = dict.fromkeys(COMMON)
    while len(words) < LEXICON_SIZE:
        syllables = rng.choices((1, 2, 3), weights=(4, 5, 2))[0]
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)
        )
        words.setdefault(word, None)
    return tuple(words)


@functools.cache
def zipf_weights() -> tuple[float, ...]:
    """Cumulative weights of `lexicon()`: rank r is drawn in proportion to 1 / r^ZIPF_EXPONENT."""
    return tuple(itertools.accumulate(1 / rank**ZIPF_EXPONENT for rank in range(1, LEXICON_SIZE + 1)))


def words(rng: random.Random, count: int, *, common: bool = True) -> list[str]:
    """`count` words: Zipf-distributed prose (`common`), or uniform over the lexicon (rare words)."""
    if common:
        return rng.choices(lexicon(), cum_weights=zipf_weights(), k=count)
    return rng.choices(lexicon(), k=count)


def prose(rng: random.Random, count: int, *, common: bool = True) -> str:
    """`count` words as sentences (a period every 6-18 words)."""
    pieces = []
    until = rng.randint(*SENTENCE_WORDS)
    for i, word in enumerate(words(rng, count, common=common), 1):
        pieces.append(word)
        if i == until:
            pieces[-1] += "."
            until += rng.randint(*SENTENCE_WORDS)
    return " ".join(pieces)
