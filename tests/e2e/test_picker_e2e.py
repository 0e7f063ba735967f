"""The picker behind the real Envoy binary, routing to vLLM-like replicas."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import httpx
import orjson
import pytest

from loadtest.processes import poll_until, stop_process
from tests.e2e.conftest import metric, picker_metrics

CHAT = "/v1/chat/completions"


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": content}], **extra}


async def served_by(client: httpx.AsyncClient, url: str, body: dict[str, Any], **kw: Any) -> str:
    response = await client.post(url + CHAT, json=body, **kw)
    assert response.status_code == 200, response.text
    return response.headers["x-sim-replica"]


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


LLM_D_KV_ONLY = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: kv-cache-utilization-scorer
- type: metrics-data-source
  parameters: {scheme: http, path: /metrics}
- type: core-metrics-extractor
- type: single-profile-handler
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
"""


async def test_an_llm_d_config_file_routes_as_it_says(
    fake_vllm, picker_server, envoy, client, tmp_path
) -> None:
    replicas = await fake_vllm(3)
    # By queue replica 0 is best; this config weighs free KV cache only, where 2 is best.
    for replica, waiting, kv in zip(replicas, (0, 5, 20), (0.9, 0.5, 0.1), strict=True):
        replica.metrics.waiting, replica.metrics.kv_usage = waiting, kv
    path = tmp_path / "epp.yaml"
    path.write_text(LLM_D_KV_ONLY)
    picker = await picker_server([r.address for r in replicas], "--config-file", str(path))
    proxy = await envoy("picker", endpoints=[r.address for r in replicas], picker=[picker.address])
    assert [await served_by(client, proxy.url, chat(f"q{i}")) for i in range(4)] == ["2"] * 4


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


async def test_a_model_no_replica_serves_gets_a_404_openai_error(
    fake_vllm, picker_server, envoy, client
) -> None:
    replicas = await fake_vllm(2)
    picker = await picker_server([r.address for r in replicas])
    proxy = await envoy("picker", endpoints=[r.address for r in replicas], picker=[picker.address])
    assert await served_by(client, proxy.url, chat("known")) in {"0", "1"}
    response = await client.post(proxy.url + CHAT, json=chat("q") | {"model": "gpt-4"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "not_found_error" and error["message"] == "The model `gpt-4` does not exist."
    assert [len(r.requests) for r in replicas].count(1) == 1  # only the first request arrived


async def test_replicas_that_do_not_list_models_get_every_model_routed(
    fake_vllm, picker_server, envoy, client
) -> None:
    replicas = await fake_vllm(2, lists_models=False)
    picker = await picker_server([r.address for r in replicas])
    proxy = await envoy("picker", endpoints=[r.address for r in replicas], picker=[picker.address])
    assert await served_by(client, proxy.url, chat("q") | {"model": "any-model"}) in {"0", "1"}


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
    # The picker's own list (pick first, then the fallback), never the forged value.
    listed = replicas[0].requests[-1].headers["x-gateway-destination-endpoint"]
    assert listed == f"{replicas[0].address},{replicas[1].address}"


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


@pytest.mark.parametrize(
    ("config", "processing"),
    [("gie", "close"), ("gie", "echo"), ("gie-lean", "close")],
    ids=["gie-close", "gie-echo", "gie-lean"],
)
async def test_full_duplex_gateways_deliver_every_byte_of_concurrent_streams(
    fake_vllm, picker_server, envoy, client, config: str, processing: str
) -> None:
    replicas = await fake_vllm(2, default_tokens=300)
    picker = await picker_server([r.address for r in replicas], f"--response-processing={processing}")
    proxy = await envoy(config, endpoints=[r.address for r in replicas], picker=[picker.address])
    bodies = [chat(f"story {i} " * 100, stream=True, max_tokens=300) for i in range(16)]

    async def fetch(url: str, body: dict[str, Any]) -> tuple[str, bytes]:
        async with client.stream("POST", url + CHAT, json=body) as response:
            assert response.status_code == 200
            return response.headers["x-sim-replica"], await response.aread()

    proxied = await asyncio.gather(*(fetch(proxy.url, body) for body in bodies))
    received = [request.body for replica in replicas for request in replica.requests]
    assert sorted(received) == sorted(orjson.dumps(body) for body in bodies)  # bodies arrive unchanged
    for body, (name, data) in zip(bodies, proxied, strict=True):
        # The replica answers a request the same way every time: compare with it, byte for byte.
        direct = await fetch(replicas[int(name)].url, body)
        assert data == direct[1]
        assert data.endswith(b"data: [DONE]\n\n")
    stats = await proxy.stats("ext_proc")
    assert stats["http.inference.ext_proc.streams_failed"] == 0
    per_request = stats["http.inference.ext_proc.stream_msgs_sent"] / len(bodies)
    if processing == "close":  # headers and body: never a message per token
        assert per_request <= 8
    else:  # a message per response chunk Envoy reads (few here: the fake answers at once)
        assert per_request > 8


@pytest.mark.parametrize(("config", "streams_during"), [("picker", 1.0), ("gie-lean", 0.0)])
async def test_stream_lifetime_that_in_flight_accounting_relies_on(
    fake_vllm, picker_server, envoy, client, config: str, streams_during: float
) -> None:
    """Pinned for the Envoy we ship (the behaviour changed in 1.37): with a BUFFERED request and
    responses skipped (envoy.yaml) the ext_proc stream lasts as long as the HTTP exchange; with a
    full-duplex request and responses skipped (envoy-gie-lean.yaml) Envoy ends it with the request
    phase, and the picker keeps the request as pending load instead."""
    (replica,) = await fake_vllm(1, chunk_delay=0.05, default_tokens=40)
    picker = await picker_server([replica.address])
    proxy = await envoy(config, endpoints=[replica.address], picker=[picker.address])
    async with client.stream("POST", proxy.url + CHAT, json=chat("slow", stream=True)) as response:
        assert response.status_code == 200
        chunks = response.aiter_bytes()
        assert (await anext(chunks)).startswith(b"data: ")  # the response is streaming
        during = await picker_metrics(picker)
        async for _ in chunks:
            pass
    assert metric(during, "picker_extproc_streams_open") == streams_during
    assert metric(during, "picker_inflight_requests", endpoint=replica.address) == streams_during

    async def closed() -> bool | None:
        return True if metric(await picker_metrics(picker), "picker_extproc_streams_open") == 0 else None

    await poll_until(closed, within=5, what="the stream closed after the exchange")


async def test_tls_between_envoy_and_the_picker(fake_vllm, picker_server, envoy, client) -> None:
    replicas = await fake_vllm(2)
    picker = await picker_server([r.address for r in replicas], "--secure-serving=true")
    proxy = await envoy(
        "picker", endpoints=[r.address for r in replicas], picker=[picker.address], picker_tls=True
    )
    assert await served_by(client, proxy.url, chat("over tls")) in {"0", "1"}
    stats = await proxy.stats("ext_proc")
    assert stats["http.inference.ext_proc.failure_mode_allowed"] == 0
