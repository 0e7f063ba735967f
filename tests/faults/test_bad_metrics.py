"""A replica whose /metrics page turns to nonsense is routed around until it makes sense again;
the scraper neither crashes nor stops scraping the others."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import pytest

from loadtest.processes import poll_until
from tests.faults.conftest import CHAT, chat, metric, picker_metrics
from tests.support.fake_vllm import VLLMMetrics

pytestmark = pytest.mark.timeout(60)


@dataclass(slots=True)
class Page(VLLMMetrics):
    """A /metrics page given verbatim."""

    text: str = ""

    def render(self, model: str) -> str:
        return self.text


GOOD = VLLMMetrics()
NONSENSE = {
    "nan": VLLMMetrics(kv_usage=float("nan")),
    "negative": VLLMMetrics(waiting=-3),
    "kv above one": VLLMMetrics(kv_usage=7.5),
    "missing lines": Page(text="# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 1\n"),
    "not prometheus": Page(text="<html><body>502 Bad Gateway</body></html>"),
    "huge page": Page(text="vllm:num_requests_waiting 0\n" + "# padding padding padding\n" * 200_000),
}


async def test_nonsense_metrics_make_a_replica_unknown_and_never_starve_the_others(
    fake_vllm, picker_server, envoy, client: httpx.AsyncClient
) -> None:
    replicas = await fake_vllm(3)
    for other in replicas[1:]:
        other.metrics.waiting = 3  # replica 0 is the choice whenever it is known
    addresses = [r.address for r in replicas]
    picker = await picker_server(addresses)
    proxy = await envoy("picker", endpoints=addresses, picker=[picker.address])
    target = replicas[0]

    async def routable(value: float) -> bool | None:
        samples = await picker_metrics(picker)
        return True if metric(samples, "picker_endpoint_routable", endpoint=target.address) == value else None

    async def served_by() -> str:
        response = await client.post(proxy.url + CHAT, json=chat("question"))
        assert response.status_code == 200
        return response.headers["x-sim-replica"]

    assert await served_by() == "0"
    for kind, page in NONSENSE.items():
        target.metrics = page
        await poll_until(lambda: routable(0.0), within=5.0, what=f"{kind}: replica 0 unroutable")
        assert {await served_by() for _ in range(5)} <= {"1", "2"}, kind
        samples = await picker_metrics(picker)
        for other in replicas[1:]:  # still scraped every interval (0.1 s)
            age = metric(samples, "picker_endpoint_metrics_age_seconds", endpoint=other.address)
            assert age is not None and age < 1.0, (kind, age)
        target.metrics = GOOD
        await poll_until(lambda: routable(1.0), within=5.0, what=f"{kind}: replica 0 routable again")
        assert await served_by() == "0", kind

    samples = await picker_metrics(picker)
    assert (metric(samples, "picker_scrape_errors_total", endpoint=target.address, kind="parse") or 0) >= len(
        NONSENSE
    )
    assert picker.process.returncode is None
