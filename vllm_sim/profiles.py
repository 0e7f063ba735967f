"""Calibrated hardware/model presets for a simulated replica, and where each number comes from.

Step time: `step_ms = c0 + c1*prefill_tokens + c2*decode_seqs + c3*(context_tokens_read/1000)`,
a roofline-style fit. c0 is streaming the weights once per step (weights / HBM bandwidth at ~70%
efficiency: 15 GiB over 3.35 TB/s on H100 SXM, 0.864 TB/s on L40S), c1 the dense FLOPs of one
prefilled token (2 x 8e9 params at ~55% of 989 / 362 BF16 TFLOPS), c2 per-sequence sampling and
bookkeeping, c3 reading one token's KV (128 KiB in BF16 for Llama-3.1-8B: 32 layers x 8 KV heads x
128 dims x 2 x 2 bytes) at the effective bandwidth. The H100 fit reproduces measured vLLM runs
(LambdaLabsML/vllm-benchmark: TPOT 6.5 / 6.6 / 10.9 ms at concurrency 1 / 4 / 16, ~7.2 ms per step
at batch ~10, ~8.2 at ~80, ~12.6 at ~250); the L40S / H100 throughput ratio (0.28) matches MLPerf
Inference v5.1 for Llama-3.1-8B on vLLM (1,642 vs 5,777 tok/s offline), i.e. the bandwidth ratio.

KV capacity: memory left at gpu_memory_utilization 0.9 after weights and activations, divided by
the KV bytes per token. H100 80 GB: ~51 GiB = ~421k tokens (llm-d/llm-d-benchmark,
`config_explorer/empirical-vllm-memory-results.md`); L40S 48 GB: ~23 GiB = ~190k tokens (derived
the same way; an A6000 gave 13,248 blocks in vllm-project/vllm PR #4454); Llama-3.1-70B at TP4 on
H100s: ~420k tokens. Scheduler limits are vLLM V1's defaults (`vllm/engine/arg_utils.py`):
block_size 16, `max_num_batched_tokens` 8192 on >= 70 GiB GPUs and 2048 otherwise,
`max_num_seqs` 1024 on H100 and 256 on L40S.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StepCost:
    """The step-time model's coefficients (milliseconds), see the module docstring."""

    c0_ms: float  # fixed per step
    c1_ms: float  # per prefilled (uncached) token
    c2_ms: float  # per decoding sequence
    c3_ms: float  # per 1000 context tokens read by the step's attention

    def seconds(self, prefill_tokens: int, decode_seqs: int, context_tokens: int) -> float:
        ms = (
            self.c0_ms
            + self.c1_ms * prefill_tokens
            + self.c2_ms * decode_seqs
            + self.c3_ms * context_tokens / 1000
        )
        return ms / 1000


@dataclass(frozen=True, slots=True)
class Profile:
    """What one vLLM replica can hold and how fast it steps."""

    name: str
    model: str
    cost: StepCost
    num_gpu_blocks: int
    block_size: int = 16
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 1024
    max_model_len: int = 131072

    def __post_init__(self) -> None:
        if self.max_model_len > self.num_gpu_blocks * self.block_size:
            # vLLM refuses to start in this case: one maximal request must fit in the cache.
            raise ValueError(
                f"profile {self.name}: max_model_len {self.max_model_len} exceeds the KV cache "
                f"({self.num_gpu_blocks} blocks x {self.block_size} tokens)"
            )


_H100_8B = StepCost(6.4, 0.030, 0.006, 0.055)

PROFILES: dict[str, Profile] = {
    profile.name: profile
    for profile in (
        Profile(
            name="h100-8b",
            model="meta-llama/Llama-3.1-8B-Instruct",
            cost=_H100_8B,
            num_gpu_blocks=26312,  # 421k tokens
        ),
        Profile(
            name="l40s-8b",
            model="meta-llama/Llama-3.1-8B-Instruct",
            cost=StepCost(24.0, 0.09, 0.02, 0.21),
            num_gpu_blocks=11875,  # 190k tokens
            max_num_batched_tokens=2048,
            max_num_seqs=256,
        ),
        Profile(
            name="h100x4-70b",
            model="meta-llama/Llama-3.1-70B-Instruct",
            cost=StepCost(17.0, 0.08, 0.01, 0.034),
            num_gpu_blocks=26250,  # 420k tokens
        ),
        # H100 speed with a deliberately tiny cache and batch (4096 tokens, 8 sequences), so
        # prefix eviction, queueing and preemption show up within a few requests in tests.
        Profile(
            name="small",
            model="meta-llama/Llama-3.1-8B-Instruct",
            cost=_H100_8B,
            num_gpu_blocks=256,
            max_num_batched_tokens=2048,
            max_num_seqs=8,
            max_model_len=4096,
        ),
    )
}
# Short names for heterogeneous pools (`--profiles fast,fast,slow`).
ALIASES: dict[str, str] = {"fast": "h100-8b", "slow": "l40s-8b"}


def get_profile(name: str) -> Profile:
    """A profile by name or alias; KeyError names the valid choices."""
    try:
        return PROFILES[ALIASES.get(name, name)]
    except KeyError:
        choices = ", ".join([*PROFILES, *ALIASES])
        raise KeyError(f"unknown profile {name!r} (choose from {choices})") from None
