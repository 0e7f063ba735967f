"""Where the API server address and credentials come from: the Pod's service account, else kubeconfig."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kube_fake import FakeKube
from kubernetes_asyncio.config import ConfigException, incluster_config

from picker.discovery.kubernetes import KubernetesSource, PoolSpec, load_configuration

VLLM = PoolSpec.of({"app": "vllm"}, [8000])


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA (the Pod's ca.crt in a cluster)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "ca.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
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
