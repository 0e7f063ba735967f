"""Helpers for the unit tests: pools of endpoints, and EndpointPickerConfig documents."""

from __future__ import annotations

from typing import Any

from picker.datalayer.endpoint import EngineMetrics
from picker.datalayer.pool import EndpointPool

API_VERSION = "inference.networking.x-k8s.io/v1alpha1"
NOW = 1000.0  # the tests' frozen clock: every pool_of endpoint was scraped then


def pool_of(*loads: dict[str, Any]) -> EndpointPool:
    """A pool of fresh endpoints 10.0.0.<i>:8000 with the given metrics fields."""
    pool = EndpointPool()
    pool.set_addresses(f"10.0.0.{i}:8000" for i in range(len(loads)))
    for ep, fields in zip(pool.endpoints, loads, strict=True):
        ep.metrics = EngineMetrics(**fields)
        ep.scraped_at = NOW
        ep.refresh_load()
    return pool


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
