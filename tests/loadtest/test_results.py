"""Merging client measurements, ratios and targets, and the files a run writes."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from loadtest import report
from loadtest.client import ClientResult
from loadtest.observe import COUNTERS, counter_delta, parse_counters
from loadtest.runner import RunPlan
from loadtest.stack import PoolSpec
from loadtest.stats import Measurement, ModeResult, percentiles, summarize
from loadtest.targets import check
from loadtest.workloads import SharedPrefix, Uniform


def counters(queries: float, hits: float) -> dict[str, float]:
    return dict.fromkeys(COUNTERS, 0.0) | {
        "vllm:prefix_cache_queries_total": queries,
        "vllm:prefix_cache_hits_total": hits,
    }


def client(started: float, ended: float, ttft: list[float], **fields) -> ClientResult:
    return ClientResult(started=started, ended=ended, completed=len(ttft), ttft=ttft, e2e=ttft, **fields)


def test_percentiles_are_in_milliseconds() -> None:
    stats = percentiles([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01)
    assert percentiles([]) == {}


def test_summarize_merges_clients_over_the_shared_window() -> None:
    clients = [
        client(10.0, 12.0, [0.1, 0.2], input_tokens=100, output_tokens=40,
               errors=Counter({"http_503": 1}), replicas=Counter({"0": 3})),
        client(10.5, 14.0, [0.3], input_tokens=60, output_tokens=20, replicas=Counter({"1": 1})),
    ]  # fmt: skip
    measured = Measurement(
        clients, {"0": counters(1000, 250), "1": counters(1000, 750)}, {"0": "fast", "1": "slow"},
        {"envoy": 2.0, "picker": 0.6}, host_cpu_busy=0.5, extproc_messages={"sent": 9, "received": 6},
    )  # fmt: skip
    result = summarize([measured])
    assert (result.requests, result.completed, result.errors) == (4, 3, 1)
    assert result.errors_by_kind == {"http_503": 1}
    assert result.duration_s == pytest.approx(4.0)  # 10.0 .. 14.0
    assert result.output_tokens_per_s == pytest.approx(60 / 4)
    assert result.total_tokens_per_s == pytest.approx(220 / 4)
    assert result.prefix_cache_hit_rate == pytest.approx(0.5)
    assert result.per_replica_hit_rate == {"0": 0.25, "1": 0.75}
    assert result.per_replica_requests == {"0": 3, "1": 1}
    assert set(result.cpu_seconds) == {"client-0", "client-1", "envoy", "picker"}
    # Per completed request (3) and per 1,000 output tokens (60).
    assert result.proxy_cost["envoy CPU ms"] == pytest.approx(
        {"per request": 2000 / 3, "per 1k output tokens": 2e6 / 60}
    )
    assert result.proxy_cost["picker CPU ms"]["per request"] == pytest.approx(200.0)
    assert result.proxy_cost["ext_proc messages"] == pytest.approx({"sent": 3.0, "received": 2.0})


def test_repeats_pool_samples_and_sum_windows() -> None:
    def once(start: float, ttft: float, hits: float, busy: float) -> Measurement:
        run = client(start, start + 2, [ttft], input_tokens=10, output_tokens=10, replicas=Counter({"1": 1}))
        return Measurement([run], {"1": counters(100, hits)}, {"1": "h100-8b"}, {"picker": 1.0}, busy)

    result = summarize([once(0.0, 0.1, 20, 0.2), once(50.0, 0.3, 60, 0.6)])
    assert result.repeats == 2 and result.requests == 2
    assert result.duration_s == pytest.approx(4.0)  # two 2 s windows, not the 52 s between them
    assert result.total_tokens_per_s == pytest.approx(40 / 4)
    assert [(r.total_tokens_per_s, r.host_cpu_busy) for r in result.by_repeat] == [(10.0, 0.2), (10.0, 0.6)]
    assert result.ttft_ms["p50"] == pytest.approx(200.0)
    assert result.prefix_cache_hit_rate == pytest.approx(0.4)
    assert result.cpu_seconds == {"client-0": 0.0, "picker": 2.0}
    assert result.host_cpu_busy == pytest.approx(0.4)


def test_counters_are_summed_over_label_sets_and_differenced() -> None:
    page = (
        "# TYPE vllm:prefix_cache_hits_total counter\n"
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 30.0\n'
        'vllm:prefix_cache_hits_total{engine="1",model_name="m"} 12.0\n'
        'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100.0\n'
        "vllm:prefix_cache_hits_created 1.7e9\n"
    )
    parsed = parse_counters(page)
    assert parsed["vllm:prefix_cache_hits_total"] == 42.0
    assert parsed["vllm:prefix_cache_queries_total"] == 100.0
    delta = counter_delta({"r": counters(40, 10)}, {"r": parsed})
    assert delta["r"]["vllm:prefix_cache_hits_total"] == 32.0


def mode_result(output_tps: float, ttft_p90: float, hit_rate: float | None) -> ModeResult:
    latency = {"p50": ttft_p90 / 2, "p90": ttft_p90, "p99": ttft_p90 * 2}
    return ModeResult(
        requests=10, completed=10, errors=0, errors_by_kind={}, duration_s=1.0, request_throughput=10.0,
        input_tokens=1000, output_tokens=int(output_tps), output_tokens_per_s=output_tps,
        total_tokens_per_s=output_tps + 1000, ttft_ms=latency, tpot_ms=latency, itl_ms=latency,
        e2e_ms=latency, prefix_cache_hit_rate=hit_rate, recomputed_prompt_tokens_per_request=None,
        per_replica_hit_rate={"a:1": hit_rate},
        preemptions=0, per_replica_requests={"a:1": 10}, replica_profiles={"a:1": "h100-8b"},
        cpu_seconds={"client-0": 0.5},
        cpu_cores_used=0.5, proxy_cost={}, host_cpu_busy=0.4,
    )  # fmt: skip


def test_targets_compare_the_picker_with_its_baseline() -> None:
    modes = {"direct": mode_result(100, 1000, 0.2), "picker": mode_result(140, 150, 0.5)}
    checks = {str(c.target): c for c in check("shared-prefix", modes)}
    assert checks["picker TTFT p90 ms <= 0.2 x direct"].met  # 0.15
    assert checks["picker output tok/s >= 1.3 x direct"].met  # 1.4
    assert checks["picker prefix hit rate >= 2 x direct"].met  # 2.5
    modes["picker"] = mode_result(120, 250, None)
    assert not any(c.met for c in check("shared-prefix", modes))
    assert check("uniform", {"picker": modes["picker"]}) == []  # no baseline measured


def test_write_gives_results_json_report_and_plots(tmp_path: Path) -> None:
    results = report.Results("shared-prefix", {"command": "python -m loadtest run ..."})
    for concurrency in (4, 8):
        results.add(concurrency, "direct", mode_result(100, 1000, 0.2))
        results.add(concurrency, "envoy-rr", mode_result(95, 1100, 0.2))
        results.add(concurrency, "picker", mode_result(140, 150, 0.5))
    path = report.write(results, tmp_path)

    doc = orjson.loads((tmp_path / "results.json").read_bytes())
    assert doc["workload"] == "shared-prefix" and doc["concurrency"] == 8
    picker = doc["modes"]["picker"]
    expected = {
        *("requests", "errors", "output_tokens_per_s", "total_tokens_per_s", "prefix_cache_hit_rate"),
        *("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "per_replica_requests", "cpu_seconds"),
    }
    assert expected <= set(picker)
    assert [entry["concurrency"] for entry in doc["sweep"]] == [4, 8]
    assert all(t["met"] for t in doc["targets"])

    markdown = path.read_text()
    assert "Ratio to `direct`" in markdown and "Ratio to `envoy-rr`" in markdown
    assert "| picker | 1.40x |" in markdown  # output tok/s 140 / 100
    assert "| a:1 | h100-8b | 10 | 50.0% |" in markdown
    assert "Warning" not in markdown  # the host was 40% busy
    images = [line.split("(")[1].rstrip(")") for line in markdown.splitlines() if line.startswith("![")]
    assert "sweep.png" in images and "latency-c8.png" in images and "throughput-c4.png" in images
    for image in images:
        assert (tmp_path / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_concurrency_is_split_evenly_over_client_processes(tmp_path: Path) -> None:
    plan = RunPlan("uniform", Uniform(), ("direct",), (5,), PoolSpec(), tmp_path, clients=2)
    assert plan.shares(5) == [3, 2]
    assert plan.shares(1) == [1]  # never a client without a stream
    assert plan.requests_at(5) == 50  # InferenceMAX: 10 x concurrency
    prefix = SharedPrefix(groups=30)
    assert RunPlan("shared-prefix", prefix, ("direct",), (5,), PoolSpec(), tmp_path).requests_at(5) == 300


def test_a_mode_measured_on_a_saturated_host_is_flagged() -> None:
    results = report.Results("uniform", {"command": "x"})
    results.add(8, "direct", mode_result(100, 1000, None))
    results.add(8, "picker", replace(mode_result(100, 1000, None), host_cpu_busy=0.95))
    assert results.saturated() == ["picker c=8 (95%)"]
    assert "**Warning:** the host's CPU was at least 90% busy while measuring picker c=8 (95%)" in (
        report.render_markdown(results, {})
    )
