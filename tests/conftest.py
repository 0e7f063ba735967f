"""Fixtures every test directory may use: `fake_vllm` (tests/support/fake_vllm.py), and `client`,
an httpx.AsyncClient with a 30 s timeout."""

from collections.abc import AsyncIterator

import httpx
import pytest

pytest_plugins = ["tests.support.fake_vllm"]


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30.0) as http:
        yield http
