"""Benchmarks for chatd; run by hand, never by the test suite."""
