"""The shipped Envoy configs, run with the real binary in front of fake vLLM replicas.

The picker itself is replaced by a stub ext_proc server that answers the way the BUFFERED
config expects (destination header + clear_route_cache), so these tests pin Envoy's side only:
routing to the pick, retries on the fallbacks (override_host), fail-open, buffering.
"""

from __future__ import annotations

import collections
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import httpx
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from loadtest.envoy import CONFIG_FILES, ENVOY_DIR, PICKER_CLUSTER, Envoy, envoy_binary, render
from picker.tls import server_credentials

if TYPE_CHECKING:
    from tests.support.fake_vllm import FakeVLLM

pytestmark = pytest.mark.timeout(60)

DESTINATION = "x-gateway-destination-endpoint"
EXT_PROC = "http.inference.ext_proc."
StartReplicas = Callable[..., Awaitable[list["FakeVLLM"]]]
StartEnvoy = Callable[..., Awaitable[Envoy]]
StartStub = Callable[..., Awaitable[tuple["StubPicker", str]]]


@dataclass
class StubPicker(pb_grpc.ExternalProcessorServicer):
    """Sends every request to `target`; records what crossed the ext_proc stream."""

    target: str
    request_headers: list[dict[str, str]] = field(default_factory=list)
    body_sizes: list[int] = field(default_factory=list)

    async def Process(
        self, requests: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        async for request in requests:
            if request.HasField("request_headers"):
                headers = request.request_headers.headers.headers
                self.request_headers.append({h.key: h.raw_value.decode() for h in headers})
                if request.request_headers.end_of_stream:  # bodyless: pick now
                    yield pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=self._route()))
                else:
                    yield pb.ProcessingResponse(request_headers=pb.HeadersResponse())
            elif request.HasField("request_body"):
                self.body_sizes.append(len(request.request_body.body))
                yield pb.ProcessingResponse(request_body=pb.BodyResponse(response=self._route()))

    def _route(self) -> pb.CommonResponse:
        header = base_pb2.HeaderValue(key=DESTINATION, raw_value=self.target.encode())
        mutation = pb.HeaderMutation(set_headers=[base_pb2.HeaderValueOption(header=header)])
        return pb.CommonResponse(header_mutation=mutation, clear_route_cache=True)


@pytest.fixture
async def stub_picker() -> AsyncIterator[StartStub]:
    """Factory: `await stub_picker(target, tls=...)` -> (stub, its "127.0.0.1:port")."""
    servers: list[grpc.aio.Server] = []

    async def start(target: str, *, tls: bool = False) -> tuple[StubPicker, str]:
        stub = StubPicker(target)
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 << 20)])
        pb_grpc.add_ExternalProcessorServicer_to_server(stub, server)
        address = "127.0.0.1:0"
        port = (
            server.add_secure_port(address, server_credentials(None))
            if tls
            else server.add_insecure_port(address)
        )
        await server.start()
        servers.append(server)
        return stub, f"127.0.0.1:{port}"

    yield start
    for server in servers:
        await server.stop(grace=None)


def completion(tokens: int = 4, *, stream: bool = False, prompt: str = "hello") -> bytes:
    return orjson.dumps({"model": "m", "prompt": prompt, "max_tokens": tokens, "stream": stream})


@pytest.mark.parametrize("path", sorted(ENVOY_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_validates(path: Path) -> None:
    argv = [envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"]
    checked = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_launcher_config_is_shipped() -> None:
    assert {ENVOY_DIR / name for name in CONFIG_FILES.values()} <= set(ENVOY_DIR.glob("*.yaml"))


def test_render_edits_the_shipped_config() -> None:
    plain = render("picker", endpoints=["10.0.0.1:8000"], picker=["127.0.0.1:7", "127.0.0.1:8"])
    clusters = {c["name"]: c for c in plain["static_resources"]["clusters"]}
    extproc = clusters[PICKER_CLUSTER]
    assert "transport_socket" not in extproc
    ports = [
        e["endpoint"]["address"]["socket_address"]["port_value"]
        for e in extproc["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert ports == [7, 8]
    pool = clusters["inference-pool"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["address"] for e in pool] == ["10.0.0.1"]
    secure = render("picker", endpoints=["10.0.0.1:8000"], picker_tls=True)
    tls = {c["name"]: c for c in secure["static_resources"]["clusters"]}[PICKER_CLUSTER]
    assert tls["transport_socket"]["name"] == "envoy.transport_sockets.tls"
    with pytest.raises(ValueError, match="host:port"):
        render("rr", endpoints=["10.0.0.1"])


async def test_fake_vllm_metrics_page_is_settable(fake_vllm: StartReplicas) -> None:
    """The page a picker scrapes parses as Prometheus text and follows the test's values."""
    (replica,) = await fake_vllm(1)
    replica.metrics.waiting, replica.metrics.kv_usage, replica.metrics.block_size = 3, 0.25, 32
    async with httpx.AsyncClient() as client:
        page = (await client.get(f"{replica.url}/metrics")).text
        replica.metrics_status = 503
        assert (await client.get(f"{replica.url}/metrics")).status_code == 503
    samples = {s.name: s for f in text_string_to_metric_families(page) for s in f.samples}
    assert samples["vllm:num_requests_waiting"].value == 3
    assert samples["vllm:kv_cache_usage_perc"].value == 0.25
    assert samples["vllm:cache_config_info"].labels["block_size"] == "32"
    assert samples["vllm:num_requests_running"].labels == {
        "engine": "0",
        "model_name": replica.model,
    }
    assert replica.requests == []  # scrapes are not recorded as inference traffic


async def test_rr_config_spreads_requests(fake_vllm: StartReplicas, envoy: StartEnvoy) -> None:
    replicas = await fake_vllm(3)
    proxy = await envoy("rr", endpoints=[r.address for r in replicas])
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        answers = [await client.post("/v1/completions", content=completion()) for _ in range(30)]
    assert all(a.status_code == 200 for a in answers)
    served = collections.Counter(a.headers["x-sim-replica"] for a in answers)
    assert served == {"0": 10, "1": 10, "2": 10}
    assert [len(r.requests) for r in replicas] == [10, 10, 10]


async def test_picker_down_fails_open_and_ignores_client_destination(
    fake_vllm: StartReplicas, envoy: StartEnvoy, refused_address: str
) -> None:
    replicas = await fake_vllm(2)
    proxy = await envoy("picker", endpoints=[r.address for r in replicas], picker=[refused_address])
    forged = {DESTINATION: "127.0.0.1:1"}
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10, headers=forged) as client:
        posts = [await client.post("/v1/completions", content=completion()) for _ in range(4)]
        models = await client.get("/v1/models")
    assert [a.status_code for a in [*posts, models]] == [200] * 5, models.text
    assert {a.headers["x-sim-replica"] for a in posts} == {"0", "1"}  # round-robin
    received = [request for r in replicas for request in r.requests]
    assert len(received) == 5
    assert all(DESTINATION not in request.headers for request in received)
    stats = await proxy.stats("ext_proc")
    assert stats[EXT_PROC + "failure_mode_allowed"] == 5  # the picker was asked, and failed


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
async def test_picker_answer_routes_to_its_pick_and_client_header_never_reaches_it(
    fake_vllm: StartReplicas, envoy: StartEnvoy, stub_picker: StartStub, tls: bool
) -> None:
    replicas = await fake_vllm(2)
    target = replicas[1]
    # The EPP protocol's "pick,fallback" list: Envoy must route to the first entry.
    stub, address = await stub_picker(f"{target.address},{replicas[0].address}", tls=tls)
    proxy = await envoy("picker", endpoints=[r.address for r in replicas], picker=[address], picker_tls=tls)
    forged = {DESTINATION: replicas[0].address}  # reachable: honouring it would be visible
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10, headers=forged) as client:
        posts = [await client.post("/v1/completions", content=completion()) for _ in range(3)]
        models = await client.get("/v1/models")  # bodyless: routed by the headers answer
    assert [a.status_code for a in [*posts, models]] == [200] * 4
    assert {a.headers["x-sim-replica"] for a in [*posts, models]} == {target.name}
    assert replicas[0].requests == []
    assert [r.headers[DESTINATION] for r in target.requests] == [stub.target] * 4
    assert len(stub.request_headers) == 4
    assert all(DESTINATION not in headers for headers in stub.request_headers)
    stats = await proxy.stats("ext_proc")
    assert stats[EXT_PROC + "failure_mode_allowed"] == 0


async def test_a_pick_that_refuses_is_retried_on_the_next_fallback(
    fake_vllm: StartReplicas, envoy: StartEnvoy, stub_picker: StartStub, refused_address: str
) -> None:
    """A replica that died after the picker's last scrape: the request is not lost."""
    replicas = await fake_vllm(2)
    _, address = await stub_picker(f"{refused_address},{replicas[1].address},{replicas[0].address}")
    pool = [refused_address, *(r.address for r in replicas)]
    proxy = await envoy("picker", endpoints=pool, picker=[address])
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        answers = [await client.post("/v1/completions", content=completion()) for _ in range(5)]
    assert [a.status_code for a in answers] == [200] * 5
    assert {a.headers["x-sim-replica"] for a in answers} == {replicas[1].name}  # the first fallback
    stats = await proxy.stats("cluster.inference-pool.upstream_rq_retry")
    assert stats["cluster.inference-pool.upstream_rq_retry"] == 5


async def test_a_pick_outside_the_pool_is_skipped_for_round_robin(
    fake_vllm: StartReplicas, envoy: StartEnvoy, stub_picker: StartStub
) -> None:
    """override_host only sends to members of the cluster: a stale or forged name cannot steer."""
    replicas = await fake_vllm(2)
    _, address = await stub_picker("192.0.2.1:8000")
    proxy = await envoy("picker", endpoints=[r.address for r in replicas], picker=[address])
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        answers = [await client.post("/v1/completions", content=completion()) for _ in range(4)]
    assert [a.status_code for a in answers] == [200] * 4
    assert {a.headers["x-sim-replica"] for a in answers} == {"0", "1"}


async def test_picker_config_buffers_prompts_up_to_8_mib(
    fake_vllm: StartReplicas, envoy: StartEnvoy, stub_picker: StartStub
) -> None:
    (replica,) = await fake_vllm(1)
    stub, address = await stub_picker(replica.address)
    proxy = await envoy("picker", endpoints=[replica.address], picker=[address])
    big, too_big = completion(prompt="x" * (6 << 20)), completion(prompt="x" * (9 << 20))
    async with httpx.AsyncClient(base_url=proxy.url, timeout=20) as client:
        accepted = await client.post("/v1/completions", content=big)
        refused = await client.post("/v1/completions", content=too_big)
    assert accepted.status_code == 200
    assert stub.body_sizes == [len(big)]  # one BUFFERED message, above Envoy's 1 MiB default
    assert replica.requests[0].body == big
    assert refused.status_code == 413


@pytest.mark.parametrize("config", ["gie", "gie-lean"])
async def test_gie_configs_fail_closed_when_picker_down(
    fake_vllm: StartReplicas, envoy: StartEnvoy, refused_address: str, config: str
) -> None:
    (replica,) = await fake_vllm(1)
    proxy = await envoy(config, endpoints=[replica.address], picker=[refused_address])
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        answer = await client.post("/v1/completions", content=completion())
    assert answer.status_code == 500
    assert replica.requests == []


@pytest.mark.parametrize("config", ["rr", "picker"])
async def test_long_sse_stream_passes_intact(
    fake_vllm: StartReplicas, envoy: StartEnvoy, stub_picker: StartStub, config: str
) -> None:
    (replica,) = await fake_vllm(1)
    _, address = await stub_picker(replica.address)
    proxy = await envoy(config, endpoints=[replica.address], picker=[address])
    tokens = 2000
    async with (
        httpx.AsyncClient(base_url=proxy.url, timeout=20) as client,
        client.stream("POST", "/v1/completions", content=completion(tokens, stream=True)) as answer,
    ):
        events = [line async for line in answer.aiter_lines() if line.startswith("data: ")]
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "data: [DONE]"
    texts = [orjson.loads(e.removeprefix("data: "))["choices"][0]["text"] for e in events[:-1]]
    assert texts == [f" t{i}" for i in range(tokens)]
