"""A short run of `python -m loadtest chaos`: every fault phase, every check must hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.chaos import ChaosPlan, run_chaos

pytestmark = pytest.mark.timeout(120)


async def test_short_chaos_run_passes_every_check(tmp_path: Path) -> None:
    report = await run_chaos(ChaosPlan(out=tmp_path, phase_seconds=1.5, concurrency=4, burst=300))
    assert report["checks"] and all(report["checks"].values()), report["checks"]
    phases = {p["name"]: p for p in report["phases"]}
    assert phases["picker-down"]["fail_open"] > 0 and phases["picker-down"]["sent"] > 0
    assert phases["picker-back"]["affinity"] > phases["picker-down"]["affinity"]  # KV-aware again
    assert phases["burst"]["sent"] >= 300 and not phases["burst"]["failed"]
    assert json.loads((tmp_path / "chaos.json").read_text())["checks"] == report["checks"]
    assert "| picker-down |" in (tmp_path / "chaos.md").read_text()
