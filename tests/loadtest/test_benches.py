"""Small runs of the benchmarks whose numbers the README quotes: they run, and report what they claim."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)


def test_lean_close_delivers_every_byte_and_reports_its_cost(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "loadtest", "bench-lean", "--streams", "300", "--burners", "0",
         "--variants", "close,echo", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads((tmp_path / "bench_lean.json").read_text())
    close, echo = result["variants"]["close"], result["variants"]["echo"]
    assert close["outcomes"] == {"ok": 300} and close["bytes_lost"] == 0
    assert echo["outcomes"] == {"ok": 300}
    assert close["extproc_streams_failed"] == 0
    # Closing spares Envoy the response messages it sends the picker when echoing.
    assert close["extproc_messages_per_stream"]["sent"] < echo["extproc_messages_per_stream"]["sent"]
    assert close["cpu_ms_per_stream"]["picker"] > 0
    assert "| close | 300 |" in (tmp_path / "bench_lean.md").read_text()


def test_scrape_cost_is_measured_per_scrape_of_a_real_size_page(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "loadtest", "bench-scrape", "--endpoints", "2", "--seconds", "3",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads((tmp_path / "bench_scrape.json").read_text())
    assert result["page_bytes"] > 20_000  # every vLLM metric family, with buckets
    (pool,) = result["pools"]
    assert pool["endpoints"] == 2 and pool["scrapes"] >= 30  # ~2 endpoints x 10 per second
    assert pool["picker_cpu_ms_per_scrape"] > 0
    assert result["simulator"]["sim_cpu_ms_per_page"] > 0
