"""Block hashing and the prefix-cached block pool."""

from vllm_sim.kvcache import KVCache
from vllm_sim.tokens import TokenSequence


def test_hashes_match_until_the_first_differing_block() -> None:
    shared = list(range(3 * 16))
    a = TokenSequence([*shared, *[1] * 16], 16)
    b = TokenSequence([*shared, *[2] * 16], 16)
    assert a.hashes[:3] == b.hashes[:3]
    assert a.hashes[3] != b.hashes[3]
    # A block's hash covers its whole prefix: the same tokens after a different head differ.
    c = TokenSequence([7] * 16 + shared, 16)
    assert set(c.hashes[1:]).isdisjoint(a.hashes)
    assert (a.parent_hash(0), a.parent_hash(2)) == (None, a.hashes[1])
    assert a.block_tokens(3) == [1] * 16


def test_lora_salt_separates_identical_prompts() -> None:
    prompt = list(range(32))
    assert set(TokenSequence(prompt, 16, "adapter").hashes).isdisjoint(TokenSequence(prompt, 16).hashes)


def test_only_full_blocks_are_hashed() -> None:
    assert len(TokenSequence(list(range(47)), 16).hashes) == 2
    assert len(TokenSequence(list(range(48)), 16).hashes) == 3


def test_generated_tokens_hash_like_the_same_tokens_sent_as_a_prompt() -> None:
    prompt = list(range(10))  # the first generated block mixes prompt and output
    outputs = list(range(100, 130))
    seq = TokenSequence(prompt, 16)
    for token in outputs:
        seq.append(token)
    replay = TokenSequence(prompt + outputs, 16)
    assert seq.num_tokens == replay.num_tokens == 40
    assert seq.hashes == replay.hashes and len(seq.hashes) == 2


def test_usage_counts_held_blocks_only() -> None:
    kv = KVCache(num_blocks=10, block_size=16)
    blocks = kv.allocate(4)
    assert kv.usage == 0.4 and kv.num_free == 6
    kv.free(blocks)
    assert kv.usage == 0.0 and kv.num_free == 10


def test_freed_blocks_stay_cached_and_the_tail_is_evicted_first() -> None:
    kv = KVCache(num_blocks=4, block_size=16)
    hashes = [11, 22, 33]
    blocks = kv.allocate(3)
    for block, block_hash in zip(blocks, hashes, strict=True):
        kv.cache(block, block_hash)
    kv.free(blocks)
    assert kv.longest_hit(hashes, 3) == blocks
    kv.allocate(2)  # the never-used block, then the request's tail block
    assert kv.longest_hit(hashes, 3) == blocks[:2]


def test_least_recently_freed_request_is_evicted_first() -> None:
    kv = KVCache(num_blocks=2, block_size=16)
    first, second = kv.allocate(1), kv.allocate(1)
    kv.cache(first[0], 1)
    kv.cache(second[0], 2)
    kv.free(first)
    kv.free(second)
    kv.allocate(1)
    assert kv.longest_hit([1], 1) == [] and kv.longest_hit([2], 1) == second


def test_hit_blocks_in_the_free_queue_count_against_new_allocations() -> None:
    kv = KVCache(num_blocks=3, block_size=16)
    blocks = kv.allocate(2)
    kv.cache(blocks[0], 7)
    kv.free(blocks)
    hits = kv.longest_hit([7], 1)
    assert kv.can_allocate(2, hits) and not kv.can_allocate(3, hits)
    kv.touch(hits)
    assert hits[0].ref_count == 1 and kv.num_free == 2


def test_a_duplicate_block_stays_private() -> None:
    kv = KVCache(num_blocks=2, block_size=16)
    a, b = kv.allocate(2)
    kv.cache(a, 5)
    kv.cache(b, 5)
    assert kv.longest_hit([5], 1) == [a] and b.block_hash is None


def test_disabled_prefix_caching_never_hits() -> None:
    kv = KVCache(num_blocks=2, block_size=16, prefix_caching=False)
    (block,) = kv.allocate(1)
    kv.cache(block, 9)
    kv.free([block])
    assert kv.longest_hit([9], 1) == []
