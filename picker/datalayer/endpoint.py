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
    # vllm:inter_token_latency_seconds histogram totals (cumulative): how fast it decodes.
    itl_sum: float = 0.0
    itl_count: float = 0.0


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
    last_failure: str = ""  # kind of the latest failed scrape: connect, timeout, status, parse
    inflight_requests: int = 0
    inflight_tokens: int = 0
    token_seconds: float = 0.0  # recent mean inter-token latency the engine reports; 0: none yet
    labels: dict[str, str] = field(default_factory=dict)

    def is_fresh(self, now: float, stale_after: float) -> bool:
        """Known and recently confirmed alive: the only endpoints worth routing to."""
        return (
            self.metrics is not None
            and self.consecutive_failures == 0
            and now - self.scraped_at <= stale_after
        )

    def observe_metrics(self, metrics: EngineMetrics, weight: float = 0.3) -> None:
        """Take a fresh scrape; fold the tokens generated since the last one into `token_seconds`."""
        previous, self.metrics = self.metrics, metrics
        if previous is None or metrics.itl_count <= previous.itl_count:
            return  # nothing decoded since (or the engine restarted and its counters reset)
        recent = (metrics.itl_sum - previous.itl_sum) / (metrics.itl_count - previous.itl_count)
        if recent > 0.0:
            self.token_seconds += weight * (recent - self.token_seconds) if self.token_seconds else recent

    @property
    def waiting(self) -> float:
        return self.metrics.waiting if self.metrics else 0.0

    @property
    def kv_usage(self) -> float:
        return self.metrics.kv_usage if self.metrics else 0.0
