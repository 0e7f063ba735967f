"""picker: a KV-cache-aware endpoint picker for vLLM replicas, speaking the EPP ext_proc protocol."""

__version__ = "0.1.0"
