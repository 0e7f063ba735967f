"""The scheduler and step-time model, driven step by step on a virtual clock."""

import asyncio
import dataclasses
from typing import Any

import pytest

from vllm_sim.engine import Engine, SimRequest, Status
from vllm_sim.profiles import PROFILES, Profile, StepCost
from vllm_sim.tokenizer import load

TOKENIZER = load()

H100 = PROFILES["h100-8b"]
TINY = Profile(
    name="tiny",
    model="tiny",
    cost=StepCost(1.0, 0.01, 0.01, 0.01),
    num_gpu_blocks=8,
    max_num_batched_tokens=256,
    max_num_seqs=8,
    max_model_len=128,
)


def prompt_of(tokens: int, fill: str = "a") -> list[int]:
    """`tokens` token ids, all the same (one per fill letter)."""
    return [ord(fill)] * tokens


def submit(engine: Engine, *args: Any, seed: int | None = None, **kwargs: Any) -> SimRequest:
    return engine.submit(*args, output=TOKENIZER.sampler(seed), **kwargs)


def run_until_idle(engine: Engine, now: float = 0.0, max_steps: int = 10_000) -> float:
    for _ in range(max_steps):
        plan = engine.schedule(now)
        if plan is None:
            return now
        now += plan.duration
        engine.complete(plan, now)
    raise AssertionError("engine did not go idle")


def step(engine: Engine, now: float = 0.0) -> float:
    plan = engine.schedule(now)
    assert plan is not None
    engine.complete(plan, now + plan.duration)
    return now + plan.duration


def test_prefill_step_follows_the_step_time_model() -> None:
    engine = Engine(H100)
    request = submit(engine, "r", prompt_of(1000), max_tokens=3, now=0.0)
    plan = engine.schedule(0.0)
    assert plan is not None
    assert (plan.prefill_tokens, plan.decode_seqs) == (1000, 0)
    assert plan.duration == pytest.approx((6.4 + 0.030 * 1000 + 0.055 * 1000 / 1000) / 1000)
    engine.complete(plan, plan.duration)
    assert request.first_token_at == plan.duration and len(request.generated) == 1
    decode = engine.schedule(plan.duration)
    assert decode is not None and (decode.prefill_tokens, decode.decode_seqs) == (0, 1)
    # The decode step reads the prompt and the first token's KV.
    assert decode.duration == pytest.approx((6.4 + 0.006 + 0.055 * 1001 / 1000) / 1000)


def test_speed_divides_step_time() -> None:
    plans = []
    for scale in (1.0, 10.0):
        engine = Engine(H100, speed=scale)
        submit(engine, "r", prompt_of(100), 1, 0.0)
        plans.append(engine.schedule(0.0))
    assert plans[1].duration == pytest.approx(plans[0].duration * 0.1)


def test_long_prompts_prefill_in_chunks_within_the_token_budget() -> None:
    profile = dataclasses.replace(TINY, num_gpu_blocks=64, max_num_batched_tokens=64, max_model_len=512)
    engine = Engine(profile)
    long = submit(engine, "long", prompt_of(200), max_tokens=2, now=0.0)
    chunks = []
    while not long.generated:
        plan = engine.schedule(0.0)
        assert plan is not None
        chunks.append(plan.prefill_tokens)
        engine.complete(plan, 0.0)
    assert chunks == [64, 64, 64, 8]
    # A decode and a new prompt share the next step's budget: 1 + 63.
    short = submit(engine, "short", prompt_of(100, "b"), max_tokens=1, now=0.0)
    plan = engine.schedule(0.0)
    assert plan is not None
    assert [(r, n) for r, n in plan.scheduled] == [(long, 1), (short, 63)]


def test_repeated_prompt_hits_the_cache_and_skips_its_prefill() -> None:
    engine = Engine(H100)
    first = submit(engine, "a", prompt_of(1000), max_tokens=1, now=0.0)
    run_until_idle(engine)
    second = submit(engine, "b", prompt_of(1000), max_tokens=1, now=0.0)
    plan = engine.schedule(0.0)
    assert plan is not None
    assert first.cached_tokens == 0
    assert second.cached_tokens == 992  # 62 whole blocks; the partial block is recomputed
    assert plan.prefill_tokens == 8
    assert (engine.counters.prefix_queries, engine.counters.prefix_hits) == (2000, 992)


def test_a_full_block_hit_still_recomputes_the_last_token() -> None:
    engine = Engine(H100)
    submit(engine, "a", prompt_of(1024), max_tokens=1, now=0.0)
    run_until_idle(engine)
    again = submit(engine, "b", prompt_of(1024), max_tokens=1, now=0.0)
    plan = engine.schedule(0.0)
    assert plan is not None and again.cached_tokens == 1008 and plan.prefill_tokens == 16


def test_different_prompts_do_not_hit() -> None:
    engine = Engine(H100)
    submit(engine, "a", prompt_of(100, "a"), max_tokens=1, now=0.0)
    run_until_idle(engine)
    other = submit(engine, "b", prompt_of(100, "b"), max_tokens=1, now=0.0)
    run_until_idle(engine)
    assert other.cached_tokens == 0


def test_max_num_seqs_keeps_extra_requests_waiting() -> None:
    engine = Engine(dataclasses.replace(TINY, max_num_seqs=2))
    requests = [submit(engine, str(i), prompt_of(4), max_tokens=3, now=0.0) for i in range(3)]
    step(engine)
    assert engine.running == requests[:2] and list(engine.waiting) == requests[2:]
    run_until_idle(engine)
    assert all(r.status is Status.FINISHED for r in requests)
    assert requests[2].scheduled_at is not None and requests[2].scheduled_at > 0


def test_kv_pressure_preempts_the_newest_request_which_later_resumes() -> None:
    # 8 blocks of 16 tokens; each request grows to 48 + 60 tokens = 7 blocks.
    engine = Engine(TINY)
    old = submit(engine, "old", prompt_of(48, "o"), max_tokens=60, now=0.0)
    new = submit(engine, "new", prompt_of(48, "n"), max_tokens=60, now=0.0)
    now = 0.0
    while engine.counters.preemptions == 0:
        now = step(engine, now)
    assert engine.running == [old] and list(engine.waiting) == [new]
    assert new.status is Status.WAITING and new.blocks == [] and new.num_computed == 0
    run_until_idle(engine, now)
    assert [len(r.generated) for r in (old, new)] == [60, 60]
    assert old.finish_reason == new.finish_reason == "length"
    # Recompute found the preempted request's blocks still cached.
    assert engine.counters.prefix_hits > 0
    assert engine.kv.usage == 0.0


def test_abort_frees_blocks_and_a_step_in_flight_ignores_the_request() -> None:
    engine = Engine(TINY)
    request = submit(engine, "r", prompt_of(40), max_tokens=10, now=0.0)
    plan = engine.schedule(0.0)
    assert plan is not None and engine.kv.usage > 0
    engine.abort(request, now=0.001)
    engine.complete(plan, 0.002)
    assert request.status is Status.ABORTED and request.finish_reason == "abort"
    assert request.generated == [] and request.ended.is_set()
    assert engine.running == [] and engine.kv.usage == 0.0
    assert engine.counters.finished["abort"] == 1
    assert engine.schedule(0.003) is None


def test_abort_of_a_waiting_request_removes_it_from_the_queue() -> None:
    engine = Engine(TINY)
    request = submit(engine, "r", prompt_of(4), max_tokens=1, now=0.0)
    engine.abort(request, now=0.0)
    assert list(engine.waiting) == [] and request.status is Status.ABORTED


def test_max_loras_defers_other_adapters_but_not_the_base_model() -> None:
    engine = Engine(TINY, max_loras=1)
    a = submit(engine, "a", prompt_of(4), max_tokens=2, now=0.0, lora="a")
    b = submit(engine, "b", prompt_of(4), max_tokens=2, now=0.0, lora="b")
    base = submit(engine, "base", prompt_of(4), max_tokens=2, now=0.0)
    step(engine)
    assert engine.running == [a, base] and list(engine.waiting) == [b]
    assert (engine.running_loras, engine.waiting_loras) == ({"a"}, {"b"})
    run_until_idle(engine)
    assert b.status is Status.FINISHED and b.first_token_at > a.finished_at


def test_stop_at_max_reports_an_eos_finish() -> None:
    engine = Engine(TINY)
    request = submit(engine, "r", prompt_of(4), max_tokens=2, now=0.0, stop_at_max=True)
    run_until_idle(engine)
    assert request.finish_reason == "stop" and engine.counters.finished["stop"] == 1


def test_counters_track_prompt_and_generated_tokens() -> None:
    engine = Engine(TINY)
    submit(engine, "r", prompt_of(10), max_tokens=5, now=0.0)
    submit(engine, "s", prompt_of(6), max_tokens=2, now=0.0)
    run_until_idle(engine)
    assert (engine.counters.prompt_tokens, engine.counters.generation_tokens) == (16, 7)


def test_same_seed_generates_the_same_text() -> None:
    engine = Engine(TINY)
    texts = []
    for seed in (1, 1, 2):
        request = submit(engine, "r", prompt_of(4), max_tokens=8, now=0.0, seed=seed)
        run_until_idle(engine)
        texts.append("".join(request.generated))
    assert texts[0] == texts[1] != texts[2]
    assert all(len(TOKENIZER.encode(text, add_special_tokens=False)) == 8 for text in texts)


async def test_run_paces_steps_in_real_time() -> None:
    engine = Engine(dataclasses.replace(TINY, cost=StepCost(5.0, 0.0, 0.0, 0.0)))
    task = asyncio.create_task(engine.run())
    try:
        loop = asyncio.get_running_loop()
        request: SimRequest = submit(engine, "r", prompt_of(4), max_tokens=10, now=loop.time())
        await asyncio.wait_for(request.ended.wait(), 5)
        assert request.finished_at is not None
        elapsed = request.finished_at - request.arrival
        assert 0.050 <= elapsed < 0.5  # ten 5 ms steps
    finally:
        task.cancel()
