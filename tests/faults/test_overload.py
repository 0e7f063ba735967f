"""Overload and oversized input through the real Envoy and picker processes."""

from __future__ import annotations

import httpx
import orjson
import pytest

from tests.faults.conftest import CHAT, chat

pytestmark = pytest.mark.timeout(60)


async def test_saturated_pool_sheds_sheddable_requests_and_routes_the_rest_to_the_least_bad(
    fake_vllm, picker_server, envoy, config_file, client: httpx.AsyncClient
) -> None:
    replicas = await fake_vllm(3)
    # Every replica is over a threshold (configured lower than the defaults); replica 1 least so.
    for replica, waiting in zip(replicas, (9, 4, 12), strict=True):
        replica.metrics.waiting, replica.metrics.kv_usage = waiting, 0.6
    config = config_file(
        saturationDetector={"queueDepthThreshold": 3, "kvCacheUtilThreshold": 0.5, "retryAfterSeconds": 7},
        objectives={"batch": -1, "interactive": 10},
    )
    addresses = [r.address for r in replicas]
    picker = await picker_server(addresses, "--config-file", config)
    proxy = await envoy("picker", endpoints=addresses, picker=[picker.address])

    batch = {"x-gateway-inference-objective": "batch"}
    shed = await client.post(proxy.url + CHAT, json=chat("later"), headers=batch)
    assert shed.status_code == 429 and shed.headers["retry-after"] == "7"
    error = shed.json()["error"]
    assert error["type"] == "rate_limit_exceeded" and "saturated" in error["message"]
    assert not any(r.requests for r in replicas)

    for objective in ("interactive", "unknown", None):
        headers = {"x-gateway-inference-objective": objective} if objective else {}
        served = await client.post(proxy.url + CHAT, json=chat(f"now {objective}"), headers=headers)
        assert served.status_code == 200 and served.headers["x-sim-replica"] == "1"


async def test_a_multi_megabyte_prompt_passes_envoy_and_the_picker_grpc_limit(
    fake_vllm, picker_server, envoy, client: httpx.AsyncClient
) -> None:
    (replica,) = await fake_vllm(1)
    picker = await picker_server([replica.address])
    proxy = await envoy("picker", endpoints=[replica.address], picker=[picker.address])
    body = orjson.dumps(chat("y" * 7_500_000))
    response = await client.post(proxy.url + CHAT, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200 and replica.requests[-1].body == body
    stats = await proxy.stats("ext_proc")
    assert stats["http.inference.ext_proc.failure_mode_allowed"] == 0  # the picker routed it
