"""Fault tests reuse the end-to-end fixtures, whose replicas can also die and come back.

- `fake_vllm`, `envoy`, `picker_server`, `refused_address`: as in `tests/e2e/conftest.py`.
  (`FakeVLLM.kill()` closes the listener and every connection at once, so the port refuses like
  a crashed server's, and `start()` serves again on the same port.)
- `config_file(**sections)` -> the path of a picker config file written for the test.
- `picker_metrics(picker)` -> the samples on a picker process's Prometheus page.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import (  # noqa: F401  (fixtures and helpers, re-exported for this directory)
    envoy,
    metric,
    picker_metrics,
    picker_server,
    refused_address,
)

CHAT = "/v1/chat/completions"


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": content}], **extra}


@pytest.fixture
def config_file(tmp_path: Path) -> Callable[..., str]:
    """Factory: `config_file(metrics={...}, saturationDetector={...})` -> path for `--config-file`:
    an EndpointPickerConfig with these top-level sections."""
    counter = itertools.count()

    def write(**sections: Any) -> str:
        path = tmp_path / f"picker-config-{next(counter)}.yaml"
        header = {"apiVersion": "inference.networking.x-k8s.io/v1alpha1", "kind": "EndpointPickerConfig"}
        path.write_text(yaml.safe_dump(header | sections))
        return str(path)

    return write


