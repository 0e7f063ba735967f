"""Follow every engine's KV-cache events (vLLM's ZMQ publisher) into the precise prefix index.

vLLM (`--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint":
"tcp://*:5557"}'`) publishes each engine step's events on a PUB socket as `[topic, seq, payload]`:
`seq` an 8-byte big-endian counter, `payload` a msgpack EventBatch `(ts, events, rank)` whose events
are BlockStored (the new blocks' hashes), BlockRemoved (evicted hashes) and AllBlocksCleared, either
as arrays tagged by their first item or as maps with a `type` (vLLM has published both).

Every picker subscribes to every endpoint on its own socket (the engine does not say which
publisher a message came from on a shared one), so any number of active pickers hold the same
index, with nothing exchanged between them. vLLM can also serve its last `buffer_steps` (10,000)
batches on a ROUTER replay socket (`"replay_endpoint": "tcp://*:5558"`): where one is configured, a
picker's first batch from an endpoint brings in the buffered ones before it (what the engine stored
before this picker started, and the messages a new subscription misses while it joins), and a
break in the sequence is filled from it. A break nothing fills means lost batches: the endpoint's
entries are dropped, since they may now name evicted blocks, and rebuilt from what it stores
next. So are they when it leaves the pool.
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
REPLAY_TIMEOUT = 2.0  # seconds a replay may take before the batches it did not bring count as lost
_REPLAY_END = -1  # the sequence number of vLLM's end-of-replay marker
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
        replay_of: Callable[[Endpoint], str | None] = lambda endpoint: None,
    ) -> None:
        self.pool = pool
        self.index = index
        self.address_of = address_of  # endpoint -> its publisher, e.g. tcp://10.0.0.7:5557
        self.replay_of = replay_of  # endpoint -> its replay socket, e.g. tcp://10.0.0.7:5558, or None
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
                if seq != expected:
                    await self._catch_up(endpoint, expected, seq)
                expected = seq + 1
                self._apply_readable(endpoint, frames[2])
        finally:
            socket.close()
            self.index.cleared(endpoint)  # unfollowed: what it holds from now on is unknown

    async def _catch_up(self, endpoint: Endpoint, expected: int | None, seq: int) -> None:
        """Batch `seq` arrived where `expected` was due (None: the subscription's first): apply the
        batches just before it that the replay socket still has. Unless they reach back to
        `expected`, batches were lost (or the engine restarted, counting from 0 again): the
        endpoint's entries are dropped first."""
        start = 0 if expected is None else expected
        first, replayed = await self._replay(endpoint, start, seq) if start < seq else (seq, [])
        if expected is not None:
            KV_EVENT_GAPS.labels(endpoint.address).inc()
            if first != expected:  # lost stores or removals: start over from here
                self.index.cleared(endpoint)
        for payload in replayed:
            self._apply_readable(endpoint, payload)

    async def _replay(self, endpoint: Endpoint, start: int, stop: int) -> tuple[int, list[bytes]]:
        """The endpoint's buffered batches from `start` on that run without a hole up to `stop`
        (excluded), and the first one's number (`stop`: none)."""
        address = self.replay_of(endpoint)
        if address is None:
            return stop, []
        socket = self._context.socket(zmq.DEALER)  # one per replay: a late answer cannot mix in
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(address)
        first, batches = stop, []
        try:
            async with asyncio.timeout(REPLAY_TIMEOUT):
                await socket.send_multipart((b"", start.to_bytes(8, "big")))
                while True:
                    frames = await socket.recv_multipart()  # [empty delimiter, seq, payload]
                    if len(frames) != 3 or len(frames[1]) != 8:
                        continue
                    seq = int.from_bytes(frames[1], "big", signed=True)
                    if seq == _REPLAY_END or seq >= stop:
                        break
                    if seq != first + len(batches):  # the first, or after a hole: a run starts
                        first, batches = seq, []
                    batches.append(frames[2])
        except TimeoutError:
            log.warning("%s: KV event replay from %s timed out", endpoint.address, address)
        finally:
            socket.close()
        if first + len(batches) != stop:  # a hole just before `stop`: nothing here can be applied
            return stop, []
        return first, batches

    def _apply_readable(self, endpoint: Endpoint, payload: bytes) -> None:
        try:
            self.apply(endpoint, payload)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            log.warning("%s: unreadable KV event batch dropped (%s)", endpoint.address, exc)

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
