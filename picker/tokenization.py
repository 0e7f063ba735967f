"""The engine's view of a prompt, for the precise prefix index: its token ids and their KV block
hashes, computed the way the engine computes them (`BlockHasher`).

The engine renders chat messages through the model's chat template and tokenizes with the model's
`tokenizer.json` (Hugging Face `tokenizers`, jinja2 in a sandbox: what `apply_chat_template`
does), so picker loads the same two files. Only the prompt's leading blocks can match, so only the
text they could span is rendered and tokenized: at most `max_tokens` tokens' worth of characters
(`CHARS_PER_TOKEN_BOUND` each). The text between special tokens (a chat's system prompt, each
message) is tokenized on its own and remembered, as `tokenizers` splits there itself: the shared
system prompt of the next request costs a dictionary lookup, not a tokenizer run. With a GPT-2-style
byte-level tokenizer (no normalizer, the ByteLevel pre-tokenizer's regex), whose pre-tokens never
cross a space that follows a non-space and precedes one, text split before such spaces encodes as
the concatenation of its pieces, so pieces are remembered too: a long completion prompt made of
text seen before (a resent conversation) costs lookups, not a tokenizer run (measured on the
Mooncake trace: the tokenizer had cost ~35 ms of picker CPU per 13k-token prompt).
"""

from __future__ import annotations

import hashlib
import json
import re
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import cbor2
import xxhash
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

# Characters one token spans at most in the text picker tokenizes; text beyond the blocks the
# match can use is cut off (its last block dropped, as the cut may have split a token).
CHARS_PER_TOKEN_BOUND = 8
SEGMENTS_KEPT = 1024  # remembered texts between special tokens (LRU)
MAX_SEGMENT_CHARS = 16 * 1024  # longer ones are not remembered whole (their pieces may be)
PIECES_KEPT = 200_000  # remembered pieces; all forgotten at once beyond this
_PIECE_BOUNDARY = re.compile(r"(?<=\S)(?= \S)")  # before a space between two non-spaces


HASH_ALGORITHMS = ("sha256_cbor", "xxhash_cbor", "xxh3_64")
_LOW_64 = (1 << 64) - 1


def external_hash(value: int | bytes) -> int:
    """A block hash as vLLM's KV events publish it with int hashes: the digest's low 64 bits (events
    carrying the digest bytes instead are read the same way)."""
    return value if type(value) is int else int.from_bytes(value, "big") & _LOW_64  # type: ignore[arg-type]


class BlockHasher:
    """The engine's hash of each full block of a prompt, chained from the first.

    `sha256_cbor` and `xxhash_cbor`: vLLM's (`--prefix-caching-hash-algo`,
    vllm/v1/core/kv_cache_utils.py): block = SHA-256 (or xxh3-128) of the canonical CBOR of (parent
    digest, the block's token ids, extra keys), extra keys the LoRA adapter's name, and the first
    block's parent the same hash of the seed. vLLM takes the seed from PYTHONHASHSEED and, when that
    is unset, from random bytes per process, so no one else can name its blocks: `seed` must be the
    engines' PYTHONHASHSEED. `xxh3_64`: the simulator's (xxh3-64 of the ids as uint32, seeded with
    the parent, the first with 0 or the adapter's name hashed).
    """

    def __init__(self, algorithm: str, seed: str = "") -> None:
        if algorithm not in HASH_ALGORITHMS:
            raise ValueError(f"hashAlgorithm must be one of {HASH_ALGORITHMS}, not {algorithm!r}")
        self.algorithm = algorithm
        self._digest = _sha256_cbor if algorithm == "sha256_cbor" else _xxh3_128_cbor
        if algorithm != "xxh3_64" and not seed:
            raise ValueError(
                f"hashSeed is required with hashAlgorithm {algorithm}: vLLM seeds each prefix's first "
                "block from PYTHONHASHSEED (random bytes when it is unset), so set PYTHONHASHSEED on "
                "every engine and hashSeed to the same value"
            )
        self._none = self._digest(seed)

    def hashes(self, ids: Sequence[int], block_size: int, lora: str = "") -> list[int]:
        """Each full block's hash as the engine's KV events name it (`external_hash`)."""
        parent: int | bytes
        if self.algorithm == "xxh3_64":
            parent = xxhash.xxh3_64_intdigest(lora.encode(), seed=0) if lora else 0
            block = _xxh3_block
        else:
            parent, block = self._none, partial(_cbor_block, self._digest, (lora,) if lora else None)
        out = []
        for start in range(0, len(ids) - block_size + 1, block_size):
            parent = block(parent, ids[start : start + block_size])
            out.append(external_hash(parent))
        return out


def _sha256_cbor(value: object) -> bytes:
    return hashlib.sha256(cbor2.dumps(value, canonical=True)).digest()


def _xxh3_128_cbor(value: object) -> bytes:
    return xxhash.xxh3_128_digest(cbor2.dumps(value, canonical=True))


def _cbor_block(
    digest: Callable[[object], bytes], extra: tuple[str, ...] | None, parent: bytes, ids: Sequence[int]
) -> bytes:
    return digest((parent, tuple(ids), extra))


def _xxh3_block(parent: int, ids: Sequence[int]) -> int:
    return xxhash.xxh3_64_intdigest(array("I", ids).tobytes(), seed=parent)


class PromptTokenizer:
    """A model's tokenizer.json and chat template, applied as the engine applies them."""

    def __init__(self, tokenizer: Path, chat_template: Path | None = None) -> None:
        self.tokenizer = Tokenizer.from_file(str(tokenizer))
        config = json.loads(self.tokenizer.to_str())
        specials = {
            token["content"]: token["id"]
            for token in config.get("added_tokens", ())
            if token["special"] and not (token["lstrip"] or token["rstrip"] or token["normalized"])
        }
        self._specials = specials
        names = sorted(specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        probe = self.tokenizer.encode("x", add_special_tokens=False).ids
        framed = self.tokenizer.encode("x", add_special_tokens=True).ids
        at = next(i for i in range(len(framed)) if framed[i : i + len(probe)] == probe)
        self._prefix = framed[:at]  # what add_special_tokens puts before the text (BOS)
        self.bos_token = next((t for t in ("<|begin_of_text|>", "<s>") if t in specials), "")
        self._segments: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        pre = config.get("pre_tokenizer") or {}
        byte_level = pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
        splits = config.get("normalizer") is None and byte_level
        self._pieces: dict[str, tuple[int, ...]] | None = {} if splits else None
        self.template = None
        if chat_template is not None:
            environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            environment.globals["raise_exception"] = _raise
            self.template = environment.from_string(chat_template.read_text())

    def prompt_ids(self, document: dict[str, Any], max_tokens: int) -> list[int] | None:
        """The leading token ids (at most `max_tokens`, whole ones only) the engine will see for an
        OpenAI completions or chat body; None when picker cannot tell (a chat without a template,
        a template that fails, an input it does not model such as /v1/responses)."""
        max_chars = max_tokens * CHARS_PER_TOKEN_BOUND
        if "messages" in document:
            messages = document["messages"]
            if self.template is None or not isinstance(messages, list):
                return None
            text, cut = self._render(messages, document.get("add_generation_prompt") is not False, max_chars)
            if text is None:
                return None
            special = document.get("add_special_tokens") is True
        else:
            prompt = document.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]  # one prompt in a batch of one
            if isinstance(prompt, list) and all(type(t) is int for t in prompt[:max_tokens]):
                return prompt[:max_tokens]
            if not isinstance(prompt, str):
                return None
            text, cut = prompt[:max_chars], len(prompt) > max_chars
            special = document.get("add_special_tokens") is not False
        ids = self.encode(text, add_special_tokens=special)
        if cut:  # the cut may have split the last token: keep only what the full text starts with
            ids = ids[: max(0, len(ids) - 1)]
        return ids[:max_tokens]

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = list(self._prefix) if add_special_tokens else []
        for part in self._split.split(text) if self._split else (text,):
            special = self._specials.get(part)
            if special is not None:
                ids.append(special)
            elif part:
                ids += self._segment(part)
        return ids

    def _segment(self, text: str) -> tuple[int, ...]:
        segments = self._segments
        known = segments.get(text)
        if known is not None:
            segments.move_to_end(text)
            return known
        pieces = self._pieces
        if pieces is None:
            ids = tuple(self.tokenizer.encode(text, add_special_tokens=False).ids)
        else:
            if len(pieces) > PIECES_KEPT:
                pieces.clear()
            encode = self.tokenizer.encode
            joined: list[int] = []
            for piece in _PIECE_BOUNDARY.split(text):
                known = pieces.get(piece)
                if known is None:
                    known = pieces[piece] = tuple(encode(piece, add_special_tokens=False).ids)
                joined += known
            ids = tuple(joined)
        if len(text) <= MAX_SEGMENT_CHARS:
            segments[text] = ids
            if len(segments) > SEGMENTS_KEPT:
                segments.popitem(last=False)
        return ids

    def _render(
        self, messages: list[Any], generation_prompt: bool, max_chars: int
    ) -> tuple[str | None, bool]:
        """The template's text for the leading messages that fit in `max_chars` (the first one
        over it included, the text cut there), and whether it was cut."""
        kept, chars = [], 0
        for message in messages:
            if not isinstance(message, dict):
                return None, False
            content = _text(message.get("content"))
            if content is None:
                return None, False
            kept.append({**message, "content": content})
            chars += len(content)
            if chars > max_chars:
                break
        cut = len(kept) < len(messages) or chars > max_chars
        try:
            text = self.template.render(  # type: ignore[union-attr]
                messages=kept, bos_token=self.bos_token, add_generation_prompt=generation_prompt and not cut
            )
        except TemplateError:
            return None, False
        return (text[:max_chars] if cut else text), cut


def _text(content: object) -> str | None:
    """A message's content as the template sees it: text parts joined by newlines, as vLLM's
    "string" content format does for text-only models."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict)]
        if all(isinstance(text, str) for text in texts) and len(texts) == len(content):
            return "\n".join(texts)  # type: ignore[arg-type]
    return None


def _raise(message: str) -> None:
    raise TemplateError(message)
