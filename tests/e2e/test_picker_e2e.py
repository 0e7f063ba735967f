"""The picker behind the real Envoy binary, routing to vLLM-like replicas."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import httpx
import orjson
import pytest

from loadtest.processes import stop_process

CHAT = "/v1/chat/completions"


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": content}], **extra}


async def served_by(client: httpx.AsyncClient, url: str, body: dict[str, Any], **kw: Any) -> str:
    response = await client.post(url + CHAT, json=body, **kw)
    assert response.status_code == 200, response.text
    return response.headers["x-sim-replica"]


@pytest.fixture
async def client():
    async with httpx.AsyncClient(timeout=30.0) as http:
        yield http


async def test_routes_to_the_least_loaded_replica_by_scraped_metrics(
    fake_vllm, picker_server, envoy, client
) -> None:
    replicas = await fake_vllm(3)
    replicas[0].metrics.waiting, replicas[0].metrics.kv_usage = 12, 0.9
    replicas[2].metrics.waiting, replicas[2].metrics.kv_usage = 8, 0.7
    picker = await picker_server([r.address for r in replicas])
    proxy = await envoy("picker", endpoints=[r.address for r in replicas], picker=[picker.address])
    served = [await served_by(client, proxy.url, chat(f"question {i}")) for i in range(6)]
    assert served == ["1"] * 6


async def test_a_long_shared_prefix_sticks_while_different_prefixes_spread(
    fake_vllm, picker_server, envoy, client
) -> None:
    replicas = await fake_vllm(4, chunk_delay=0.05)
    picker = await picker_server([r.address for r in replicas])
    proxy = await envoy("picker", endpoints=[r.address for r in replicas], picker=[picker.address])
    system = "You are a meticulous assistant for the accounts team. " * 40  # ~2 KB
    sticky = [await served_by(client, proxy.url, chat(system + f"Question number {i}?")) for i in range(6)]
    assert len(set(sticky)) == 1
    # Distinct prefixes sent together: in-flight load spreads them over every replica.
    distinct = await asyncio.gather(
        *(served_by(client, proxy.url, chat(f"{i} " * 600 + "?", stream=True)) for i in range(8))
    )
    assert set(distinct) == {r.name for r in replicas}


async def test_bodyless_get_is_routed(fake_vllm, picker_server, envoy, client) -> None:
    replicas = await fake_vllm(2)
    picker = await picker_server([r.address for r in replicas])
    proxy = await envoy("picker", endpoints=[r.address for r in replicas], picker=[picker.address])
    response = await client.get(proxy.url + "/v1/models")
    assert response.status_code == 200
    assert response.json()["data"][0]["id"] == "fake-model"
    assert response.headers["x-sim-replica"] in {"0", "1"}


def with_subset_hint(addresses: list[str]):
    """An Envoy filter before ext_proc that sets the EPP subset hint, as a gateway would."""

    def customize(config: dict[str, Any]) -> None:
        listener = config["static_resources"]["listeners"][0]
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        manager["http_filters"].insert(
            0,
            {
                "name": "envoy.filters.http.set_metadata",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
                    "metadata": [
                        {
                            "metadata_namespace": "envoy.lb.subset_hint",
                            "value": {"x-gateway-destination-endpoint-subset": addresses},
                        }
                    ],
                },
            },
        )

    return customize


async def test_subset_hint_is_honoured_and_an_unservable_one_is_503(
    fake_vllm, picker_server, envoy, client, refused_address
) -> None:
    replicas = await fake_vllm(3)
    replicas[2].metrics.waiting = 30  # the worst replica, but the only one the hint allows
    addresses = [r.address for r in replicas]
    picker = await picker_server(addresses)
    hinted = await envoy(
        "picker",
        endpoints=addresses,
        picker=[picker.address],
        customize=with_subset_hint([replicas[2].address]),
    )
    assert {await served_by(client, hinted.url, chat(f"q{i}")) for i in range(4)} == {"2"}
    nowhere = await envoy(
        "picker",
        endpoints=addresses,
        picker=[picker.address],
        customize=with_subset_hint([refused_address]),
    )
    response = await client.post(nowhere.url + CHAT, json=chat("q"))
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["message"]


async def test_invalid_json_gets_a_400_openai_error(fake_vllm, picker_server, envoy, client) -> None:
    replicas = await fake_vllm(2)
    picker = await picker_server([r.address for r in replicas])
    proxy = await envoy("picker", endpoints=[r.address for r in replicas], picker=[picker.address])
    response = await client.post(
        proxy.url + CHAT,
        content=b'{"model": "m", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "JSON" in error["message"]
    assert not any(r.requests for r in replicas)


async def test_a_client_supplied_destination_header_is_overwritten(
    fake_vllm, picker_server, envoy, client
) -> None:
    replicas = await fake_vllm(2)
    replicas[1].metrics.waiting = 40  # the picker will never choose replica 1
    picker = await picker_server([r.address for r in replicas])
    proxy = await envoy("picker", endpoints=[r.address for r in replicas], picker=[picker.address])
    forged = {"x-gateway-destination-endpoint": replicas[1].address}
    for i in range(4):
        assert await served_by(client, proxy.url, chat(f"q{i}"), headers=forged) == "0"
    assert replicas[0].requests[-1].headers["x-gateway-destination-endpoint"] == replicas[0].address


async def test_requests_are_served_through_fail_open_when_the_picker_dies(
    fake_vllm, picker_server, envoy, client
) -> None:
    replicas = await fake_vllm(2)
    picker = await picker_server([r.address for r in replicas])
    proxy = await envoy("picker", endpoints=[r.address for r in replicas], picker=[picker.address])
    await served_by(client, proxy.url, chat("before"))
    picker.process.send_signal(signal.SIGKILL)
    await stop_process(picker.process)
    served = [await served_by(client, proxy.url, chat(f"during {i}")) for i in range(6)]
    assert set(served) == {"0", "1"}  # round-robin over the pool
    stats = await proxy.stats("ext_proc")
    assert stats["http.inference.ext_proc.failure_mode_allowed"] >= 6


async def test_full_duplex_gateway_streams_a_whole_sse_response_through_the_picker(
    fake_vllm, picker_server, envoy, client
) -> None:
    replicas = await fake_vllm(2, default_tokens=300)
    picker = await picker_server([r.address for r in replicas])
    proxy = await envoy("duplex", endpoints=[r.address for r in replicas], picker=[picker.address])
    body = chat("tell me a long story " * 100, stream=True, max_tokens=300)
    async with client.stream("POST", proxy.url + CHAT, json=body) as response:
        assert response.status_code == 200
        events = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    payloads = [orjson.loads(line[6:]) for line in events[:-1]]
    assert len(payloads) >= 300
    replica = replicas[int(response.headers["x-sim-replica"])]
    assert replica.requests[-1].json() == body  # the request body arrived unchanged
    stats = await proxy.stats("ext_proc")
    assert stats["http.inference.ext_proc.streams_failed"] == 0


async def test_tls_between_envoy_and_the_picker(fake_vllm, picker_server, envoy, client) -> None:
    replicas = await fake_vllm(2)
    picker = await picker_server([r.address for r in replicas], "--secure-serving=true")
    proxy = await envoy(
        "picker", endpoints=[r.address for r in replicas], picker=[picker.address], picker_tls=True
    )
    assert await served_by(client, proxy.url, chat("over tls")) in {"0", "1"}
    stats = await proxy.stats("ext_proc")
    assert stats["http.inference.ext_proc.failure_mode_allowed"] == 0
