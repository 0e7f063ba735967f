"""Where the pool's addresses come from: a static list, or Kubernetes (InferencePool / Pod selector)."""
