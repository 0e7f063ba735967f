"""Shared end-to-end fixtures: fake vLLM replicas, Envoy, and the picker as a subprocess.

- `fake_vllm(n, **options)` -> `list[FakeVLLM]` (from tests/conftest.py): in-process replicas whose
  `/metrics` values a test sets directly and which record every inference request they serve
  (`tests/support/fake_vllm.py`).
- `envoy(config, endpoints=..., picker=..., ...)` -> `loadtest.envoy.Envoy`, stopped at teardown.
- `refused_address`: a "127.0.0.1:port" nothing answers on (a picker that is down).
- `picker_server(endpoints, *args)` -> `PickerProcess`, started with `--secure-serving=false` and
  awaited until its gRPC health service reports `readiness` SERVING.
- `picker_metrics(picker)`, `metric(samples, name, **labels)`: read a picker's Prometheus page.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from loadtest.envoy import Envoy
from loadtest.processes import PickerProcess, start_picker


@pytest.fixture
def refused_address() -> Iterator[str]:
    """ "127.0.0.1:port" where connections are refused: bound, never listening, held all test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
async def envoy(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Envoy]]]:
    """Factory: `await envoy("picker"|"gie"|"gie-lean"|"rr", endpoints=[...], picker=[...], ...)`.

    Takes `loadtest.envoy.Envoy.start`'s arguments; logs land in the test's tmp_path.
    """
    runs = itertools.count()
    async with contextlib.AsyncExitStack() as stack:

        async def start(config: str = "picker", **options: Any) -> Envoy:
            workdir = tmp_path / f"envoy-{next(runs)}"
            return await stack.enter_async_context(Envoy.start(config, workdir=workdir, **options))

        yield start


@pytest.fixture
async def picker_server(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[PickerProcess]]]:
    """Factory: `await picker_server(endpoints, *extra_cli_args)` -> a ready plaintext picker
    (`loadtest.processes.start_picker`), stopped at teardown."""
    runs = itertools.count()
    async with contextlib.AsyncExitStack() as stack:

        async def start(endpoints: Sequence[str], *args: str) -> PickerProcess:
            log_path = tmp_path / f"picker-{next(runs)}.log"
            return await stack.enter_async_context(start_picker(endpoints, log_path, args))

        yield start


async def picker_metrics(picker: PickerProcess) -> list[Sample]:
    async with httpx.AsyncClient(timeout=5.0) as http:
        page = (await http.get(f"http://127.0.0.1:{picker.metrics_port}/metrics")).text
    return [sample for family in text_string_to_metric_families(page) for sample in family.samples]


def metric(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The value of the sample `name` whose labels include `labels`, if there is one."""
    for sample in samples:
        if sample.name == name and labels.items() <= sample.labels.items():
            return sample.value
    return None
