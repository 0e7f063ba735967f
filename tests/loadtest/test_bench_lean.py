"""`python -m loadtest bench-lean`: the byte-for-byte check of lean closes, on a small run."""

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
