"""Follow every engine's KV-cache events (vLLM's ZMQ publisher) into the precise prefix index.

vLLM (`--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint":
"tcp://*:5557"}'`) publishes each engine step's events on a PUB socket as `[topic, seq, payload]`:
`seq` an 8-byte big-endian counter, `payload` a msgpack EventBatch `(ts, events, rank)` whose events
are BlockStored (the new blocks' hashes), BlockRemoved (evicted hashes) and AllBlocksCleared, either
as arrays tagged by their first item or as maps with a `type` (vLLM has published both).

Every picker subscribes to every endpoint on its own socket (the engine does not say which
publisher a message came from on a shared one), so any number of active pickers hold the same
index, with nothing exchanged between them. A break in an endpoint's sequence means lost batches:
its entries are dropped, since they may now name evicted blocks, and rebuilt from what it stores
next. So are they when it leaves the pool. Blocks stored before a picker subscribed are unknown
to it until they are stored again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import msgpack
import zmq
import zmq.asyncio

from picker.datalayer.endpoint import Endpoint
from picker.datalayer.pool import EndpointPool
from picker.telemetry import KV_EVENT_GAPS, KV_EVENTS
from picker.tokenization import external_hash

log = logging.getLogger(__name__)

RECONCILE_INTERVAL = 1.0  # seconds between matching subscriptions to the pool's endpoints
GPU_MEDIA = (None, "GPU")  # events about other tiers (CPU offload) say nothing of the GPU cache


class BlockSink(Protocol):
    """Where events go (the precise prefix index)."""

    def stored(self, endpoint: Endpoint, hashes: Sequence[int]) -> None: ...
    def removed(self, endpoint: Endpoint, hashes: Sequence[int]) -> None: ...
    def cleared(self, endpoint: Endpoint) -> None: ...


class KVEventSubscriber:
    """One SUB socket per endpoint, each read by its own task, all feeding one index."""

    def __init__(
        self,
        pool: EndpointPool,
        index: BlockSink,
        address_of: Callable[[Endpoint], str],
        topic: str = "",
    ) -> None:
        self.pool = pool
        self.index = index
        self.address_of = address_of  # endpoint -> its publisher, e.g. tcp://10.0.0.7:5557
        self.topic = topic.encode()  # subscribe to messages whose topic starts with this
        self._context = zmq.asyncio.Context.instance()
        self._followers: dict[Endpoint, asyncio.Task[None]] = {}
        self.subscribed = asyncio.Event()  # set once every endpoint known has a subscription

    async def run(self) -> None:
        try:
            while True:
                self.reconcile()
                await asyncio.sleep(RECONCILE_INTERVAL)
        finally:
            for task in self._followers.values():
                task.cancel()
            await asyncio.gather(*self._followers.values(), return_exceptions=True)
            self._followers.clear()

    def reconcile(self) -> None:
        """Subscribe to endpoints that joined the pool, unsubscribe from those that left."""
        current = set(self.pool.endpoints)
        for endpoint in list(self._followers):
            if endpoint not in current:
                self._followers.pop(endpoint).cancel()
        for endpoint in current - self._followers.keys():
            name = f"kv events {endpoint.address}"
            self._followers[endpoint] = asyncio.create_task(self._follow(endpoint), name=name)
        if current:
            self.subscribed.set()

    async def _follow(self, endpoint: Endpoint) -> None:
        socket = self._context.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SUBSCRIBE, self.topic)
        socket.connect(self.address_of(endpoint))  # ZMQ reconnects by itself if the engine restarts
        expected: int | None = None
        try:
            while True:
                frames = await socket.recv_multipart()
                if len(frames) != 3 or len(frames[1]) != 8:
                    continue  # not vLLM's [topic, seq, payload]
                seq = int.from_bytes(frames[1], "big")
                if expected is not None and seq != expected:
                    KV_EVENT_GAPS.labels(endpoint.address).inc()
                    self.index.cleared(endpoint)  # lost stores or removals: start over from here
                expected = seq + 1
                try:
                    self.apply(endpoint, frames[2])
                except (ValueError, TypeError, KeyError, IndexError) as exc:
                    log.warning("%s: unreadable KV event batch dropped (%s)", endpoint.address, exc)
        finally:
            socket.close()
            self.index.cleared(endpoint)  # unfollowed: what it holds from now on is unknown

    def apply(self, endpoint: Endpoint, payload: bytes) -> None:
        """Apply one EventBatch (either encoding) to the index."""
        batch = msgpack.unpackb(payload, strict_map_key=False)
        events = batch["events"] if isinstance(batch, dict) else batch[1]
        index, address = self.index, endpoint.address
        for event in events:
            if isinstance(event, dict):
                kind, hashes, medium = event["type"], event.get("block_hashes"), event.get("medium")
            else:
                kind = event[0]
                hashes = event[1] if len(event) > 1 else None
                at = 6 if kind == "BlockStored" else 2  # medium's place in each array form
                medium = event[at] if len(event) > at else None
            if medium not in GPU_MEDIA:
                continue
            if kind == "BlockStored":
                index.stored(endpoint, [external_hash(h) for h in hashes])
            elif kind == "BlockRemoved":
                index.removed(endpoint, [external_hash(h) for h in hashes])
            elif kind == "AllBlocksCleared":
                index.cleared(endpoint)
            else:
                continue
            KV_EVENTS.labels(address, kind).inc()
