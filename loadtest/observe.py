"""What a run reads from outside the clients: the replicas' and the picker's own metrics and every
process's CPU.

Prefix-cache hit rates come from the replicas (`vllm:prefix_cache_*_total`, in tokens), not from
anything the picker claims, and are taken as the difference across the measured window so the
warm-up does not count. CPU seconds per process show when a run was CPU-bound rather than
replica-bound; the host's busy share shows when something else was using the machine.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

COUNTERS = (
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:num_preemptions_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
)
_SAMPLE = re.compile(
    r"^(" + "|".join(re.escape(name) for name in COUNTERS) + r")(?:\{[^\n]*\})?[ \t]+(\S+)", re.MULTILINE
)

Counters = dict[str, float]


def parse_counters(page: str) -> Counters:
    """Sum of every sample of each wanted counter (all label sets) on a Prometheus text page."""
    totals = dict.fromkeys(COUNTERS, 0.0)
    for name, value in _SAMPLE.findall(page):
        totals[name] += float(value)
    return totals


async def scrape_counters(replicas: Iterable[str]) -> dict[str, Counters]:
    """The counters of every replica (`ip:port`), keyed by its address."""
    async with httpx.AsyncClient(timeout=10.0) as http:
        pages = {address: await http.get(f"http://{address}/metrics") for address in replicas}
    for page in pages.values():
        page.raise_for_status()
    return {address: parse_counters(page.text) for address, page in pages.items()}


async def metric_totals(http: httpx.AsyncClient, url: str) -> dict[str, float]:
    """Every sample on a (small) Prometheus page summed over its labels, by sample name (e.g. the
    picker's decisions, open streams and in-flight requests)."""
    page = (await http.get(url)).text
    totals: Counter[str] = Counter()
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            totals[sample.name] += sample.value
    return dict(totals)


def counter_delta(before: dict[str, Counters], after: dict[str, Counters]) -> dict[str, Counters]:
    return {
        address: {name: after[address][name] - before[address][name] for name in COUNTERS}
        for address in after
    }


def hit_rate(counters: Counters) -> float | None:
    queries = counters["vllm:prefix_cache_queries_total"]
    return counters["vllm:prefix_cache_hits_total"] / queries if queries else None


def process_cpu(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds of each process (not its children: the runner's children are
    the clients, which report their own); 0 for a process that is gone."""
    seconds: dict[str, float] = {}
    for role, pid in pids.items():
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            seconds[role] = 0.0
        else:
            seconds[role] = times.user + times.system
    return seconds


@dataclass(frozen=True, slots=True)
class HostCpu:
    """Machine-wide CPU time counters, to compute how busy all cores were over a window."""

    busy: float
    total: float

    @classmethod
    def now(cls) -> HostCpu:
        times = psutil.cpu_times()._asdict()
        for included in ("guest", "guest_nice"):  # Linux counts these inside user and nice too
            times.pop(included, None)
        total = sum(times.values())
        return cls(busy=total - times["idle"] - times.get("iowait", 0.0), total=total)

    def busy_share_since(self, earlier: HostCpu) -> float:
        elapsed = self.total - earlier.total
        return (self.busy - earlier.busy) / elapsed if elapsed > 0 else 0.0
