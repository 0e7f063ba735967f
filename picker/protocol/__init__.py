"""The EPP protocol: Envoy ext_proc streams in, routing answers out."""
