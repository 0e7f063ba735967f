"""Fixtures every test directory may use: `fake_vllm` (tests/support/fake_vllm.py)."""

pytest_plugins = ["tests.support.fake_vllm"]
