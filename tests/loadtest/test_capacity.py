"""Capacity at an SLO: the rate ladder's options, its stages, and the headline per mode."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import pytest

from loadtest import capacity as capacity_command
from loadtest import cli, report
from loadtest.client import Stage
from loadtest.runner import LADDER_CONCURRENCY, LADDER_STAGE_SECONDS
from loadtest.stack import MODES
from loadtest.stats import Capacity, ModeResult, capacity, meets_slo
from loadtest.targets import check_ladders
from loadtest.workloads import CachePressure
from tests.loadtest.test_results import mode_result
from tests.loadtest.test_trace import write_trace


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser, "run")
    args = parser.parse_args(["--workload", "uniform", *argv])
    args.command = "run"
    return args


def test_several_rates_make_a_ladder_with_a_warm_up_stage_first() -> None:
    plan = cli.plan_from_args(parse("--request-rate", "8,4,6,6", "--slo-ttft-p90", "500", "--duration", "30"))
    assert plan.ladder == (4.0, 6.0, 8.0) and plan.request_rate is None  # sorted, once each
    assert plan.slo_ttft_p90_ms == 500.0
    assert plan.concurrencies == (LADDER_CONCURRENCY,)  # the replicas queue, not the client
    assert plan.stages() == [
        Stage(4.0, duration=10.0),
        Stage(4.0, None, 30.0),
        Stage(6.0, None, 30.0),
        Stage(8.0, None, 30.0),
    ]


def test_stages_counted_in_requests_warm_up_in_requests_too() -> None:
    plan = cli.plan_from_args(parse("--request-rate", "2,5", "--requests", "50", "--warmup-stage", "3"))
    # every window a cut of the global stream, so the client processes agree where it ends
    assert plan.stages() == [Stage(2.0, max_requests=6), Stage(2.0, 50, None), Stage(5.0, 50, None)]
    unbounded = cli.plan_from_args(parse("--request-rate", "2,5", "--warmup-stage", "0"))
    assert unbounded.stages() == [
        Stage(2.0, None, LADDER_STAGE_SECONDS),
        Stage(5.0, None, LADDER_STAGE_SECONDS),
    ]


def test_one_rate_is_a_single_open_loop_run() -> None:
    plan = cli.plan_from_args(parse("--request-rate", "7.5"))
    assert plan.ladder == () and plan.request_rate == 7.5 and plan.concurrencies == (32,)


@pytest.mark.parametrize("text", ["", "4,x", "0,4", "-1"])
def test_bad_rates_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cli._rates(text)


def test_a_ladder_is_not_repeated() -> None:
    with pytest.raises(ValueError, match="ladder"):
        cli.plan_from_args(parse("--request-rate", "1,2", "--repeat", "2"))


def stage(ttft_p90: float, errors: int = 0) -> ModeResult:
    return replace(mode_result(100, ttft_p90, 0.5), requests=100, completed=100 - errors, errors=errors)


def test_a_stage_meets_the_slo_within_the_latency_and_1_percent_failures() -> None:
    assert meets_slo(stage(500), 500) and not meets_slo(stage(501), 500)
    assert meets_slo(stage(100, errors=1), 500) and not meets_slo(stage(100, errors=2), 500)
    assert meets_slo(stage(9e9), None)  # no SLO: only failures count


def test_capacity_is_the_top_of_the_unbroken_run_of_met_stages() -> None:
    ladder = {4.0: stage(100), 6.0: stage(200), 8.0: stage(450), 10.0: stage(900), 12.0: stage(3000)}
    assert capacity(ladder, 500) == Capacity(8.0, at_least=False, unsteady=())


def test_a_miss_in_the_middle_caps_capacity_and_is_flagged() -> None:
    ladder = {4.0: stage(100), 6.0: stage(100, errors=5), 8.0: stage(300), 10.0: stage(900)}
    assert capacity(ladder, 500) == Capacity(4.0, at_least=False, unsteady=(8.0,))


def test_capacity_when_no_stage_or_every_stage_meets_the_slo() -> None:
    assert capacity({4.0: stage(600), 6.0: stage(700)}, 500) == Capacity(None, False, ())
    assert capacity({4.0: stage(100), 6.0: stage(200)}, 500) == Capacity(6.0, True, ())


def test_report_states_capacity_and_its_ratio_to_envoy_rr(tmp_path: Path) -> None:
    results = report.Results("well-lit", {"command": "x"}, slo_ttft_p90_ms=500)
    for rate, rr, picked in ((2.0, 100, 50), (4.0, 800, 60), (6.0, 2000, 200), (8.0, 3000, 700)):
        results.add_stage(rate, "envoy-rr", stage(rr))
        results.add_stage(rate, "picker", stage(picked))
    assert results.capacity_ratio("picker") == 3.0  # 6/s vs 2/s
    assert results.capacity_ratio("oracle") is None  # not run
    doc = results.to_json()
    assert doc["capacity"]["picker"] == {
        "rate": 6.0, "at_least": False, "unsteady": (), "vs envoy-rr": 3.0, "vs oracle": None,
        "hit rate vs oracle": None,
    }  # fmt: skip
    assert [s["meets_slo"] for s in doc["ladder"]["envoy-rr"]] == [True, False, False, False]
    text = report.write(results, tmp_path).read_text()
    assert "| picker | 6 req/s | 3.00x | - | - |" in text
    assert "### Ladder: envoy-rr" in text and (tmp_path / "ladder.png").exists()


def hit(ttft_p90: float, hit_rate: float) -> ModeResult:
    return replace(stage(ttft_p90), prefix_cache_hit_rate=hit_rate)


def test_ladder_targets_of_a_preset_skip_modes_that_did_not_run() -> None:
    ladders = {
        "envoy-rr": {2.0: hit(300, 0.2), 4.0: hit(900, 0.2), 6.0: hit(4000, 0.2)},
        "picker": {2.0: hit(100, 0.6), 4.0: hit(200, 0.7), 6.0: hit(400, 0.7)},
        "oracle": {2.0: hit(100, 0.7), 4.0: hit(150, 0.7)},
    }
    checks = {str(k.target): k for k in check_ladders("cache-pressure", ladders, 1000)}
    assert set(checks) == {"picker hit rate >= 0.9 x oracle", "picker capacity >= 1.3 x envoy-rr"}  # no x2/x3
    assert (
        checks["picker capacity >= 1.3 x envoy-rr"].value == 1.5
        and checks["picker capacity >= 1.3 x envoy-rr"].met
    )
    hits = checks["picker hit rate >= 0.9 x oracle"]  # stages both met the SLO: (0.6 + 0.7) / (0.7 + 0.7)
    assert hits.value == pytest.approx(1.3 / 1.4) and hits.met
    trace = {str(k.target): k for k in check_ladders("trace", ladders, 1000)}
    at_rr_capacity = trace["picker TTFT p90 at baseline capacity <= 0.5 x envoy-rr"]  # at 4/s: 200 vs 900
    assert at_rr_capacity.value == pytest.approx(200 / 900) and at_rr_capacity.met


def test_several_pickers_must_stay_within_3_points_of_one() -> None:
    ladders = {"picker": {2.0: hit(100, 0.70)}, "picker-x2": {2.0: hit(100, 0.66)}}
    checks = {str(k.target): k for k in check_ladders("cache-pressure", ladders, 1000)}
    lost = checks["picker-x2 hit rate within 3 points of picker"]
    assert lost.value == pytest.approx(0.04) and not lost.met
    assert checks["picker-x2 capacity >= 0.95 x picker"].met  # both >= 2/s


def test_capacity_presets_plan_a_ladder_with_the_existing_modes(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    capacity_command.add_arguments(parser, "capacity")
    trace = write_trace(tmp_path / "trace.jsonl")
    for preset in sorted(capacity_command.PRESETS):
        args = parser.parse_args(["--preset", preset, "--trace", str(trace), "--out", str(tmp_path)])
        plan = capacity_command.plan_for(args)
        assert plan.workload_name == preset and len(plan.ladder) >= 5 and plan.slo_ttft_p90_ms
        assert set(plan.modes) <= set(MODES) and {"envoy-rr", "picker", "oracle"} <= set(plan.modes)
    pressure = capacity_command.plan_for(parser.parse_args(["--preset", "cache-pressure", "--rates", "3,1"]))
    assert pressure.ladder == (1.0, 3.0)
    assert isinstance(pressure.workload, CachePressure)
    pool_tokens = pressure.pool.replicas * pressure.pool.kv_tokens
    assert 2.2 <= pressure.workload.groups * pressure.workload.prefix_tokens / pool_tokens <= 2.8


def test_hit_rates_compare_on_stages_within_the_slo_where_routing_not_queues_decides() -> None:
    ladders = {
        "picker": {2.0: hit(100, 0.8), 4.0: hit(100, 0.8)},
        "oracle": {2.0: hit(100, 0.8), 4.0: hit(5000, 0.2)},  # collapsed past its capacity
    }
    (share,) = check_ladders("cache-pressure", ladders, 1000)
    assert share.value == 1.0  # at 2/s only, not (0.8 + 0.8) / (0.8 + 0.2)
    results = report.Results("cache-pressure", {}, ladder=ladders, slo_ttft_p90_ms=9999)
    assert results.hit_share_of_oracle("picker") == pytest.approx(1.6 / 1.0)  # both within: all stages
