"""Property tests drive a real gRPC picker (`make_picker` from the protocol tests)."""

from __future__ import annotations

import pytest

from picker.config import Config, MetricsConfig
from tests.protocol.conftest import Picker, make_picker  # noqa: F401  (fixture, re-exported)


@pytest.fixture
async def picker(make_picker) -> Picker:  # noqa: F811
    """One picker for all of a test's examples: each must leave it able to serve the next.
    Nothing scrapes here, so the metrics set at start must not go stale during the run."""
    return await make_picker(Config(metrics=MetricsConfig(stale_after=3600)))
