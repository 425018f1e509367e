"""Peer servers the benchmarks measure chatd against, speaking chatd's wire protocol."""
