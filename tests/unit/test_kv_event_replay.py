"""Following an engine's KV events over real ZMQ sockets: breaks in the sequence filled from the
engine's replay socket, or the endpoint's entries dropped when they cannot be."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgpack
import pytest
import zmq
import zmq.asyncio

from loadtest.processes import poll_until
from picker.datalayer.endpoint import Endpoint
from picker.datalayer.kv_events import KVEventSubscriber
from picker.datalayer.pool import EndpointPool
from picker.scheduling.prefix import KVBlockIndex
from picker.telemetry import REGISTRY

END = (-1).to_bytes(8, "big", signed=True)


def stored(*hashes: int) -> bytes:
    return msgpack.packb([1.0, [["BlockStored", list(hashes), None, [], 16, None, "GPU"]], 0])


class Publisher:
    """vLLM's publisher as seen from outside: a PUB socket (an XPUB, so the test knows when the
    subscriber has joined) and a ROUTER replay socket serving what `buffer` holds."""

    def __init__(self) -> None:
        context = zmq.asyncio.Context.instance()
        self.pub, self.router = context.socket(zmq.XPUB), context.socket(zmq.ROUTER)
        for socket in (self.pub, self.router):
            socket.setsockopt(zmq.LINGER, 0)
            socket.bind("tcp://127.0.0.1:*")
        self.buffer: dict[int, bytes] = {}
        self.replays: list[int] = []  # the start of each replay asked for

    def address(self, socket: zmq.asyncio.Socket) -> str:
        return str(socket.getsockopt_string(zmq.LAST_ENDPOINT))

    def publish(self, seq: int, payload: bytes, *, sent: bool = True) -> None:
        """Buffer batch `seq` for replay and, unless the subscriber is to miss it, send it."""
        self.buffer[seq] = payload
        if sent:
            self.pub.send_multipart((b"", seq.to_bytes(8, "big"), payload))

    async def serve_replays(self) -> None:
        while True:
            client, _, start = await self.router.recv_multipart()
            self.replays.append(int.from_bytes(start, "big"))
            for seq in sorted(s for s in self.buffer if s >= self.replays[-1]):
                await self.router.send_multipart((client, b"", seq.to_bytes(8, "big"), self.buffer[seq]))
            await self.router.send_multipart((client, b"", END, b""))

    def close(self) -> None:
        self.pub.close()
        self.router.close()


@pytest.fixture
async def publisher() -> AsyncIterator[Publisher]:
    publisher = Publisher()
    serving = asyncio.create_task(publisher.serve_replays())
    yield publisher
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)
    publisher.close()


@contextlib.asynccontextmanager
async def following(publisher: Publisher, index: KVBlockIndex, *, replay: bool) -> AsyncIterator[Endpoint]:
    """Subscribe to `publisher` as one endpoint's engine, entered once the subscription has joined."""
    pool = EndpointPool()
    pool.set_addresses(["10.0.0.1:8000"])
    (endpoint,) = pool.endpoints
    replay_socket = publisher.address(publisher.router) if replay else None
    subscriber = KVEventSubscriber(
        pool, index, lambda ep: publisher.address(publisher.pub), replay_of=lambda ep: replay_socket
    )
    task = asyncio.create_task(subscriber.run())
    try:
        await publisher.pub.recv()  # the subscription message: from here on nothing sent is missed
        yield endpoint
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def gaps(endpoint: Endpoint) -> float:
    return REGISTRY.get_sample_value("picker_kv_event_gaps_total", {"endpoint": endpoint.address}) or 0.0


async def held(index: KVBlockIndex, endpoint: Endpoint, blocks: list[int], holding: list[int]) -> None:
    """Wait until `endpoint` holds exactly `holding` of `blocks` (each block its own prefix)."""

    async def probe() -> bool | None:
        now = [block for block in blocks if index.match([block])]
        return True if now == holding and index.held(endpoint) == len(holding) else None

    await poll_until(probe, within=5.0, what=f"blocks {holding} held")


async def test_a_missed_batch_is_filled_from_the_replay_socket(publisher: Publisher) -> None:
    index = KVBlockIndex()
    async with following(publisher, index, replay=True) as endpoint:
        before = gaps(endpoint)
        publisher.publish(0, stored(1))
        publisher.publish(1, stored(2), sent=False)  # lost on the way: only the replay socket has it
        publisher.publish(2, stored(3))
        await held(index, endpoint, [1, 2, 3], [1, 2, 3])
    assert publisher.replays == [1] and gaps(endpoint) == before + 1


async def test_a_break_nothing_fills_drops_what_the_endpoint_held(publisher: Publisher) -> None:
    index = KVBlockIndex()
    async with following(publisher, index, replay=False) as endpoint:
        publisher.publish(0, stored(1))
        await held(index, endpoint, [1, 2, 3], [1])
        publisher.publish(1, stored(2), sent=False)
        publisher.publish(2, stored(3))
        await held(index, endpoint, [1, 2, 3], [3])  # 1 may have been evicted in the batch it missed
    assert publisher.replays == []


async def test_the_first_batch_brings_in_what_the_engine_stored_before_the_picker_came(
    publisher: Publisher,
) -> None:
    for seq in range(3):
        publisher.publish(seq, stored(seq + 1), sent=False)  # before the picker subscribed
    index = KVBlockIndex()
    async with following(publisher, index, replay=True) as endpoint:
        before = gaps(endpoint)
        publisher.publish(3, stored(4))
        await held(index, endpoint, [1, 2, 3, 4], [1, 2, 3, 4])
    assert publisher.replays == [0] and gaps(endpoint) == before  # a start, not a break
