"""gateway/: every file parses and renders; objects validate; the pieces agree with each other
and with the picker's own flags, health services, config loader and discovery code."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kustomize_lite import load_kustomization, load_objects, strip_hash
from rendered import (
    BUILT_IN_GROUPS,
    CUSTOM_KINDS,
    GATEWAY,
    GKE,
    JSON,
    KUBERNETES_VERSION,
    KUSTOMIZATIONS,
    MODEL_SERVERS,
    OVERLAYS,
    STANDALONE,
    container,
    named,
    one,
    path_id,
    picker_args,
    pod,
    ports,
    render,
)

from picker.config import Config
from picker.datalayer.pool import EndpointPool
from picker.discovery.kubernetes import POOL_GROUP, POOL_PLURAL, POOL_VERSION
from picker.protocol.health import LIVENESS, READINESS
from picker.scheduling.scheduler import Scheduler

# -- files ------------------------------------------------------------------------------------


def test_every_yaml_file_parses_and_is_used():
    referenced: set[Path] = set()
    for directory in KUSTOMIZATIONS:
        k = load_kustomization(directory)
        referenced |= {(directory / r).resolve() for r in k.get("resources", ())}
        referenced |= {(directory / p["path"]).resolve() for p in k.get("patches", ()) if "path" in p}
        for generator in k.get("configMapGenerator", ()):
            referenced |= {(directory / f).resolve() for f in generator["files"]}
    for path in GATEWAY.rglob("*.yaml"):
        docs = list(yaml.safe_load_all(path.read_text()))  # raises on a syntax error
        assert docs and all(isinstance(doc, dict) for doc in docs), path
        if path.name != "kustomization.yaml":
            assert path.resolve() in referenced, f"{path} is in no kustomization"
            if path.name not in ("config.yaml", "envoy.yaml"):  # generator inputs, not objects
                assert all("apiVersion" in d and "kind" in d for d in load_objects(path)), path


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=path_id)
def test_kubectl_kustomize_renders_the_same(directory):
    """The pure-Python rendering every other test uses is what kustomize itself produces."""
    result = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=True
    )
    theirs = _normalized(list(yaml.safe_load_all(result.stdout)))
    assert theirs == _normalized(list(render(directory)))


def _normalized(objects: list[JSON]) -> dict[tuple[str, str], str]:
    """Objects by kind/name with kustomize's ConfigMap hash suffixes removed everywhere."""
    out = {}
    for obj in objects:
        if obj["kind"] == "ConfigMap":
            obj["metadata"]["name"] = strip_hash(obj["metadata"]["name"])
        if obj["kind"] == "Deployment":
            for volume in pod(obj).get("volumes", ()):
                if "configMap" in volume:
                    volume["configMap"]["name"] = strip_hash(volume["configMap"]["name"])
        out[obj["kind"], obj["metadata"]["name"]] = yaml.safe_dump(obj, sort_keys=True)
    return out


# -- schemas ----------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", OVERLAYS + MODEL_SERVERS, ids=path_id)
def test_built_in_kinds_validate_strictly(directory):
    for obj in render(directory):
        if obj["apiVersion"] in BUILT_IN_GROUPS:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        else:  # custom resources: checked field by field below
            assert obj["kind"] in CUSTOM_KINDS, obj["kind"]


# Section 2 of the reference / the v1 CRD: required fields, types, ranges, no unknown keys.
_NAME = {"type": "string", "minLength": 1, "maxLength": 253}
_PORT = {
    "type": "object",
    "properties": {"number": {"type": "integer", "minimum": 1, "maximum": 65535}},
    "required": ["number"],
    "additionalProperties": False,
}
INFERENCE_POOL_V1 = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": f"{POOL_GROUP}/{POOL_VERSION}"},
        "kind": {"const": "InferencePool"},
        "spec": {
            "type": "object",
            "required": ["selector", "targetPorts", "endpointPickerRef"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "minProperties": 1,
                            "maxProperties": 64,
                            "additionalProperties": {
                                "type": "string",
                                "maxLength": 63,
                                "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$",
                            },
                        }
                    },
                },
                "targetPorts": {"type": "array", "minItems": 1, "maxItems": 8, "items": _PORT},
                "appProtocol": {"enum": ["http", "kubernetes.io/h2c"]},
                "endpointPickerRef": {
                    "type": "object",
                    "required": ["name", "port"],
                    "additionalProperties": False,
                    "properties": {
                        "group": {"const": ""},
                        "kind": {"const": "Service"},
                        "name": _NAME,
                        "port": _PORT,
                        "failureMode": {"enum": ["FailOpen", "FailClose"]},
                    },
                },
            },
        },
    },
}


def test_inference_pool_has_what_the_crd_requires():
    pool = one(render(GKE), "InferencePool")
    jsonschema.validate(pool, INFERENCE_POOL_V1)
    assert POOL_PLURAL == "inferencepools"
    assert pool["spec"]["endpointPickerRef"]["failureMode"] == "FailOpen"


def test_the_schema_rejects_what_the_crd_rejects():
    pool = one(render(GKE), "InferencePool")
    broken = [
        {**pool["spec"], "targetPorts": []},
        {**pool["spec"], "targetPorts": [{"number": "8000"}]},
        {**pool["spec"], "targetPortNumber": 8000},  # the v1alpha2 field
        {k: v for k, v in pool["spec"].items() if k != "selector"},
        {**pool["spec"], "endpointPickerRef": {"name": "picker", "portNumber": 9002}},
    ]
    for spec in broken:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**pool, "spec": spec}, INFERENCE_POOL_V1)


# -- the picker Deployment against the picker's flags -----------------------------------------


@pytest.mark.parametrize("directory", OVERLAYS, ids=path_id)
def test_ports_probes_and_tls_line_up_with_the_flags(directory):
    objects = render(directory)
    args = picker_args(objects)
    deployment = one(objects, "Deployment", "picker")
    picker = container(deployment, "picker")
    assert ports(picker) == {
        "grpc": args.grpc_port,
        "grpc-health": args.grpc_health_port,
        "metrics": args.metrics_port,
    }
    assert (args.grpc_port, args.grpc_health_port, args.metrics_port) == (9002, 9003, 9090)
    assert args.secure_serving is True
    assert picker["livenessProbe"]["grpc"] == {"port": args.grpc_health_port, "service": LIVENESS}
    assert picker["readinessProbe"]["grpc"] == {"port": args.grpc_health_port, "service": READINESS}
    assert picker["resources"]["requests"]["cpu"] and picker["resources"]["requests"]["memory"]
    # --pool-namespace defaults to $NAMESPACE: the Pod's own namespace.
    env = {e["name"]: e for e in picker["env"]}
    assert env["NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"

    service = one(objects, "Service", "picker")
    assert service["spec"]["selector"].items() <= _pod_labels(deployment).items()
    ext_proc = named(service["spec"]["ports"], "grpc-ext-proc")
    assert ext_proc["port"] == 9002
    assert ports(picker)[ext_proc["targetPort"]] == args.grpc_port
    assert ext_proc["appProtocol"] == "http2"


@pytest.mark.parametrize("directory", OVERLAYS, ids=path_id)
def test_the_mounted_config_is_one_the_picker_loads(directory, tmp_path):
    objects = render(directory)
    args = picker_args(objects)
    deployment = one(objects, "Deployment", "picker")
    mounts = {m["mountPath"]: m["name"] for m in container(deployment, "picker")["volumeMounts"]}
    folder, _, filename = args.config_file.rpartition("/")
    volume = named(pod(deployment)["volumes"], mounts[folder])
    config_map = one(objects, "ConfigMap", volume["configMap"]["name"])
    (tmp_path / filename).write_text(config_map["data"][filename])
    config = Config.load(tmp_path / filename)
    Scheduler.from_config(config, EndpointPool())  # every plugin and param is known
    assert config.objectives["batch"] < 0 <= config.objectives["default"]


@pytest.mark.parametrize("directory", OVERLAYS, ids=path_id)
def test_rbac_lets_the_service_account_discover(directory):
    objects = render(directory)
    role = one(objects, "Role", "picker")
    binding = one(objects, "RoleBinding", "picker")
    account = pod(one(objects, "Deployment", "picker"))["serviceAccountName"]
    one(objects, "ServiceAccount", account)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "picker"}
    assert {"kind": "ServiceAccount", "name": account} in binding["subjects"]
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    for group, resource in (("", "pods"), (POOL_GROUP, POOL_PLURAL)):
        for verb in ("get", "list", "watch"):
            assert (group, resource, verb) in granted
    assert all(verb in ("get", "list", "watch") for _, _, verb in granted)  # read-only


def _pod_labels(deployment: JSON) -> dict[str, str]:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    return labels


# -- the endpoint source of each overlay against the model servers ----------------------------


@pytest.mark.parametrize("servers", MODEL_SERVERS, ids=path_id)
def test_gke_pool_selects_the_model_servers(servers):
    objects = render(GKE)
    args = picker_args(objects)
    pool = one(objects, "InferencePool")
    assert args.pool_name == pool["metadata"]["name"] and args.endpoint_selector is None
    ref = pool["spec"]["endpointPickerRef"]
    service = one(objects, "Service", ref["name"])
    assert ref["port"]["number"] in {p["port"] for p in service["spec"]["ports"]}
    target_ports = [p["number"] for p in pool["spec"]["targetPorts"]]
    _assert_selects(servers, pool["spec"]["selector"]["matchLabels"], target_ports)


@pytest.mark.parametrize("servers", MODEL_SERVERS, ids=path_id)
def test_standalone_selector_selects_the_model_servers(servers):
    objects = render(STANDALONE)
    args = picker_args(objects)
    assert args.pool_name is None
    _assert_selects(servers, args.endpoint_selector, args.endpoint_target_ports)
    # Envoy's fail-open pool is the same Pods and ports.
    headless = one(objects, "Service", "vllm-llama3-8b-instruct-rr")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == args.endpoint_selector
    assert [p["port"] for p in headless["spec"]["ports"]] == args.endpoint_target_ports


def _assert_selects(servers: Path, selector: dict[str, str], target_ports: list[int]) -> None:
    deployment = one(render(servers), "Deployment")
    assert selector.items() <= _pod_labels(deployment).items()
    (server,) = pod(deployment)["containers"]
    assert sorted(target_ports) == sorted(ports(server).values())
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"  # readiness gates routing


def test_simulated_servers_run_the_repository_simulator():
    from vllm_sim.cli import parse_args

    (sim,) = pod(one(render(GATEWAY / "vllm-sim"), "Deployment"))["containers"]
    assert sim["command"] == ["python", "-m", "vllm_sim"]
    options = parse_args(sim["args"])
    assert (options.host, options.port) == ("0.0.0.0", ports(sim)["http"])
    images = {c["image"] for c in pod(one(render(GKE), "Deployment", "picker"))["containers"]}
    assert sim["image"] not in images  # its own image (the Dockerfile's vllm-sim target)


# -- GKE objects ------------------------------------------------------------------------------


def test_gke_route_and_policies_point_at_the_pool():
    objects = render(GKE)
    pool = one(objects, "InferencePool")
    pool_ref = {"group": POOL_GROUP, "kind": "InferencePool", "name": pool["metadata"]["name"]}
    gateway = one(objects, "Gateway")
    assert gateway["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert gateway["spec"]["gatewayClassName"] in ("gke-l7-regional-external-managed", "gke-l7-rilb")
    route = one(objects, "HTTPRoute")
    assert route["spec"]["parentRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gateway["metadata"]["name"]}
    ]
    assert [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]] == [pool_ref]
    for kind in ("HealthCheckPolicy", "GCPBackendPolicy"):
        policy = one(objects, kind)
        assert policy["apiVersion"] == "networking.gke.io/v1"
        assert policy["spec"]["targetRef"] == pool_ref
    check = one(objects, "HealthCheckPolicy")["spec"]["default"]["config"]
    assert check["type"] == "HTTP"
    assert check["httpHealthCheck"]["port"] in [p["number"] for p in pool["spec"]["targetPorts"]]
    assert one(objects, "GCPBackendPolicy")["spec"]["default"]["timeoutSec"] >= 300  # long generations
