"""Calibrated hardware/model presets for a simulated replica.

Every number is derived from public figures (see the reference notes, section 6): KV capacity
from the KV bytes per token and the memory left after the weights at gpu_memory_utilization 0.9,
scheduler limits from vLLM V1 defaults, and a step-time model fitted to measured vLLM runs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StepCost:
    """`step_ms = c0 + c1*prefill_tokens + c2*decode_seqs + c3*(context_tokens_read/1000)`.

    c0 is reading the weights once per step, c1 the matmul FLOPs per prefilled token, c2 the
    per-sequence sampling overhead and c3 reading the KV cache of every scheduled token's context.
    """

    c0_ms: float
    c1_ms: float
    c2_ms: float
    c3_ms: float

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


PROFILES: dict[str, Profile] = {
    profile.name: profile
    for profile in (
        # Llama-3.1-8B BF16 on H100 80 GB: ~421k tokens of KV at 128 KiB/token.
        Profile(
            name="h100-8b",
            model="meta-llama/Llama-3.1-8B-Instruct",
            cost=StepCost(6.4, 0.030, 0.006, 0.055),
            num_gpu_blocks=26312,
        ),
        # The same model on L40S 48 GB: ~190k tokens; vLLM's smaller-GPU scheduler defaults.
        Profile(
            name="l40s-8b",
            model="meta-llama/Llama-3.1-8B-Instruct",
            cost=StepCost(24.0, 0.09, 0.02, 0.21),
            num_gpu_blocks=11875,
            max_num_batched_tokens=2048,
            max_num_seqs=256,
        ),
        # Llama-3.1-70B BF16 with tensor parallelism 4 on H100s: ~420k tokens of KV.
        Profile(
            name="h100x4-70b",
            model="meta-llama/Llama-3.1-70B-Instruct",
            cost=StepCost(17.0, 0.08, 0.01, 0.034),
            num_gpu_blocks=26250,
        ),
    )
}
