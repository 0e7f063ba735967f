"""Endpoint state: what the picker knows about each replica (scraped metrics, its own in-flight load)."""
