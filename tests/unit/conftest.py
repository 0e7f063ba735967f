"""Helpers for the unit tests: EndpointPickerConfig documents built from a few scorer entries."""

from __future__ import annotations

from typing import Any

API_VERSION = "inference.networking.x-k8s.io/v1alpha1"


def epp(
    *scorers: str | dict[str, Any], picker: dict[str, Any] | None = None, **sections: Any
) -> dict[str, Any]:
    """An EndpointPickerConfig whose one profile runs `scorers` (a type, or a plugin entry with an
    optional `weight`), then a max-score picker with `picker` parameters; `sections` are added
    at the top level."""
    plugins, refs = [], []
    for scorer in scorers:
        entry = {"type": scorer} if isinstance(scorer, str) else dict(scorer)
        weight = entry.pop("weight", None)
        plugins.append(entry)
        refs.append(
            {"pluginRef": entry.get("name", entry["type"])} | ({} if weight is None else {"weight": weight})
        )
    if picker is not None:
        plugins.append({"type": "max-score-picker", "parameters": picker})
        refs.append({"pluginRef": "max-score-picker"})
    return {
        "apiVersion": API_VERSION,
        "kind": "EndpointPickerConfig",
        "plugins": plugins,
        "schedulingProfiles": [{"name": "default", "plugins": refs}],
        **sections,
    }
