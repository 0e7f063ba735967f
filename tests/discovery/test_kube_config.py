"""Where the API server address and credentials come from: the Pod's service account, else kubeconfig."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import yaml
from kube_fake import FakeKube
from kubernetes_asyncio.config import ConfigException, incluster_config

from picker.discovery.kubernetes import KubernetesSource, PoolSpec, load_configuration
from picker.tls import self_signed

VLLM = PoolSpec.of({"app": "vllm"}, [8000])


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA (the Pod's ca.crt in a cluster)."""
    key_pem, cert_pem = self_signed("kube-apiserver")
    cert_path, key_path = directory / "ca.crt", directory / "tls.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    return cert_path, key_path


async def test_in_cluster_service_account_comes_first(tmp_path, monkeypatch, start, published):
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    kube = FakeKube(token="sa-token", ssl_context=context)
    await kube.start()
    try:
        token = tmp_path / "token"
        token.write_text("sa-token")
        monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
        monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(cert))
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", kube.url.rsplit(":", 1)[1])
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))  # would fail if consulted

        kube.put_pod("a", "10.0.0.1")
        start(KubernetesSource("default", spec=VLLM))
        await published.until("10.0.0.1:8000")  # TLS verified against ca.crt, token accepted
    finally:
        await kube.stop()


async def test_kubeconfig_outside_a_cluster(kube, tmp_path, monkeypatch, start, published):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": kube.url}}],
                "users": [{"name": "dev", "user": {}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "dev"}}],
                "current-context": "fake",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    kube.put_pod("a", "10.0.0.1")
    start(KubernetesSource("default", spec=VLLM))
    await published.until("10.0.0.1:8000")


async def test_no_configuration_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    with pytest.raises(ConfigException):
        await load_configuration()
