"""Production-trace replay: Mooncake-format JSONL turned into prompts that share text exactly where
the trace says the requests share KV blocks.

Each line is `{"timestamp": ms, "input_length": tokens, "output_length": tokens, "hash_ids": [...]}`
with one hash id per 512-token block of the prompt; equal ids mean equal blocks (a shared
prefix). Block `id` becomes the same 512 tokens of text wherever it appears: words drawn from a
generator seeded with the id, sized with the simulator's tokenizer, starting with a space so a
block tokenizes the same after any other. The first block holds 511 tokens of text, the BOS
token the server adds making it 512, so trace blocks line up with the prompt's tokens; a short
last block is a prefix of the same id's full block (the words that fit, then one-token filler),
so the prompt has exactly `input_length` tokens.

    records = load_trace(path, first=200)             # or start_s=600, end_s=900 (trace time)
    prompt = prompt_text(records[0])                   # exactly input_length tokens with BOS
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from pathlib import Path

import orjson

from loadtest.text import sizer

BLOCK_TOKENS = 512  # Mooncake's block size


@dataclass(frozen=True, slots=True)
class TraceRecord:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def load_trace(
    path: Path | str, *, first: int | None = None, start_s: float = 0.0, end_s: float | None = None
) -> list[TraceRecord]:
    """The records whose arrival falls in [start_s, end_s) seconds after the trace's first
    arrival, at most `first` of them. A malformed line is a ValueError naming the line."""
    records: list[TraceRecord] = []
    origin: float | None = None
    end = math.inf if end_s is None else end_s
    with Path(path).open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = _parse(line, f"{path}:{number}")
            origin = record.timestamp_ms if origin is None else origin
            offset = (record.timestamp_ms - origin) / 1000
            if offset >= end or (first is not None and len(records) >= first):
                break
            if offset >= start_s:
                records.append(record)
    return records


def _parse(line: bytes, where: str) -> TraceRecord:
    try:
        doc = orjson.loads(line)
        record = TraceRecord(
            float(doc["timestamp"]), int(doc["input_length"]), int(doc["output_length"]),
            tuple(int(i) for i in doc["hash_ids"]),
        )  # fmt: skip
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: not a Mooncake trace record ({type(exc).__name__}: {exc})") from None
    blocks = math.ceil(record.input_length / BLOCK_TOKENS)
    if record.input_length < 1 or record.output_length < 0 or len(record.hash_ids) != blocks:
        raise ValueError(
            f"{where}: input_length {record.input_length} needs {blocks} hash ids of {BLOCK_TOKENS} "
            f"tokens, the record has {len(record.hash_ids)}"
        )
    return record


def prompt_text(record: TraceRecord) -> str:
    """The record's prompt: `input_length` tokens once the server adds BOS."""
    remaining = record.input_length - 1  # BOS
    parts = []
    for index, block_id in enumerate(record.hash_ids):
        size = BLOCK_TOKENS - 1 if index == 0 else BLOCK_TOKENS
        parts.append(block_text(block_id, size, min(size, remaining)))
        remaining -= size
    return "".join(parts)


@functools.lru_cache(maxsize=4096)
def _block_pieces(block_id: int, size: int) -> tuple[tuple[str, int], ...]:
    return tuple(sizer().pieces(random.Random(f"trace-block-{block_id}"), size, lead_space=True))


def block_text(block_id: int, size: int, tokens: int) -> str:
    """The first `tokens` of block `block_id`'s text (`size` tokens when whole)."""
    text, used = [], 0
    for piece, count in _block_pieces(block_id, size):
        if used + count > tokens:
            break
        text.append(piece)
        used += count
    if used < tokens:
        text.append(sizer().fill(random.Random(f"trace-fill-{block_id}-{tokens}"), tokens - used))
    return "".join(text)
