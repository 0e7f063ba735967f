"""KV-cache events from outside: a ZMQ subscriber written here (pyzmq + msgpack, no simulator
code) decodes both of vLLM's encodings and the replay socket, and the events it sees follow the
replica's real prefix cache (what it reports as cached tokens)."""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgpack
import pytest
import zmq
import zmq.asyncio

from loadtest.text import sized_text
from tests.sim.conftest import client_for
from vllm_sim.profiles import Profile, StepCost
from vllm_sim.server import KVEventsConfig, Replica, SimConfig, run_replicas

BLOCK = 16
# 64 blocks of 16 tokens: a few prompts evict each other.
SMALL = Profile("kv-test", "kv-model", StepCost(1.0, 0.001, 0.01, 0.001), num_gpu_blocks=64,
                max_num_batched_tokens=1024, max_num_seqs=8, max_model_len=1024)  # fmt: skip
STORED_FIELDS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
)
REMOVED_FIELDS = ("block_hashes", "medium")
WAIT = 2.0  # seconds a test waits for a message it expects


def decode(payload: bytes) -> tuple[float, list[dict[str, Any]], int]:
    """An EventBatch in either encoding: [ts, events, rank] with events as [type, *fields], or
    {ts, events, data_parallel_rank} with events as {type, **fields}."""
    batch = msgpack.unpackb(payload)
    if isinstance(batch, dict):
        return batch["ts"], batch["events"], batch["data_parallel_rank"]
    ts, raw, rank = batch
    events = []
    for kind, *values in raw:
        names = {"BlockStored": STORED_FIELDS, "BlockRemoved": REMOVED_FIELDS}.get(kind, ())
        events.append({"type": kind, **dict(zip(names, values, strict=True))})
    return ts, events, rank


@dataclass
class Subscriber:
    socket: zmq.asyncio.Socket
    batches: list[tuple[bytes, int, bytes]] = field(default_factory=list)  # topic, seq, payload
    live: dict[int, tuple[int, ...]] = field(default_factory=dict)  # cached hash -> its tokens so far
    removed: set[int] = field(default_factory=set)  # every hash a BlockRemoved named

    async def next_event(self, kind: str) -> dict[str, Any]:
        """Receive until an event of `kind` arrives (earlier ones are applied too)."""
        while True:
            if not await self.socket.poll(WAIT * 1000):
                raise TimeoutError(f"no {kind} event within {WAIT} s")
            topic, seq, payload = await self.socket.recv_multipart()
            self.batches.append((topic, int.from_bytes(seq, "big"), payload))
            found = None
            for event in decode(payload)[1]:
                self.apply(event)
                if event["type"] == kind and found is None:
                    found = event
            if found is not None:
                return found

    def apply(self, event: dict[str, Any]) -> None:
        if event["type"] == "BlockStored":
            prefix = self.live.get(event["parent_block_hash"], ()) if event["parent_block_hash"] else ()
            tokens = event["token_ids"]
            for i, block_hash in enumerate(event["block_hashes"]):
                prefix = (*prefix, *tokens[i * BLOCK : (i + 1) * BLOCK])
                self.live[block_hash] = prefix
        elif event["type"] == "BlockRemoved":
            for block_hash in event["block_hashes"]:
                self.live.pop(block_hash)
            self.removed |= set(event["block_hashes"])
        else:
            self.live.clear()

    def cached_blocks(self, ids: list[int]) -> int:
        """Leading full blocks of `ids` the events say are cached (compared by tokens)."""
        cached = {tokens for tokens in self.live.values()}
        full = (len(ids) - 1) // BLOCK  # a hit never covers the prompt's last token
        return next((i for i in range(full) if tuple(ids[: (i + 1) * BLOCK]) not in cached), full)


async def complete(http: httpx.AsyncClient, prompt: str, **extra: Any) -> dict[str, Any]:
    response = await http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, **extra})
    assert response.status_code == 200, response.text
    usage: dict[str, Any] = response.json()["usage"]
    return usage


async def token_ids(http: httpx.AsyncClient, prompt: str) -> list[int]:
    ids: list[int] = (await http.post("/tokenize", json={"prompt": prompt})).json()["tokens"]
    return ids


@pytest.fixture(params=["array", "map"])
async def replica(request: pytest.FixtureRequest) -> AsyncIterator[Replica]:
    events = KVEventsConfig(port=0, replay_port=0, encoding=request.param, topic="kv@test")
    config = SimConfig(lora_adapters=("adapter",), kv_events=events)
    async with run_replicas(profiles=SMALL, config=config) as (running,):
        yield running


@pytest.fixture
async def http(replica: Replica) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(replica) as client:
        yield client


@pytest.fixture
async def subscriber(replica: Replica, http: httpx.AsyncClient) -> AsyncIterator[Subscriber]:
    """A SUB socket that has provably joined: a PUB drops what is sent before a subscriber's
    subscription arrives, so warm-up requests are sent until one's events come through."""
    assert replica.kv_events is not None
    socket = zmq.asyncio.Context.instance().socket(zmq.SUB)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.connect(replica.kv_events.endpoint)
    subscriber = Subscriber(socket)
    rng = random.Random(99)
    try:
        for _ in range(20):
            await complete(http, sized_text(rng, 40))
            if await socket.poll(250):
                break
        else:
            raise TimeoutError("the subscriber never received an event")
        await http.post("/reset_prefix_cache")  # start from an empty cache, as the subscriber sees it
        await subscriber.next_event("AllBlocksCleared")
        yield subscriber
    finally:
        socket.close(linger=0)


async def test_stored_blocks_carry_the_prompts_tokens_and_hash_chain(
    http: httpx.AsyncClient, subscriber: Subscriber
) -> None:
    prompt = sized_text(random.Random(1), 100)
    await complete(http, prompt)
    stored = await subscriber.next_event("BlockStored")
    ids = await token_ids(http, prompt)  # 101 tokens with BOS: 6 full blocks
    assert stored["token_ids"] == ids[:96] and len(stored["block_hashes"]) == 6
    assert stored["parent_block_hash"] is None and stored["block_size"] == BLOCK
    assert (stored["medium"], stored["lora_id"], stored["lora_name"]) == ("GPU", None, None)
    assert all(isinstance(h, int) and 0 <= h < 2**64 for h in stored["block_hashes"])
    assert len(set(stored["block_hashes"])) == 6

    # The same prompt again: its blocks are hits, nothing new is stored but the decode block.
    longer = prompt + " and more words for another block or two of the state"
    usage = await complete(http, longer)
    extension = await subscriber.next_event("BlockStored")
    assert usage["prompt_tokens_details"]["cached_tokens"] == 96
    assert extension["parent_block_hash"] == stored["block_hashes"][-1]
    assert (
        extension["token_ids"]
        == (await token_ids(http, longer))[96 : 96 + 16 * len(extension["block_hashes"])]
    )

    await complete(http, prompt, model="adapter")
    adapter = await subscriber.next_event("BlockStored")
    assert adapter["token_ids"] == ids[:96] and (adapter["lora_id"], adapter["lora_name"]) == (1, "adapter")
    assert set(adapter["block_hashes"]).isdisjoint(stored["block_hashes"])  # the adapter salts the hash

    topics = {topic for topic, _, _ in subscriber.batches}
    seqs = [seq for _, seq, _ in subscriber.batches]
    assert topics == {b"kv@test"} and seqs == list(range(seqs[0], seqs[0] + len(seqs)))


async def test_eviction_removes_blocks_and_the_events_track_the_cache(
    http: httpx.AsyncClient, subscriber: Subscriber
) -> None:
    """Every request below has new blocks to store, so its step's batch (evictions first, then
    stores) ends with a BlockStored: waiting for that one applies all of the step's events."""
    rng = random.Random(2)
    prompts = [sized_text(rng, 300)]
    await complete(http, prompts[0])
    first = set((await subscriber.next_event("BlockStored"))["block_hashes"])
    while not subscriber.removed & first:  # 300-token prompts soon overflow the 1,024-token cache
        assert len(prompts) < 8, "the first prompt was never evicted"
        prompts.append(sized_text(rng, 300))
        await complete(http, prompts[-1])
        await subscriber.next_event("BlockStored")
    assert len(subscriber.live) <= SMALL.num_gpu_blocks

    # What the events say is cached is what the replica finds cached, prompt after prompt.
    found = []
    for head in (prompts[0], prompts[-1], ""):
        prompt = head + sized_text(rng, 40, lead_space=bool(head))
        ids = await token_ids(http, prompt)
        found.append(subscriber.cached_blocks(ids) * BLOCK)
        usage = await complete(http, prompt)
        assert usage["prompt_tokens_details"]["cached_tokens"] == found[-1]
        await subscriber.next_event("BlockStored")
    # The evicted first prompt is (at most partly) cached, the last one wholly, a new one not at all.
    assert found[0] < 288 and found[1:] == [288, 0]


async def test_reset_clears_everything(http: httpx.AsyncClient, subscriber: Subscriber) -> None:
    prompt = sized_text(random.Random(3), 64)
    await complete(http, prompt)
    await subscriber.next_event("BlockStored")
    assert (await http.post("/reset_prefix_cache")).status_code == 200
    cleared = await subscriber.next_event("AllBlocksCleared")
    assert cleared == {"type": "AllBlocksCleared"} and subscriber.live == {}
    usage = await complete(http, prompt)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0


async def test_replay_sends_every_buffered_batch_then_the_end_marker(
    replica: Replica, http: httpx.AsyncClient, subscriber: Subscriber
) -> None:
    rng = random.Random(4)
    for _ in range(3):
        await complete(http, sized_text(rng, 50))
        await subscriber.next_event("BlockStored")
    assert replica.kv_events is not None and replica.kv_events.replay_endpoint
    dealer = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    dealer.connect(replica.kv_events.replay_endpoint)
    try:
        await dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        replayed: dict[int, bytes] = {}
        for _ in itertools.count():
            assert await dealer.poll(WAIT * 1000), "the replay stopped before its end marker"
            empty, seq, payload = await dealer.recv_multipart()
            number = int.from_bytes(seq, "big", signed=True)
            if number == -1:
                assert (empty, payload) == (b"", b"")
                break
            replayed[number] = payload
        assert list(replayed) == list(range(len(replayed)))  # from 0, in order, none missing
        assert all(replayed[seq] == payload for _, seq, payload in subscriber.batches)
        later = subscriber.batches[-1][1]
        await dealer.send_multipart([b"", later.to_bytes(8, "big")])
        _, seq, payload = await dealer.recv_multipart()
        assert (int.from_bytes(seq, "big"), payload) == (later, subscriber.batches[-1][2])
        _, end, _ = await dealer.recv_multipart()
        assert end == (-1).to_bytes(8, "big", signed=True)
    finally:
        dealer.close(linger=0)
