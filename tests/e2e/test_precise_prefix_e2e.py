"""The precise prefix index from the simulator's real KV events: in-process against replicas that
publish them, and through two active picker processes behind Envoy."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest

from loadtest.processes import SimProcess, free_ports, poll_until
from loadtest.stack import precise_config
from loadtest.text import sized_text
from picker.datalayer.pool import EndpointPool
from picker.request import InferenceRequest, apply_body
from picker.scheduling.precise_prefix import PrecisePrefixCacheScorer
from vllm_sim.profiles import Profile, StepCost
from vllm_sim.server import KVEventsConfig, SimConfig, run_replicas
from vllm_sim.tokenizer import DEFAULT_CHAT_TEMPLATE, DEFAULT_TOKENIZER

MODEL = "sim-model"
PROFILE = Profile("precise-test", MODEL, StepCost(1.0, 0.001, 0.01, 0.001), num_gpu_blocks=512,
                  max_num_batched_tokens=2048, max_num_seqs=16, max_model_len=4096)  # fmt: skip


def chat(system: str, question: str) -> dict[str, object]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return {"model": MODEL, "messages": messages, "max_tokens": 4}


def request_for(body: dict[str, object]) -> InferenceRequest:
    request = InferenceRequest(method="POST", path="/v1/chat/completions", content_type="application/json")
    apply_body(request, orjson.dumps(body), 1 << 20)
    return request


async def send(http: httpx.AsyncClient, url: str, body: dict[str, object]) -> str:
    response = await http.post(url + "/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.headers["x-sim-replica"]


@pytest.fixture
async def publishing() -> AsyncIterator[list[tuple[str, str]]]:
    """Two in-process replicas publishing KV events: (address, publisher) of each."""
    config = SimConfig(kv_events=KVEventsConfig(port=0))
    async with run_replicas(2, profiles=PROFILE, config=config) as replicas:
        yield [(r.address, r.kv_events.endpoint) for r in replicas if r.kv_events]


async def test_the_index_follows_what_a_replica_caches_and_evicts_without_the_picker(publishing) -> None:
    pool = EndpointPool()
    pool.set_addresses([address for address, _ in publishing])
    scorer = PrecisePrefixCacheScorer(
        pool, tokenizer=str(DEFAULT_TOKENIZER), chat_template=str(DEFAULT_CHAT_TEMPLATE),
        kv_events_endpoints=dict(publishing), expect_seconds=0.0, hash_algorithm="xxh3_64",
    )  # fmt: skip
    following = asyncio.create_task(scorer.run())
    rng = random.Random(5)
    system = sized_text(rng, 600)
    other, target = pool.endpoints
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            # Sent straight to one replica, past any picker: only its events can tell.
            async def cached() -> bool | None:
                await send(http, f"http://{target.address}", chat(system, sized_text(rng, 20)))
                return True if scorer.index.held(target) else None  # a SUB joins a moment late

            await poll_until(cached, within=10.0, what="KV events from the replica")
            scores = scorer.score(request_for(chat(system, "a new question")), pool.endpoints)
            assert scores is not None and scores[0] == 0 and scores[1] > 0.9
            assert scorer.index.held(other) == 0
            response = await http.post(f"http://{target.address}/reset_prefix_cache")
            assert response.status_code == 200

            async def forgotten() -> bool | None:
                return True if scorer.index.held(target) == 0 else None

            await poll_until(forgotten, within=5.0, what="AllBlocksCleared applied")
            assert scorer.score(request_for(chat(system, "a new question")), pool.endpoints) is None
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)


async def test_a_picker_that_starts_late_learns_what_the_replica_cached_before_from_its_replay() -> None:
    config = SimConfig(kv_events=KVEventsConfig(port=0, replay_port=0))
    async with (
        run_replicas(1, profiles=PROFILE, config=config) as (replica,),
        httpx.AsyncClient(timeout=10) as http,
    ):
        assert replica.kv_events is not None and replica.kv_events.replay_endpoint is not None
        rng = random.Random(7)
        system = sized_text(rng, 600)
        await send(http, f"http://{replica.address}", chat(system, sized_text(rng, 20)))  # no picker yet
        pool = EndpointPool()
        pool.set_addresses([replica.address])
        scorer = PrecisePrefixCacheScorer(
            pool, tokenizer=str(DEFAULT_TOKENIZER), chat_template=str(DEFAULT_CHAT_TEMPLATE),
            kv_events_endpoints={replica.address: replica.kv_events.endpoint},
            kv_events_replay_endpoints={replica.address: replica.kv_events.replay_endpoint},
            expect_seconds=0.0, hash_algorithm="xxh3_64",
        )  # fmt: skip
        following = asyncio.create_task(scorer.run())
        try:
            # Unrelated traffic makes the replica publish; the first batch the picker gets brings
            # in the ones before it.
            async def learned() -> bool | None:
                await send(http, f"http://{replica.address}", chat(sized_text(rng, 40), "hi"))
                scores = scorer.score(request_for(chat(system, "a new question")), pool.endpoints)
                return True if scores and scores[0] > 0.9 else None

            await poll_until(learned, within=10.0, what="the replica's earlier blocks from its replay")
        finally:
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)


async def test_two_active_precise_pickers_send_each_prefix_to_one_replica(
    picker_server, envoy, client, tmp_path: Path
) -> None:
    base = free_ports(4)
    args = ("--replicas", "4", "--port", "0", "--speed", "20", "--kv-events-port", str(base))
    async with SimProcess(*args) as sim:
        publishers = {address: f"tcp://127.0.0.1:{base + i}" for i, address in enumerate(sim.addresses)}
        config = tmp_path / "precise.yaml"
        config.write_bytes(orjson.dumps(precise_config(publishers)))
        pickers = [await picker_server(sim.addresses, f"--config-file={config}") for _ in range(2)]
        proxy = await envoy("picker", endpoints=sim.addresses, picker=[p.address for p in pickers])
        rng = random.Random(6)
        groups = [sized_text(rng, 800) for _ in range(6)]
        model = (await client.get(f"http://{sim.addresses[0]}/v1/models")).json()["data"][0]["id"]
        served: dict[int, set[str]] = defaultdict(set)
        for turn in range(5):
            for g, system in enumerate(groups):
                body = chat(system, f"Question {turn} of team {g}?") | {"model": model}
                served[g].add(await send(client, proxy.url, body))
        # Whichever picker Envoy asked, a group's later turns found the replica its first turn
        # filled: the first turn's picker expected it, the other one read the replica's events.
        assert all(len(where) == 1 for where in served.values()), served
        assert len(set().union(*served.values())) > 1
