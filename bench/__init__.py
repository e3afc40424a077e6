"""Benchmarks and load drivers. A package so tests can import their reusable parts (bench.load)."""
