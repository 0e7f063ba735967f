"""Block hashing and the prefix-cached block pool."""

from vllm_sim.kvcache import KVCache
from vllm_sim.tokens import VOCABULARY, TokenSequence, count_tokens

BLOCK_CHARS = 16 * 4


def test_token_count_rounds_up_and_is_never_zero() -> None:
    assert count_tokens("") == 1
    assert count_tokens("abcd") == 1
    assert count_tokens("abcde") == 2


def test_hashes_match_until_the_first_differing_block() -> None:
    shared = "s" * (3 * BLOCK_CHARS)
    a = TokenSequence(shared + "a" * BLOCK_CHARS, 16)
    b = TokenSequence(shared + "b" * BLOCK_CHARS, 16)
    assert a.hashes[:3] == b.hashes[:3]
    assert a.hashes[3] != b.hashes[3]
    # A block's hash covers its whole prefix: the same text after a different head differs.
    c = TokenSequence("x" * BLOCK_CHARS + shared, 16)
    assert set(c.hashes[1:]).isdisjoint(a.hashes)


def test_lora_salt_separates_identical_prompts() -> None:
    prompt = "p" * (2 * BLOCK_CHARS)
    assert set(TokenSequence(prompt, 16, "adapter").hashes).isdisjoint(TokenSequence(prompt, 16).hashes)


def test_generated_tokens_hash_like_the_same_text_sent_as_a_prompt() -> None:
    prompt = "q" * 40  # 10 tokens: the first generated block mixes prompt and output
    outputs = [VOCABULARY[i % len(VOCABULARY)] for i in range(30)]
    seq = TokenSequence(prompt, 16)
    for token in outputs:
        seq.append(token)
    replay = TokenSequence(prompt + "".join(outputs), 16)
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
