"""The metrics port of a running picker: its metrics (and the reference EPP's names), the Grafana
dashboard's queries against them, and the debug views, which never show prompt text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import promql_parser
import pytest
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).parents[2] / "gateway" / "dashboards" / "picker.json"
CHAT = "/v1/chat/completions"
SECRET = "Zanzibar-ultramarine-7781 is my password"  # must never leave the request path


def exported_names(page: str) -> dict[str, list[Any]]:
    """Every sample name the page's families can carry (a counter `x`: `x_total`; a histogram:
    `_bucket`, `_sum`, `_count`), with the samples present now."""
    names: dict[str, list[Any]] = {}
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count"),
    }
    for family in text_string_to_metric_families(page):
        for suffix in suffixes.get(family.type, ("",)):
            names.setdefault(family.name + suffix, [])
        for sample in family.samples:
            names.setdefault(sample.name, []).append(sample)
    return names


def dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    panels = [p for p in doc["panels"] if p["type"] != "row"]
    queries = [target["expr"] for panel in panels for target in panel["targets"]]
    queries += [v["definition"] for v in doc["templating"]["list"] if v["type"] == "query"]
    assert len(queries) >= 20
    return queries


def metric_names(query: str) -> list[str]:
    """The metric names a PromQL query (Grafana variables filled in) reads."""
    if query.startswith("label_values("):
        query = query.removeprefix("label_values(").split(",")[0]
    expr = promql_parser.parse(query.replace("$__rate_interval", "1m"))
    names: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.append(node.name)

    promql_parser.walk(expr, visit)
    assert names, query
    return names


@pytest.fixture
async def observed(fake_vllm, picker_server, envoy, client):
    """A picker that routed three requests (one carrying SECRET) and refused one (unknown model)."""
    replicas = await fake_vllm(2)
    addresses = [r.address for r in replicas]
    picker = await picker_server(addresses)
    proxy = await envoy("picker", endpoints=addresses, picker=[picker.address])
    for text in ("first", SECRET, "third"):
        body = {"model": "fake-model", "messages": [{"role": "user", "content": text * 40}]}
        assert (await client.post(proxy.url + CHAT, json=body)).status_code == 200
    unknown = {"model": "no-such-model", "messages": [{"role": "user", "content": SECRET}]}
    assert (await client.post(proxy.url + CHAT, json=unknown)).status_code == 404
    base = f"http://127.0.0.1:{picker.metrics_port}"
    pages = {
        path: await client.get(base + path) for path in ("/metrics", "/debug/decisions", "/debug/endpoints")
    }
    assert all(page.status_code == 200 for page in pages.values())
    return addresses, {path: page.text for path, page in pages.items()}


async def test_every_dashboard_query_names_metrics_the_picker_exports(observed) -> None:
    _, pages = observed
    exported = exported_names(pages["/metrics"])
    missing = {name for query in dashboard_queries() for name in metric_names(query) if name not in exported}
    assert not missing


async def test_reference_names_report_what_picker_measured(observed) -> None:
    addresses, pages = observed
    samples = exported_names(pages["/metrics"])

    def value(metric: str, **labels: str) -> float:
        (sample,) = [s for s in samples[metric] if labels.items() <= s.labels.items()]
        return sample.value

    assert value("inference_pool_ready_pods", name="") == 2
    assert {s.labels["model_server_pod"] for s in samples["inference_pool_per_pod_queue_size"]} == set(
        addresses
    )
    assert value("inference_objective_request_total", model_name="fake-model") == 3
    assert value("inference_objective_request_error_total", error_code="BadRequest") == 1
    assert value("inference_extension_scheduler_e2e_duration_seconds_count") == 3
    assert value("picker_pick_duration_seconds_count") == 3
    assert value("inference_extension_info") == 1


async def test_debug_views_explain_decisions_without_prompt_text(observed) -> None:
    addresses, pages = observed
    for path, text in pages.items():
        for fragment in (SECRET, "Zanzibar", "password"):
            assert fragment not in text, path
    decisions = json.loads(pages["/debug/decisions"])
    names = [scorer["name"] for scorer in decisions["scorers"]]
    assert "prefix-cache-scorer" in names and "lora-affinity-scorer" in names
    assert len(decisions["decisions"]) == 3  # the refused request was never scheduled
    for decision in decisions["decisions"]:
        assert decision["model"] == "fake-model" and decision["candidates"] == 2
        assert {row["endpoint"] for row in decision["considered"]} == set(addresses)  # pick, fallback
        for row in decision["considered"]:
            assert set(row["scores"]) == set(names)
    endpoints = {row["address"]: row for row in json.loads(pages["/debug/endpoints"])["endpoints"]}
    assert set(endpoints) == set(addresses)
    for row in endpoints.values():
        assert row["freshness"] == "fresh" and row["models"] == {"fake-model": None}
        assert row["inflight_requests"] == 0
    assert sum(row["prefix_blocks"]["prefix-cache-scorer"] for row in endpoints.values()) >= 3 * 3
