"""`python -m loadtest` end to end: real simulator, Envoy and picker processes, tiny runs.

Every test records the runner's descendants while it runs and checks that none outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import psutil
import pytest

from loadtest.stack import MODES

FAST_UNIFORM = (
    *("--workload", "uniform", "--replicas", "2", "--speed", "20"),
    *("--set", "input_tokens=64", "--set", "output_tokens=8", "--set", "range_ratio=1"),
)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    descendants: dict[psutil.Process, str] = field(default_factory=dict)  # -> command line
    leftovers: list[str] = field(default_factory=list)  # still running after the runner exited

    def started(self, word: str) -> bool:
        return any(word in cmdline for cmdline in self.descendants.values())

    def kill_leftovers(self) -> None:
        """Record and kill descendants that outlived the runner (so a failing test leaks nothing)."""
        for process, cmdline in self.descendants.items():
            with contextlib.suppress(psutil.Error):
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    self.leftovers.append(cmdline)
                    process.kill()


async def loadtest(
    *args: str, within: float = 90.0, when: Callable[[Run], bool] | None = None,
    then: Callable[[asyncio.subprocess.Process], Awaitable[None]] | None = None,
) -> Run:  # fmt: skip
    """Run `python -m loadtest ARGS`, noting every descendant; `then` runs once `when` holds."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loadtest",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    run = Run(0, "", "")
    parent = psutil.Process(process.pid)

    async def watch() -> None:
        triggered = False
        while process.returncode is None:
            try:
                children = parent.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for child in children:
                if child not in run.descendants:
                    with contextlib.suppress(psutil.Error):
                        run.descendants[child] = " ".join(child.cmdline())
            if not triggered and when is not None and then is not None and when(run):
                triggered = True
                await then(process)
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), within)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await watcher
        run.kill_leftovers()
    run.returncode, run.stdout, run.stderr = process.returncode, stdout.decode(), stderr.decode()
    return run


async def test_every_mode_runs_on_its_own_stack_and_is_reported(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = await loadtest(
        "run", *FAST_UNIFORM, "--modes", ",".join(MODES),
        "--concurrency", "2", "--requests", "8", "--clients", "2", "--out", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert f"Report: {out / 'report.md'}" in run.stdout.replace("\n", "")
    doc = orjson.loads((out / "results.json").read_bytes())
    assert (doc["workload"], doc["concurrency"]) == ("uniform", 2)
    assert list(doc["modes"]) == list(MODES)
    for mode, result in doc["modes"].items():
        assert (result["requests"], result["errors"]) == (8, 0), mode
        assert result["output_tokens"] == 8 * 8
        per_replica = sorted(result["per_replica_requests"].values())
        round_robin = mode in ("direct", "envoy-rr")
        assert sum(per_replica) == 8 and (per_replica == [4, 4] or not round_robin)  # round-robin: even
        assert set(result["replica_profiles"].values()) == {"h100-8b"}
        assert 0 < result["ttft_ms"]["p50"] <= result["e2e_ms"]["p50"]
        assert result["clients"] == 2 and result["cpu_seconds"]["client-1"] > 0
        assert result["cpu_seconds"]["simulator"] >= 0  # psutil counts 10 ms ticks: a tiny run may show 0
        assert ("envoy" in result["cpu_seconds"]) == (mode not in ("direct", "oracle"))
        assert ("picker" in result["cpu_seconds"]) == ("picker" in mode)
        messages = result["proxy_cost"].get("ext_proc messages")
        assert (messages is not None) == ("picker" in mode)
        if messages is not None and mode != "picker-gie-echo":  # never a message per token
            assert 2 <= messages["sent"] <= 8 and 1 <= messages["received"] <= 8
    echoed = doc["modes"]["picker-gie-echo"]["proxy_cost"]["ext_proc messages"]
    assert echoed["sent"] > doc["modes"]["picker-gie"]["proxy_cost"]["ext_proc messages"]["sent"]
    assert len(doc["targets"]) == 2  # the uniform workload's two targets
    report = (out / "report.md").read_text()
    assert "Ratio to `envoy-rr`" in report and (out / "latency-c2.png").exists()
    assert "| picker-gie-echo |" in report.split("Proxy cost")[1]
    assert not run.leftovers


async def test_a_timed_repeated_sweep_stops_by_itself(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    run = await loadtest(
        "run", *FAST_UNIFORM, "--modes", "direct", "--concurrency", "2,1", "--duration", "1", "--repeat", "2",
        "--out", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    doc = orjson.loads((out / "results.json").read_bytes())
    assert [entry["concurrency"] for entry in doc["sweep"]] == [1, 2]
    for entry in doc["sweep"]:
        direct = entry["modes"]["direct"]
        assert direct["requests"] > 0 and direct["errors"] == 0
        assert direct["repeats"] == 2 and len(direct["by_repeat"]) == 2
        assert 2.0 <= direct["duration_s"] < 10.0  # two windows; started requests end after the deadline
    assert (out / "sweep.png").exists()
    assert not run.leftovers


async def test_a_failing_picker_stops_the_run_and_everything_it_started(tmp_path: Path) -> None:
    run = await loadtest(
        "run", *FAST_UNIFORM, "--modes", "picker", "--concurrency", "1", "--requests", "2",
        "--picker-arg=--no-such-flag", "--out", str(tmp_path / "fail"),
    )  # fmt: skip
    assert run.returncode == 1
    assert "picker exited with 2" in run.stderr and "logs in" in run.stderr
    assert not run.leftovers


async def test_ctrl_c_mid_run_stops_every_process(tmp_path: Path) -> None:
    def clients_running(run: Run) -> bool:
        return run.started("loadtest client")

    async def interrupt(process: asyncio.subprocess.Process) -> None:
        await asyncio.sleep(0.5)  # let the measured phase begin
        process.send_signal(signal.SIGINT)

    run = await loadtest(
        "run", *FAST_UNIFORM, "--modes", "picker", "--concurrency", "2", "--duration", "60",
        "--out", str(tmp_path / "interrupted"), when=clients_running, then=interrupt, within=40.0,
    )  # fmt: skip
    assert run.returncode == 1 and "interrupted" in run.stderr
    assert all(run.started(word) for word in ("vllm_sim", "envoy", "picker serve", "loadtest client"))
    assert not run.leftovers


@pytest.mark.timeout(180)
async def test_the_demo_prints_its_table_and_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    run = await loadtest("demo", "--requests", "48", "--out", str(out), within=170.0)
    assert run.returncode == 0, run.stderr
    for mode in ("direct", "envoy-rr", "picker"):
        assert f"  {mode} " in run.stdout
    assert "prefix hit rate >= 2 x direct" in run.stdout
    assert (out / "report.md").exists()
    assert not run.leftovers


async def test_a_rate_ladder_measures_every_stage_and_states_capacity(tmp_path: Path) -> None:
    out = tmp_path / "ladder"
    run = await loadtest(
        "run", "--workload", "shared-prefix", "--replicas", "2", "--speed", "20",
        "--modes", "envoy-rr,oracle", *("--set", "groups=4", "--set", "prefix_tokens=256"),
        *("--set", "question_tokens=16", "--set", "output_tokens=4"),
        "--request-rate", "20,10", "--requests", "12", "--warmup-stage", "0.5", "--slo-ttft-p90", "5000",
        "--out", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    doc = orjson.loads((out / "results.json").read_bytes())
    for mode in ("envoy-rr", "oracle"):
        stages = doc["ladder"][mode]
        assert [s["rate"] for s in stages] == [10.0, 20.0]
        assert all((s["requests"], s["errors"], s["meets_slo"]) == (12, 0, True) for s in stages), mode
        assert all(s["recomputed_prompt_tokens_per_request"] > 0 for s in stages)
        headline = {"rate": 20.0, "at_least": True, "unsteady": [], "vs envoy-rr": 1.0, "vs oracle": 1.0}
        assert doc["capacity"][mode].items() >= headline.items()
    # The oracle sends every request to the replica holding its group's prefix (primed in warm-up).
    for oracle, rr in zip(doc["ladder"]["oracle"], doc["ladder"]["envoy-rr"], strict=True):
        assert (
            oracle["prefix_cache_hit_rate"] > 0.8
            and oracle["prefix_cache_hit_rate"] >= rr["prefix_cache_hit_rate"]
        )
    assert "## Capacity at the SLO" in (out / "report.md").read_text()
    assert not run.leftovers
