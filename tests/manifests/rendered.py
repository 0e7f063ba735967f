"""The rendered gateway/ manifests and helpers to find things in them."""

from __future__ import annotations

import argparse
import copy
import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kustomize_lite import build

from picker.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = ROOT / "gateway"
KUSTOMIZATIONS = sorted(path.parent for path in GATEWAY.rglob("kustomization.yaml"))
GKE, STANDALONE = GATEWAY / "overlays/gke", GATEWAY / "overlays/standalone"
OVERLAYS = [GKE, STANDALONE]
MODEL_SERVERS = [GATEWAY / "vllm", GATEWAY / "vllm-sim"]
# The oldest Kubernetes the bundled schemas cover; what GKE's channels run today or newer.
KUBERNETES_VERSION = "1.33.0"
BUILT_IN_GROUPS = {"v1", "apps/v1", "rbac.authorization.k8s.io/v1"}
CUSTOM_KINDS = {"InferencePool", "Gateway", "HTTPRoute", "HealthCheckPolicy", "GCPBackendPolicy"}

JSON = dict[str, Any]


def path_id(path: Path) -> str:
    return str(path.relative_to(GATEWAY))


def render(directory: Path) -> tuple[JSON, ...]:
    """The objects `kubectl apply -k directory` would create (a private copy each call)."""
    return copy.deepcopy(_render(directory))


@functools.cache
def _render(directory: Path) -> tuple[JSON, ...]:
    return tuple(build(directory))


def one(objects: tuple[JSON, ...], kind: str, name: str | None = None) -> JSON:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def named(items: Iterable[JSON], name: str) -> JSON:
    """The one list entry (container, port, volume) called `name`."""
    found = [item for item in items if item.get("name") == name]
    assert len(found) == 1, f"expected one {name}, found {len(found)}"
    return found[0]


def pod(deployment: JSON) -> JSON:
    return deployment["spec"]["template"]["spec"]


def container(deployment: JSON, name: str) -> JSON:
    return named(pod(deployment)["containers"], name)


def picker_args(objects: tuple[JSON, ...]) -> argparse.Namespace:
    """The picker container's args as `picker serve` itself parses them."""
    args = container(one(objects, "Deployment", "picker"), "picker")["args"]
    return build_parser().parse_args(["serve", *args])


def ports(c: JSON) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c.get("ports", ())}
