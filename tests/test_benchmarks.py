"""The benchmark harness: its latency histogram, and a smoke run of ``python -m benchmarks``.

The benchmarks' figures are never pass/fail; these tests only check that the harness works.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.hdr import Histogram, bucket_bounds, bucket_index

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("chatd", "chatd_durable", "peer")


def expected(ordered: list[int], p: float) -> int:
    """The sample at percentile ``p`` of sorted samples (nearest rank)."""
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def test_buckets_hold_their_values() -> None:
    rng = random.Random(1)
    values = [*range(5000), *(rng.randrange(1, 10**12) for _ in range(20000))]
    for value in values:
        index = bucket_index(value)
        low, high = bucket_bounds(index)
        assert low <= value <= high
        assert bucket_index(low) == bucket_index(high) == index
        assert high - low <= max(low // 1024, 0) + 1  # three significant digits
    assert bucket_bounds(bucket_index(2047)) == (2047, 2047)


def test_percentiles_match_sorted_samples() -> None:
    rng = random.Random(7)
    samples = [int(rng.lognormvariate(7, 1.5)) for _ in range(50_000)] + [0, 3, 10**9]
    histogram = Histogram()
    for value in samples:
        histogram.record(value)
    ordered = sorted(samples)
    for p in (0, 1, 10, 50, 90, 99, 99.9, 99.99, 100):
        want = expected(ordered, p)
        got = histogram.percentile(p)
        assert want <= got <= want + want / 1024 + 1, (p, want, got)
    assert histogram.total == len(samples)
    assert (histogram.min, histogram.max) == (0, 10**9)
    assert histogram.mean == pytest.approx(sum(samples) / len(samples))


def test_small_values_are_exact() -> None:
    histogram = Histogram()
    for value in (5, 1, 4, 2, 3):
        histogram.record(value)
    assert [histogram.percentile(p) for p in (20, 40, 60, 80, 100)] == [1, 2, 3, 4, 5]
    assert Histogram().percentile(50) == 0


def test_merge_and_json_round_trip() -> None:
    rng = random.Random(3)
    samples = [rng.randrange(0, 10**7) for _ in range(10_000)]
    whole, first, second = Histogram(), Histogram(), Histogram()
    for i, value in enumerate(samples):
        whole.record(value)
        (first if i % 3 else second).record(value)
    merged = Histogram.from_json(json.loads(json.dumps(first.to_json())))
    merged.merge(Histogram.from_json(second.to_json()))
    assert merged.to_json() == whole.to_json()
    for p in (50, 99, 99.9, 99.99):
        assert merged.percentile(p) == whole.percentile(p)


@pytest.mark.slow
def test_harness_smoke_run(tmp_path: Path) -> None:
    """A tiny run against every target writes every figure the issue asks for."""
    out = tmp_path / "results.json"
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--json", str(out),
         "--data-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=170)
    elapsed = time.monotonic() - start
    assert run.returncode == 0, run.stderr[-3000:]
    assert elapsed < 120, f"the smoke run took {elapsed:.0f} s"
    results = json.loads(out.read_text())
    for target in TARGETS:
        figures = results[target]
        assert figures["connections"] == 20, figures["scenarios"]["connections"]
        assert isinstance(figures["rss_kb_per_conn"], int | float)
        for key in ("cpu_us_per_msg", "msgs_per_s", "connect_per_s"):
            assert isinstance(figures[key], int | float) and figures[key] > 0, (target, key)
        latency = figures["latency_ms"]
        assert set(latency) == {"p50", "p99", "p99_9", "p99_99"}
        assert 0 <= latency["p50"] <= latency["p99"] <= latency["p99_9"] <= latency["p99_99"]
        assert figures["samples"] > 0
        assert figures["errors"] == {} or set(figures["errors"]) <= {"rate_limited"}
        assert results["histograms"][target]["total"] == figures["samples"]
    assert results["ratio"]["cpu_us_per_msg"] > 0
    assert "rss_kb_per_conn" in results["ratio"]
    machine = results["machine"]
    assert machine["cores"] >= 1 and machine["memory_gib"] > 0
    for library in ("python", "trio", "trio_websocket", "cbor2", "websockets", "uvloop"):
        assert machine[library], library
    assert results["run"]["duration_s"] > 0 and results["run"]["parameters"]["pairs"] == 8
    assert "messages/s" in run.stdout  # the table
