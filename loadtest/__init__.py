"""Load-testing tools for picker: simulated vLLM replicas, load generator and Envoy launcher."""
