"""What vLLM does with text before the engine sees it: render chat messages through the model's
chat template (jinja2), tokenize with the model's `tokenizer.json` (Hugging Face `tokenizers`),
and detokenize what the engine samples.

By default the replica loads the small byte-level BPE tokenizer and Llama-3-style template the
project ships (`data/`, made by `python -m vllm_sim.train_tokenizer`); `--tokenizer` and
`--chat-template` take others. The engine samples whole-word tokens only (the ones that come back
as themselves when their text is tokenized again), so a client that sends an answer back in its
next turn re-creates the same tokens and hits the cache, as a real conversation does.

Tokenizing is the simulator's main cost per request (measured: 5.9 ms for a 4k-token prompt with
`Tokenizer.encode`, where the engine's work is well under a millisecond). With a GPT-2-style
byte-level tokenizer (no normalizer, ByteLevel pre-tokenizer with its regex) no pre-token crosses a
space that follows a non-space and precedes one, so text split before such spaces encodes as the
concatenation of its pieces: pieces are encoded once and remembered, so text seen before (resent
conversations, a trace's shared blocks) costs dictionary lookups: 1.2 ms for a 4k-token prompt
seen before, the same 5.9 ms as a whole encode for one never seen. Special tokens split text
before anything else does, so the text between them (a chat message, such as a shared system
prompt) is also remembered whole. Other tokenizers are encoded whole.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

DATA = Path(__file__).parent / "data"
DEFAULT_TOKENIZER = DATA / "tokenizer.json"
DEFAULT_CHAT_TEMPLATE = DATA / "chat_template.jinja"
_WORD = re.compile(r"(Ġ?)([a-z]+)")  # a byte-level token that is a plain lower-case word


class TemplateFailure(ValueError):
    """The chat template could not render the messages (e.g. it raised on purpose)."""


_PIECE_BOUNDARY = re.compile(r"(?<=\S)(?= \S)")  # before a space between two non-spaces
_MAX_PIECES = 500_000  # remembered pieces; forgotten all at once beyond this
_MAX_SEGMENT_CHARS = 32 << 20  # remembered segments' text; forgotten all at once beyond this


def _special_tokens(tokenizer: Tokenizer) -> dict[str, int]:
    """Special tokens the tokenizer finds anywhere in raw text, before anything else: the text
    between them is tokenized on its own (as the library does)."""
    config = json.loads(tokenizer.to_str())
    return {
        token["content"]: token["id"]
        for token in config.get("added_tokens", ())
        if token["special"]
        and not (token["lstrip"] or token["rstrip"] or token["single_word"] or token["normalized"])
    }


def _splits_at_spaces(tokenizer: Tokenizer) -> bool:
    """Whether pre-tokenization always splits before a space between two non-spaces (GPT-2's
    byte-level regex with no normalizer before it)."""
    config = json.loads(tokenizer.to_str())
    pre = config.get("pre_tokenizer") or {}
    return config.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)


def _raise(message: str) -> None:
    raise TemplateFailure(message)


class SimTokenizer:
    """A tokenizer.json plus a chat template, with the special tokens vLLM reads from the model."""

    def __init__(self, path: Path = DEFAULT_TOKENIZER, chat_template: Path = DEFAULT_CHAT_TEMPLATE) -> None:
        self.path = path
        self.tokenizer = Tokenizer.from_file(str(path))
        self.vocab_size = self.tokenizer.get_vocab_size()
        self._pieces: dict[str, tuple[int, ...]] | None = {} if _splits_at_spaces(self.tokenizer) else None
        self._segments: dict[str, list[int]] = {}  # text between special tokens -> its ids
        self._segment_chars = 0
        self._specials = _special_tokens(self.tokenizer)
        names = sorted(self._specials, key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        probe = self.tokenizer.encode("x", add_special_tokens=False).ids
        framed = self.tokenizer.encode("x", add_special_tokens=True).ids
        at = next(i for i in range(len(framed)) if framed[i : i + len(probe)] == probe)
        self._prefix, self._suffix = framed[:at], framed[at + len(probe) :]  # e.g. BOS, and nothing
        special = {t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special}
        self.bos_token = next((t for t in ("<|begin_of_text|>", "<s>") if t in special), "")
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise
        self.template = environment.from_string(chat_template.read_text())
        first, following = self._word_tokens()
        if not first or not following:
            raise ValueError(f"{path}: no plain-word tokens to sample output from")
        self._first, self._following = first, following

    def _word_tokens(self) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
        """(id, text) of word tokens that tokenize back to themselves: without a leading space
        (an answer's first token, which chat templates trim) and with one (the rest)."""
        first, following = [], []
        candidates = sorted(
            (token_id, token)
            for token, token_id in self.tokenizer.get_vocab().items()
            if _WORD.fullmatch(token) and len(token) > 2
        )
        texts = [token.replace("Ġ", " ") for _, token in candidates]
        encoded = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        for (token_id, _), text, encoding in zip(candidates, texts, encoded, strict=True):
            if encoding.ids == [token_id]:
                (following if text.startswith(" ") else first).append((token_id, text))
        return first, following

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with the special tokens the tokenizer adds (BOS) if asked."""
        pieces = self._pieces
        if pieces is None:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        if len(pieces) > _MAX_PIECES:
            pieces.clear()
        ids = list(self._prefix) if add_special_tokens else []
        for part in self._special_split.split(text) if self._special_split else (text,):
            special = self._specials.get(part)
            if special is not None:
                ids.append(special)
            elif part:
                ids += self._segment(part, pieces)
        if add_special_tokens:
            ids += self._suffix
        return ids

    def _segment(self, text: str, pieces: dict[str, tuple[int, ...]]) -> list[int]:
        """The ids of text without special tokens: remembered whole (a chat's system prompt comes
        back byte for byte) and by pieces (a resent conversation comes back in new segments)."""
        known = self._segments.get(text)
        if known is not None:
            return known
        ids: list[int] = []
        for piece in _PIECE_BOUNDARY.split(text):
            ids_of_piece = pieces.get(piece)
            if ids_of_piece is None:
                ids_of_piece = pieces[piece] = tuple(
                    self.tokenizer.encode(piece, add_special_tokens=False).ids
                )
            ids += ids_of_piece
        if self._segment_chars > _MAX_SEGMENT_CHARS:
            self._segments.clear()
            self._segment_chars = 0
        self._segments[text] = ids
        self._segment_chars += len(text)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> str:
        """The prompt text of a chat request, as `apply_chat_template(..., tokenize=False)`."""
        try:
            text = self.template.render(
                messages=messages,
                bos_token=self.bos_token,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
            )
        except TemplateError as exc:
            raise TemplateFailure(f"chat template error: {exc}") from None
        if continue_final_message and messages:
            final = str(messages[-1].get("content") or "").strip()
            end = text.rfind(final) + len(final) if final else -1
            text = text[:end] if end > 0 else text
        return text

    def prompt_ids(
        self,
        prompt: str | list[int] | None = None,
        messages: list[dict[str, Any]] | None = None,
        *,
        add_special_tokens: bool | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[int]:
        """The engine's input: chat messages rendered and tokenized without adding special tokens
        (the template has them), a text prompt with them (BOS), token ids as given (checked)."""
        if messages is not None:
            text = self.render_chat(
                messages,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
            )
            return self.encode(text, add_special_tokens=bool(add_special_tokens))
        if isinstance(prompt, str):
            return self.encode(prompt, add_special_tokens=add_special_tokens is not False)
        ids = list(prompt or ())
        if not ids:
            raise ValueError("the prompt is empty")
        if max(ids) >= self.vocab_size:
            raise ValueError(f"token id {max(ids)} is out of vocabulary (size {self.vocab_size})")
        return ids

    def sampler(self, seed: int | None) -> OutputSampler:
        return OutputSampler(self._first, self._following, seed)


class OutputSampler:
    """Deterministic generated tokens for one request (seeded like a sampling seed)."""

    __slots__ = ("_first", "_following", "_next", "_rng")

    def __init__(
        self, first: list[tuple[int, str]], following: list[tuple[int, str]], seed: int | None
    ) -> None:
        self._rng = random.Random(seed)
        self._first, self._following = first, following
        self._next = first

    def next_token(self) -> tuple[int, str]:
        """(token id, its text)."""
        token = self._rng.choice(self._next)
        self._next = self._following
        return token


@functools.cache
def load(path: Path = DEFAULT_TOKENIZER, chat_template: Path = DEFAULT_CHAT_TEMPLATE) -> SimTokenizer:
    """One instance per file pair in a process (replicas share it)."""
    return SimTokenizer(path, chat_template)
