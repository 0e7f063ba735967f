"""Just enough kustomize to render gateway/ without the binary, strictly.

Supports what gateway/ uses: `resources` (files and directories), `configMapGenerator` (files),
`patches` (strategic merge from `path`, JSON 6902 `add`/`replace` with a `target`) and `images`.
Anything else is an error, and so is a patch whose target does not exist. Generated ConfigMaps
keep their plain name (kustomize appends a content hash; compare with `strip_hash`). Where
kubectl is installed, test_manifests.py checks this rendering against `kubectl kustomize`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

JSON = dict[str, Any]
_SUPPORTED = {"apiVersion", "kind", "resources", "configMapGenerator", "patches", "images"}


def build(directory: Path) -> list[JSON]:
    kustomization = load_kustomization(directory)
    unsupported = set(kustomization) - _SUPPORTED
    assert not unsupported, f"{directory}: kustomize_lite cannot render {sorted(unsupported)}"
    objects: list[JSON] = []
    for entry in kustomization.get("resources", ()):
        path = directory / entry
        assert path.exists(), f"{directory}: resource {entry} does not exist"
        objects += build(path) if path.is_dir() else load_objects(path)
    for generator in kustomization.get("configMapGenerator", ()):
        data = {}
        for name in generator["files"]:
            assert (directory / name).is_file(), f"{directory}: generator file {name} missing"
            data[Path(name).name] = (directory / name).read_text()
        meta = {"name": generator["name"]}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    for patch in kustomization.get("patches", ()):
        text = patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text()
        body = yaml.safe_load(text)
        if isinstance(body, list):
            _json6902(_target(objects, patch["target"], directory), body)
        else:
            selector = {"kind": body["kind"], "name": body["metadata"]["name"]}
            _merge(_target(objects, selector, directory), body)
    for image in kustomization.get("images", ()):
        for container in _containers(objects):
            name, _, _ = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    return objects


def load_kustomization(directory: Path) -> JSON:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def load_objects(path: Path) -> list[JSON]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def strip_hash(name: str) -> str:
    """`picker-config-m7htf4gtgb` -> `picker-config`."""
    return re.sub(r"-[a-z0-9]{10}$", "", name)


def _target(objects: list[JSON], selector: JSON, directory: Path) -> JSON:
    found = [
        obj
        for obj in objects
        if obj["kind"] == selector["kind"] and obj["metadata"]["name"] == selector["name"]
    ]
    assert len(found) == 1, f"{directory}: patch target {selector} matches {len(found)} objects"
    return found[0]


def _json6902(obj: JSON, operations: list[JSON]) -> None:
    for op in operations:
        assert op["op"] in ("add", "replace"), f"unsupported JSON patch op {op['op']}"
        *parents, last = op["path"].lstrip("/").split("/")
        node: Any = obj
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            if last == "-":
                node.append(op["value"])
            elif op["op"] == "add":
                node.insert(int(last), op["value"])
            else:
                node[int(last)] = op["value"]
        else:
            assert op["op"] == "add" or last in node, f"replace of missing {op['path']}"
            node[last] = op["value"]


def _merge(base: JSON, patch: JSON) -> None:
    """Strategic merge as kustomize does it for what we patch: maps merge, lists of named items
    merge by name (new items first, as kustomize orders them), other lists are replaced."""
    for key, value in patch.items():
        assert not key.startswith("$"), f"strategic merge directive {key} not supported"
        current = base.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            _merge(current, value)
        elif _named(value) and _named(current):
            by_name = {item["name"]: item for item in current}
            added = []
            for item in value:
                if item["name"] in by_name:
                    _merge(by_name[item["name"]], item)
                else:
                    added.append(item)
            base[key] = added + current
        else:
            base[key] = value


def _named(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(i, dict) and "name" in i for i in value)


def _containers(objects: list[JSON]) -> list[JSON]:
    pods = [obj["spec"]["template"]["spec"] for obj in objects if obj["kind"] == "Deployment"]
    return [c for pod in pods for c in (*pod["containers"], *pod.get("initContainers", ()))]
