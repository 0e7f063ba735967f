"""Security defaults: no prompt text in logs or metrics, nothing but health on the health port,
TLS with a given certificate, and loopback-only listeners in the local configs."""

from __future__ import annotations

import os
import ssl
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
import yaml

from loadtest.envoy import ENVOY_DIR
from picker.cli import build_parser
from picker.tls import self_signed
from tests.faults.conftest import CHAT, chat
from tests.protocol.conftest import body_message

pytestmark = pytest.mark.timeout(60)

SECRET = "the-prompt-text-8f3a1c"  # appears in prompts, bodies and header values only


async def send_secret_requests(client: httpx.AsyncClient, url: str) -> None:
    """Routed, refused (invalid body) and shed paths, each carrying the secret."""
    routed = await client.post(
        url + CHAT,
        json=chat(SECRET * 20),
        headers={"x-session-id": SECRET, "x-gateway-inference-objective": SECRET},
    )
    assert routed.status_code == 200
    invalid = await client.post(
        url + CHAT,
        content=b'{"model": "' + SECRET.encode() + b'", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert invalid.status_code == 400 and SECRET not in invalid.text
    bad_model = await client.post(url + CHAT, json={"model": [SECRET], "messages": []})
    assert bad_model.status_code == 400 and SECRET not in bad_model.text


@pytest.mark.parametrize(
    ("flags", "logged"),
    [((), False), (("--log-level", "debug"), False), (("--log-level", "debug", "--log-prompts"), True)],
)
async def test_prompts_reach_the_log_only_when_asked_and_never_the_metrics(
    fake_vllm, picker_server, envoy, client: httpx.AsyncClient, flags: tuple[str, ...], logged: bool
) -> None:
    replicas = await fake_vllm(2)
    picker = await picker_server([r.address for r in replicas], "--log-level", "info", *flags)
    proxy = await envoy("picker", endpoints=[r.address for r in replicas], picker=[picker.address])
    await send_secret_requests(client, proxy.url)
    page = (await client.get(f"http://127.0.0.1:{picker.metrics_port}/metrics")).text
    assert "picker_decisions_total" in page and SECRET not in page
    assert (SECRET in picker.log_path.read_text()) is logged


async def test_the_health_port_serves_health_only(fake_vllm, picker_server) -> None:
    (replica,) = await fake_vllm(1)
    picker = await picker_server([replica.address])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{picker.health_port}") as channel:
        # One message in one call: a stream the server rejects while the client is still
        # writing can end INTERNAL on the client side instead of with the server's status.
        process = channel.unary_unary("/envoy.service.ext_proc.v3.ExternalProcessor/Process")
        body = body_message(b'{"prompt": "' + SECRET.encode() + b'"}').SerializeToString()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await process(body)
    assert refused.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_tls_with_a_given_certificate(fake_vllm, picker_server, envoy, client, tmp_path: Path) -> None:
    key, cert = self_signed("picker.example")
    (tmp_path / "tls.key").write_bytes(key)
    (tmp_path / "tls.crt").write_bytes(cert)
    replicas = await fake_vllm(2)
    addresses = [r.address for r in replicas]
    picker = await picker_server(addresses, "--secure-serving=true", "--cert-path", str(tmp_path))
    served = ssl.get_server_certificate(("127.0.0.1", picker.grpc_port))
    assert ssl.PEM_cert_to_DER_cert(served) == ssl.PEM_cert_to_DER_cert(cert.decode())
    proxy = await envoy("picker", endpoints=addresses, picker=[picker.address], picker_tls=True)
    assert (await client.post(proxy.url + CHAT, json=chat("over tls"))).status_code == 200
    stats = await proxy.stats("ext_proc")
    assert stats["http.inference.ext_proc.failure_mode_allowed"] == 0  # the picker answered, over TLS


def _addresses(node: object) -> list[str]:
    """Every `socket_address.address` in an Envoy config."""
    if isinstance(node, dict):
        found = [node["address"]] if "port_value" in node and "address" in node else []
        return found + [a for value in node.values() for a in _addresses(value)]
    if isinstance(node, list):
        return [a for item in node for a in _addresses(item)]
    return []


@pytest.mark.parametrize("path", sorted(ENVOY_DIR.glob("envoy*.yaml")), ids=lambda p: p.name)
def test_local_envoy_configs_listen_on_loopback_only(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    listeners = [config["admin"], *config["static_resources"]["listeners"]]
    assert set(_addresses(listeners)) == {"127.0.0.1"}


def test_picker_binds_loopback_by_default_outside_kubernetes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert build_parser().parse_args(["serve", "--endpoints", "127.0.0.1:1"]).bind_address == "127.0.0.1"


async def test_every_picker_port_listens_on_the_bind_address_only(fake_vllm, picker_server) -> None:
    (replica,) = await fake_vllm(1)
    picker = await picker_server([replica.address])
    listening = [
        c.laddr
        for c in psutil.Process(picker.process.pid).net_connections()
        if c.status == psutil.CONN_LISTEN
    ]
    assert {a.port for a in listening} == {picker.grpc_port, picker.health_port, picker.metrics_port}
    # gRPC listens on a dual-stack socket: IPv4 loopback then reads as ::ffff:127.0.0.1.
    ips = {
        ip.ipv4_mapped or ip if isinstance(ip, IPv6Address) else ip
        for ip in (ip_address(a.ip) for a in listening)
    }
    assert ips == {IPv4Address("127.0.0.1")}, os.linesep.join(map(str, listening))
