"""One model-server replica as the scheduler sees it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class EngineMetrics:
    """The few numbers a vLLM (or SGLang) `/metrics` page says about load and KV capacity."""

    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0  # fraction of KV-cache blocks in use, 0..1
    block_size: int | None = None  # tokens per KV block (vllm:cache_config_info)
    num_gpu_blocks: int | None = None
    max_lora: int | None = None
    running_loras: frozenset[str] = frozenset()
    waiting_loras: frozenset[str] = frozenset()


@dataclass(slots=True, eq=False)
class Endpoint:
    """A replica at `address` ("ip:port"): last good metrics plus the picker's own live counters.

    In-flight counts are exact: each ext_proc stream holds its endpoint until the HTTP exchange
    ends, so they move between scrapes, when the scraped numbers cannot.
    """

    address: str
    metrics: EngineMetrics | None = None  # None until the first good scrape
    scraped_at: float = 0.0  # monotonic time of the last good scrape
    consecutive_failures: int = 0
    inflight_requests: int = 0
    inflight_tokens: int = 0
    labels: dict[str, str] = field(default_factory=dict)

    def is_fresh(self, now: float, stale_after: float) -> bool:
        """Known and recently confirmed alive: the only endpoints worth routing to."""
        return (
            self.metrics is not None
            and self.consecutive_failures == 0
            and now - self.scraped_at <= stale_after
        )

    @property
    def waiting(self) -> float:
        return self.metrics.waiting if self.metrics else 0.0

    @property
    def kv_usage(self) -> float:
        return self.metrics.kv_usage if self.metrics else 0.0
