"""KV-cache events in vLLM's wire format (`vllm/distributed/kv_events.py`), one publisher per replica.

A ZMQ PUB socket sends each engine step's events as multipart `[topic, seq, payload]`: `seq` an
8-byte big-endian counter from 0, `payload` a msgpack EventBatch of (ts, events,
data_parallel_rank). Events are BlockStored (hashes of consecutive blocks, the hash they chain
from, their token ids, block size, LoRA id and name, medium "GPU"), BlockRemoved (evicted hashes)
and AllBlocksCleared, with 64-bit int hashes. Two encodings, as vLLM has had both: `array`
(positional arrays, the event's type first: vLLM's msgspec `array_like` structs) and `map`
(maps tagged with `type`, the batch a map too: vLLM since its structs stopped being array-like).
An optional ZMQ ROUTER socket replays missed batches: a client sends an 8-byte start sequence
number and receives `(seq, payload)` for every buffered batch from there, then `(-1, b"")`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import zmq
import zmq.asyncio

ENCODINGS = ("array", "map")
MEDIUM_GPU = "GPU"
END_SEQ = (-1).to_bytes(8, "big", signed=True)
REPLAY_BUFFER = 10_000  # batches kept for replay, as vLLM's default buffer_steps


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    lora_name: str | None
    medium: str = MEDIUM_GPU

    def encode(self, encoding: str) -> list[object] | dict[str, object]:
        fields = (self.block_hashes, self.parent_block_hash, self.token_ids, self.block_size, self.lora_id)
        if encoding == "array":
            return ["BlockStored", *fields, self.medium, self.lora_name]
        names = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id")
        return {"type": "BlockStored", **dict(zip(names, fields, strict=True)), "medium": self.medium,
                "lora_name": self.lora_name}  # fmt: skip


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: list[int]
    medium: str = MEDIUM_GPU

    def encode(self, encoding: str) -> list[object] | dict[str, object]:
        if encoding == "array":
            return ["BlockRemoved", self.block_hashes, self.medium]
        return {"type": "BlockRemoved", "block_hashes": self.block_hashes, "medium": self.medium}


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    def encode(self, encoding: str) -> list[object] | dict[str, object]:
        return ["AllBlocksCleared"] if encoding == "array" else {"type": "AllBlocksCleared"}


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


def encode_batch(events: Sequence[KVEvent], encoding: str, ts: float, data_parallel_rank: int = 0) -> bytes:
    encoded = [event.encode(encoding) for event in events]
    if encoding == "array":
        return msgpack.packb([ts, encoded, data_parallel_rank])
    return msgpack.packb({"ts": ts, "events": encoded, "data_parallel_rank": data_parallel_rank})


class KVEventPublisher:
    """The PUB socket (and ROUTER replay socket) of one replica."""

    def __init__(self, encoding: str = "array", topic: str = "", data_parallel_rank: int = 0) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown KV event encoding {encoding!r}; choose from {ENCODINGS}")
        self.encoding = encoding
        self.endpoint = ""
        self.replay_endpoint: str | None = None
        self._topic = topic.encode()
        self._rank = data_parallel_rank
        self._seq = itertools.count()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=REPLAY_BUFFER)
        self._context = zmq.asyncio.Context.instance()
        self._pub: zmq.Socket[bytes] | None = None
        self._replay: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None

    def start(self, host: str, port: int, replay_port: int | None = None) -> str:
        """Bind the PUB socket on host:port (0: a free port) and, when `replay_port` is given, the
        ROUTER replay socket (0: a free port); returns the PUB endpoint."""
        # A plain (non-asyncio) PUB socket: PUB never blocks, so each send is one call.
        self._pub = zmq.Context.instance().socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, 100_000)
        self.endpoint = _bind(self._pub, host, port)
        if replay_port is not None:
            self._replay = self._context.socket(zmq.ROUTER)
            self.replay_endpoint = _bind(self._replay, host, replay_port)
            self._replay_task = asyncio.create_task(self._serve_replay(), name=f"kv replay {self.endpoint}")
        return self.endpoint

    def publish(self, events: Sequence[KVEvent]) -> None:
        if self._pub is None or not events:
            return
        seq = next(self._seq)
        payload = encode_batch(events, self.encoding, time.time(), self._rank)
        self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK)
        self._buffer.append((seq, payload))

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3:
                continue  # not [identity, empty delimiter, start seq]: ignored, as vLLM does
            client, _, start = frames
            first = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= first:
                    await self._replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
            await self._replay.send_multipart((client, b"", END_SEQ, b""))

    async def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
        for socket in (self._pub, self._replay):
            if socket is not None:
                socket.close(linger=0)
        self._pub = self._replay = self._replay_task = None


def _bind(socket: zmq.Socket[bytes], host: str, port: int) -> str:
    if port:
        socket.bind(f"tcp://{host}:{port}")
    else:
        socket.bind(f"tcp://{host}:*")
    endpoint: str = socket.getsockopt_string(zmq.LAST_ENDPOINT)
    return endpoint
