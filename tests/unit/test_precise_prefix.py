"""The precise prefix index: KV events applied, the engine's tokens and block hashes reproduced,
expectations for routed requests, and the scorer's configuration checks."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

import cbor2
import msgpack
import orjson
import pytest
import xxhash
import yaml

from loadtest.stack import precise_config
from loadtest.text import sized_text
from picker.config import Config
from picker.datalayer.endpoint import Endpoint
from picker.datalayer.kv_events import KVEventSubscriber
from picker.datalayer.pool import EndpointPool
from picker.request import InferenceRequest, apply_body
from picker.scheduling.precise_prefix import PrecisePrefixCacheScorer
from picker.scheduling.prefix import KVBlockIndex
from picker.scheduling.registry import effective_document
from picker.tokenization import BlockHasher, PromptTokenizer, external_hash
from vllm_sim.tokenizer import DEFAULT_CHAT_TEMPLATE, DEFAULT_TOKENIZER, SimTokenizer
from vllm_sim.tokens import TokenSequence

A, B = Endpoint("10.0.0.1:8000"), Endpoint("10.0.0.2:8000")


@pytest.fixture(scope="module")
def engine() -> SimTokenizer:
    return SimTokenizer()


@pytest.fixture(scope="module")
def prompts() -> PromptTokenizer:
    return PromptTokenizer(DEFAULT_TOKENIZER, DEFAULT_CHAT_TEMPLATE)


def test_match_counts_leading_blocks_each_endpoint_reported() -> None:
    index = KVBlockIndex()
    index.stored(A, [1, 2, 3])
    index.stored(B, [1])
    assert index.match([1, 2, 3, 4]) == {A: 3, B: 1}
    index.removed(A, [2])  # evicted from the middle: only the run before it is usable
    assert index.match([1, 2, 3]) == {A: 1, B: 1}
    index.removed(A, [1])  # a later block still held does not make a prefix
    assert index.match([1, 2, 3]) == {B: 1}
    index.cleared(B)
    assert index.match([1, 2, 3]) == {}
    assert len(index) == 1 and index.held(A) == 1  # block 3, unreachable without 1 and 2


def test_expected_blocks_count_until_their_deadline_unless_reported() -> None:
    index = KVBlockIndex()
    index.expect(A, [1, 2], until=10.0)
    index.expect(B, [1, 2, 3], until=11.0)
    index.stored(B, [1, 2])  # B's engine confirms two of the three
    assert index.match([1, 2, 3]) == {A: 2, B: 3}
    index.expire(10.0)
    assert index.match([1, 2, 3]) == {B: 3}
    index.expire(11.0)  # B's unconfirmed third block goes, the reported ones stay
    assert index.match([1, 2, 3]) == {B: 2}
    index.expect(A, [7], until=20.0)
    index.removed(A, [7])  # an engine's word settles an expectation either way
    index.expire(30.0)
    assert index.held(A) == 0


def test_dropping_an_endpoint_frees_its_slot_for_the_next() -> None:
    index = KVBlockIndex()
    index.stored(A, [1, 2])
    index.drop_endpoint(A)
    index.stored(B, [1])
    assert index.match([1, 2]) == {B: 1} and len(index) == 1


def _batch(encoding: str, *events: tuple[str, list[int], str | None]) -> bytes:
    encoded: list[object] = []
    for kind, hashes, medium in events:
        if encoding == "map":
            encoded.append({"type": kind, "block_hashes": hashes, "medium": medium})
        elif kind == "BlockStored":
            encoded.append([kind, hashes, None, [0] * 16 * len(hashes), 16, None, medium, None])
        elif kind == "BlockRemoved":
            encoded.append([kind, hashes, medium])
        else:
            encoded.append([kind])
    if encoding == "map":
        return msgpack.packb({"ts": 1.0, "events": encoded, "data_parallel_rank": 0})
    return msgpack.packb([1.0, encoded, 0])


@pytest.mark.parametrize("encoding", ["array", "map"])
def test_both_of_vllms_encodings_apply_and_other_media_are_ignored(encoding: str) -> None:
    index = KVBlockIndex()
    subscriber = KVEventSubscriber(EndpointPool(), index, lambda ep: "")
    subscriber.apply(A, _batch(encoding, ("BlockStored", [1, 2, 3], "GPU"), ("BlockRemoved", [3], "GPU")))
    subscriber.apply(A, _batch(encoding, ("BlockStored", [9], "CPU"), ("BlockRemoved", [1], "CPU")))
    assert index.match([1, 2, 3]) == {A: 2} and index.held(A) == 2
    subscriber.apply(A, _batch(encoding, ("AllBlocksCleared", [], None)))
    assert index.held(A) == 0


def test_xxh3_block_hashes_are_the_simulators(engine: SimTokenizer) -> None:
    ids = engine.encode(sized_text(random.Random(1), 100))
    hasher = BlockHasher("xxh3_64")
    assert hasher.hashes(ids, 16) == TokenSequence(ids, 16).hashes
    assert hasher.hashes(ids, 16, "adapter") == TokenSequence(ids, 16, salt="adapter").hashes
    assert hasher.hashes(ids, 16, "adapter") != hasher.hashes(ids, 16)


def sha256_cbor(value: object) -> bytes:
    return hashlib.sha256(cbor2.dumps(value, canonical=True)).digest()


def xxhash_cbor(value: object) -> bytes:
    return xxhash.xxh3_128_digest(cbor2.dumps(value, canonical=True))


@pytest.mark.parametrize(
    ("algorithm", "digest"), [("sha256_cbor", sha256_cbor), ("xxhash_cbor", xxhash_cbor)]
)
def test_cbor_block_hashes_chain_as_vllms(algorithm: str, digest: Callable[[object], bytes]) -> None:
    """vLLM's hash_block_tokens: the hash of the CBOR of (parent digest, block ids, extra keys),
    the first parent the hash of the PYTHONHASHSEED; KV events carry the digest's low 64 bits."""
    ids = list(range(40))
    none = digest("0")
    first = digest((none, tuple(range(16)), None))
    second = digest((first, tuple(range(16, 32)), None))
    low = [int.from_bytes(d, "big") & (2**64 - 1) for d in (first, second)]
    assert BlockHasher(algorithm, "0").hashes(ids, 16) == low  # 40 ids: two full blocks
    assert external_hash(second) == low[1] and external_hash(low[1]) == low[1]
    seeded = digest((digest("42"), tuple(range(16)), ("adapter",)))
    assert BlockHasher(algorithm, "42").hashes(ids, 16, "adapter")[0] == external_hash(seeded)
    # Without PYTHONHASHSEED vLLM seeds from random bytes: nothing could match, so refuse.
    with pytest.raises(ValueError, match="hashSeed is required"):
        BlockHasher(algorithm)
    with pytest.raises(ValueError, match="hashAlgorithm"):
        BlockHasher("md5")


def test_chat_and_completion_prompts_tokenize_as_the_engine_does(
    engine: SimTokenizer, prompts: PromptTokenizer
) -> None:
    rng = random.Random(2)
    system, question = sized_text(rng, 300), sized_text(rng, 40)
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": [{"type": "text", "text": question}, {"type": "text", "text": "ok"}]},
    ]
    engine_messages = [{"role": "system", "content": system}, {"role": "user", "content": question + "\nok"}]
    assert prompts.prompt_ids({"messages": messages}, 10_000) == engine.prompt_ids(messages=engine_messages)
    again = prompts.prompt_ids({"messages": messages}, 10_000)  # the segments now come remembered
    assert again == engine.prompt_ids(messages=engine_messages)
    text = sized_text(rng, 200)
    assert prompts.prompt_ids({"prompt": text}, 10_000) == engine.prompt_ids(prompt=text)
    assert prompts.prompt_ids({"prompt": [text]}, 10_000) == engine.prompt_ids(prompt=text)
    assert prompts.prompt_ids({"prompt": [5, 6, 7]}, 2) == [5, 6]


def test_a_long_prompt_is_cut_to_a_prefix_of_its_tokens(
    engine: SimTokenizer, prompts: PromptTokenizer
) -> None:
    rng = random.Random(3)
    text = sized_text(rng, 3000)
    full = engine.prompt_ids(prompt=text)
    assert prompts._pieces is not None  # byte-level BPE: text is encoded (and remembered) in pieces
    cut = prompts.prompt_ids({"prompt": text}, 512)
    assert cut is not None and len(cut) == 512 and cut == full[:512]
    messages = [{"role": "system", "content": text}, {"role": "user", "content": "hi"}]
    chat = prompts.prompt_ids({"messages": messages}, 512)
    assert chat == engine.prompt_ids(messages=messages)[:512]


def test_inputs_it_cannot_model_give_no_tokens(prompts: PromptTokenizer) -> None:
    assert prompts.prompt_ids({"input": "hello"}, 100) is None  # /v1/responses
    assert prompts.prompt_ids({"messages": [{"role": "user", "content": [{"image": 1}]}]}, 100) is None
    assert PromptTokenizer(DEFAULT_TOKENIZER).prompt_ids({"messages": []}, 100) is None  # no template


def _scorer(**parameters: object) -> PrecisePrefixCacheScorer:
    pool = EndpointPool()
    pool.set_addresses([A.address, B.address])
    files = {"tokenizer": str(DEFAULT_TOKENIZER), "chat_template": str(DEFAULT_CHAT_TEMPLATE),
             "hash_algorithm": "xxh3_64"}  # fmt: skip
    return PrecisePrefixCacheScorer(pool, lambda: 0.0, **(files | parameters))  # type: ignore[arg-type]


def _chat(system: str, question: str) -> InferenceRequest:
    request = InferenceRequest(method="POST", path="/v1/chat/completions", content_type="application/json")
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    apply_body(request, orjson.dumps({"model": "m", "messages": messages}), 1 << 20)
    return request


def test_scores_follow_the_engines_blocks_and_the_picks_expectations(engine: SimTokenizer) -> None:
    scorer = _scorer(expect_seconds=2.0)
    a, b = scorer.pool.endpoints
    rng = random.Random(4)
    system = sized_text(rng, 400)
    first = _chat(system, sized_text(rng, 30))
    candidates = scorer.pool.endpoints
    assert scorer.score(first, candidates) is None  # nothing reported yet: no preference
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "x"}]
    hashes = TokenSequence(engine.prompt_ids(messages=messages), 16).hashes
    scorer.index.stored(b, hashes)  # B's engine reports the system prompt's blocks
    second = _chat(system, sized_text(rng, 30))
    scores = scorer.score(second, candidates)
    assert scores is not None and scores[0] == 0 and scores[1] > 0.5
    held = scorer.index.match(scorer._hashes(second))[b]
    scorer.on_pick(second, b)  # what B holds of it stays out of B's prefill queue
    assert second.cached_tokens == 16 * held > 0
    scorer.on_pick(first, a)  # routed to A: its blocks count as A's until A reports or 2 s pass
    assert scorer.index.match(scorer._hashes(first))[a] == len(scorer._hashes(first))
    scorer.clock = lambda: 5.0
    assert scorer.score(_chat(system, sized_text(rng, 30)), candidates)[0] == 0  # type: ignore[index]


def test_a_prompt_the_template_rejects_gets_no_preference_not_an_error() -> None:
    scorer = _scorer()
    request = _chat("system", "question")
    template = scorer._prompts.template
    assert template is not None
    scorer._prompts.template = template.environment.from_string("{{ messages[0] / 0 }}")  # a TypeError
    assert scorer.score(request, scorer.pool.endpoints) is None


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"tokenizer": ""}, "tokenizer"),
        ({"tokenizer": "/nonexistent/tokenizer.json"}, "no such file"),
        ({"kv_events_endpoints": {"a": 1}}, "kvEventsEndpoints"),
        ({"expect_seconds": -1.0}, "expectSeconds"),
        ({"block_size_tokens": 0}, "blockSizeTokens"),
        ({"hash_algorithm": "md5"}, "hashAlgorithm"),
    ],
)
def test_bad_parameters_are_refused_with_a_reason(parameters: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _scorer(**parameters)


def test_publishers_default_to_each_endpoints_host_on_one_port() -> None:
    scorer = _scorer(kv_events_endpoints={A.address: "tcp://127.0.0.1:7001"}, kv_events_port=5600)
    a, b = scorer.pool.endpoints
    assert scorer._publisher(a) == "tcp://127.0.0.1:7001"
    assert scorer._publisher(b) == "tcp://10.0.0.2:5600"


def test_picker_config_prints_the_precise_scorer_with_every_parameter() -> None:
    doc = effective_document(Config.from_document(precise_config({A.address: "tcp://127.0.0.1:7001"})))
    (plugin,) = [p for p in doc["plugins"] if p["type"] == "precise-prefix-cache-scorer"]
    assert plugin["parameters"]["kvEventsEndpoints"] == {A.address: "tcp://127.0.0.1:7001"}
    assert plugin["parameters"]["expectSeconds"] == 2.0
    bare = Config.from_document({
        "apiVersion": doc["apiVersion"], "kind": doc["kind"],
        "plugins": [{"type": "precise-prefix-cache-scorer", "parameters": {"tokenizer": "t.json"}}],
    })  # fmt: skip
    (default,) = effective_document(bare)["plugins"]
    assert default["parameters"]["kvEventsEndpoints"] == {}  # a mapping's default, not a placeholder
    assert yaml.safe_load(yaml.safe_dump(doc)) == doc
