"""Test helpers shared by several test directories (one fake vLLM for all of them)."""
