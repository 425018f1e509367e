"""The benchmark harness: its latency histogram, and a smoke run of ``python -m benchmarks``.

The benchmarks' figures are never pass/fail; these tests only check that the harness works.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.__main__ import median_round
from benchmarks.hdr import Histogram, bucket_bounds, bucket_index
from benchmarks.scenarios import SLA_PRECISION, next_rate, place

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


def test_pairs_cross_nodes_evenly() -> None:
    places = [place(i, 2) for i in range(8)]
    assert all(s != r for s, r in places)  # every message crosses nodes
    for node in (0, 1):  # every node holds as many senders as recipients
        assert sum(s == node for s, _ in places) == sum(r == node for _, r in places) == 4
    assert {place(i, 1) for i in range(8)} == {(0, 0)}


def test_median_round_is_the_middle_one_by_throughput() -> None:
    rounds = [{"msgs_per_s": v, "cpu_us_per_msg": c, "k": k}
              for k, (v, c) in enumerate([(300.0, 3.0), (100.0, 1.0), (200.0, 2.0), (400.0, 4.0)])]
    odd = median_round(rounds[:3])
    assert (odd["k"], odd["msgs_per_s"], odd["cpu_us_per_msg"]) == (2, 200.0, 2.0)
    assert odd["rounds"] == [{"msgs_per_s": v, "cpu_us_per_msg": c}
                             for v, c in ((300.0, 3.0), (100.0, 1.0), (200.0, 2.0))]
    assert median_round(rounds)["k"] == 2  # the lower of the middle two
    assert median_round(rounds[:1])["k"] == 0


def test_sla_search_doubles_halves_then_bisects() -> None:
    assert next_rate(250.0, None, 31.25) == 500.0  # every rate so far met the bound
    assert next_rate(None, 250.0, 31.25) == 125.0  # none has yet
    assert next_rate(None, 50.0, 31.25) is None  # below the floor: give up
    assert next_rate(500.0, 1000.0, 31.25) == 750.0
    assert next_rate(500.0, 500.0 * SLA_PRECISION, 31.25) is None  # converged
    with pytest.raises(ValueError):
        next_rate(None, None, 31.25)


@pytest.mark.slow
def test_harness_smoke_run(tmp_path: Path) -> None:
    """A tiny run against every target and on chatd on NATS writes every figure the issues
    ask for, and leaves no process of its own behind."""
    out = tmp_path / "results.json"
    # The timeout only stops a hung run; how long the run takes is not checked.
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--json", str(out),
         "--data-dir", str(tmp_path), "--throughput-rounds", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
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
        check_sent_latency(figures, results["sent_histograms"][target])
        check_flood(target, figures)
        check_sla(figures)
        check_ids(target, figures)
        rounds = figures["scenarios"]["throughput"]["rounds"]
        assert len(rounds) == 2 and figures["msgs_per_s"] == min(r["msgs_per_s"] for r in rounds)
    # The throughput rounds are taken in turn across the targets, before anything else.
    turns = [line.split("== ", 1)[1] for line in run.stderr.splitlines()
             if ": throughput, round" in line]
    assert turns == [f"{target}: throughput, round {k} of 2" for k in (1, 2)
                     for target in TARGETS], turns
    assert results["ratio"]["cpu_us_per_msg"] > 0
    assert results["ratio"]["flood_cpu_us_per_msg"] > 0
    cost = results["metrics_cost"]
    assert cost["us_per_msg"] > 0 and cost["pct_of_chatd_cpu_per_msg"] > 0
    assert cost["worst_us_per_msg"] > 0 and cost["msgs_per_write"] >= 1
    assert cost["gc_collections_per_msg"] is not None  # scraped from chatd's /metrics
    assert "rss_kb_per_conn" in results["ratio"]
    machine = results["machine"]
    assert machine["cores"] >= 1 and machine["memory_gib"] > 0
    for library in ("python", "trio", "trio_websocket", "cbor2", "websockets", "uvloop",
                    "nats_py", "nats_server"):
        assert machine[library], library
    assert results["run"]["duration_s"] > 0 and results["run"]["parameters"]["pairs"] == 8
    assert "messages/s" in run.stdout  # the table
    for row in ("sent p99.99 ms", "flood msg/s", "backlog msg/s", "SLA capacity msg/s",
                "rate_limit = 1,000,000", "RSS B/id"):
        assert row in run.stdout, row
    check_nats(results["nats"], results["chatd_durable"])
    assert "throughput, chatd on NATS" in run.stdout
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert not leftover.stdout.strip(), f"processes left running: {leftover.stdout}"


def number(value: Any) -> bool:
    """A figure of the JSON: an int or a float, not a bool and not None."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_sent_latency(figures: dict[str, Any], histogram: dict[str, Any]) -> None:
    """Send-to-sent latency, recorded in the senders beside send-to-deliver."""
    sent = figures["sent_latency_ms"]
    assert set(sent) == {"p50", "p99", "p99_9", "p99_99"}
    assert all(number(v) for v in sent.values()), sent
    assert 0 <= sent["p50"] <= sent["p99"] <= sent["p99_9"] <= sent["p99_99"]
    assert number(figures["sent_latency_max_ms"])
    assert histogram["total"] == figures["scenarios"]["latency"]["sent_samples"] > 0


def check_flood(target: str, figures: dict[str, Any]) -> None:
    """The flood scenario: messages/s answered sent, CPU and RSS growth per message, and the
    backlog streamed whole to the recipient once it logs in."""
    for key in ("flood_msgs_per_s", "flood_cpu_us_per_msg", "flood_backlog_msgs_per_s"):
        assert number(figures[key]) and figures[key] > 0, (target, key)
    assert number(figures["flood_rss_kb_per_msg"])  # may be 0 or below when RSS is chunky
    flood = figures["scenarios"]["flood"]
    assert flood["window"] == 256 and flood["body_bytes"] == 1024
    assert flood["sent"] > 0 and flood["errors"] == {}, flood["errors"]
    assert flood["settings"] == ({} if target == "peer" else
                                 {"rate_limit": 1_000_000.0, "rate_burst": 1_000_000})
    backlog = flood["backlog"]
    assert backlog["missing"] == 0 and backlog["messages"] >= flood["sent"], backlog
    assert number(flood["receipts_read_missing"])


def check_sla(figures: dict[str, Any]) -> None:
    """The SLA capacity search: a rate (0 when none met the bound) and the p99.99s there."""
    for key in ("sla_capacity_per_s", "sla_sent_p99_99_ms", "sla_deliver_p99_99_ms"):
        assert number(figures[key]) and figures[key] >= 0, key
    sla = figures["scenarios"]["sla"]
    assert sla["steps"] and sla["bound_ms"] == 5.0
    met = [step["rate"] for step in sla["steps"] if step["met"]]
    assert figures["sla_capacity_per_s"] == (max(met) if met else 0.0)
    shown = next(s for s in sla["steps"] if s["rate"] == sla["figures_at_per_s"])
    assert figures["sla_sent_p99_99_ms"] == shown["sent_latency_ms"]["p99_99"]
    assert figures["sla_deliver_p99_99_ms"] == shown["latency_ms"]["p99_99"]


def check_ids(target: str, figures: dict[str, Any]) -> None:
    """The ids scenario: rounds of routed messages with CPU and RSS after each, and the
    ids chatd remembers (the peer remembers none, and says nothing)."""
    ids = figures["scenarios"]["ids"]
    assert len(ids["rounds"]) == 2 and ids["pairs"] == 8
    counts = [r["messages"] for r in ids["rounds"]]
    assert 0 < counts[0] <= counts[1] == figures["ids_messages"] == ids["messages"]
    assert figures["ids_cpu_us_first"] == ids["rounds"][0]["cpu_us_per_msg"]
    assert figures["ids_cpu_us_last"] == ids["rounds"][1]["cpu_us_per_msg"]
    assert number(figures["ids_bytes_per_message"])
    if target == "peer":
        assert figures["ids_remembered"] is None and figures["ids_bytes_per_id"] is None
    else:  # every message accepted is remembered (far fewer than dedup_max_ids)
        assert figures["ids_remembered"] >= figures["ids_messages"]
        assert number(figures["ids_bytes_per_id"])
    assert ids["outstanding"] == {}, ids["outstanding"]


def check_nats(nats: dict[str, Any], durable: dict[str, Any]) -> None:
    """The NATS scenario's figures of a tiny run: the embedded durable store's throughput
    (the one measured for target chatd_durable), one chatd node on one nats-server, and two
    chatd nodes on three nats-servers with every pair crossing nodes."""
    assert nats["chatd_durable"] == durable["scenarios"]["throughput"]
    for name, nodes, servers, crossing in (("chatd_nats1", 1, 1, 0), ("chatd2_nats3", 2, 3, 8)):
        figures = nats[name]
        assert (figures["chatd_nodes"], figures["nats_servers"]) == (nodes, servers)
        assert figures["replicas"] == servers and figures["cross_pairs"] == crossing
        assert len(figures["nodes"]) == nodes and len(figures["nats"]) == servers
        for key in ("msgs_per_s", "cpu_us_per_msg", "nats_cpu_us_per_msg",
                    "total_cpu_us_per_msg", "machine_cpu_pct"):
            assert isinstance(figures[key], int | float) and figures[key] > 0, (name, key)
        assert figures["server_cpu_s"] == pytest.approx(
            sum(n["server_cpu_s"] for n in figures["nodes"]), abs=0.01)
        assert figures["nats_cpu_s"] == pytest.approx(
            sum(n["cpu_s"] for n in figures["nats"]), abs=0.01)
        assert figures["total_cpu_us_per_msg"] == pytest.approx(
            figures["cpu_us_per_msg"] + figures["nats_cpu_us_per_msg"], abs=0.02)
        assert figures["errors"] == {} or set(figures["errors"]) <= {"rate_limited"}


@pytest.mark.slow
def test_scale_scenario_tiny_run(tmp_path: Path) -> None:
    """The scale scenario, tiny (300 sessions on chatd serve --workers 2) beside the
    single-process connections scenario of chatd and the peer, through the real harness:
    every session opened and held on one worker or the other, memory, CPU and open files
    per process, and nothing of its own left running."""
    out = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--scenarios", "connections,scale",
         "--targets", "chatd,peer", "--json", str(out), "--data-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    scale = json.loads(out.read_text())["scale"]
    assert scale["connections"] == scale["requested"] == scale["open_at_end"] == 300
    assert scale["failed"] == {} and scale["closed"] == {}
    assert scale["workers"] == 2 and scale["loadgen_processes"] == 1
    warm = scale["warmup_sessions"]
    assert sum(scale["sessions_by_worker"].values()) == 300 + warm
    assert all(count > 0 for count in scale["sessions_by_worker"].values())
    for key in ("connect_per_s", "rss_kb_per_conn", "nats_rss_kb_per_conn", "loadgen_rss_kb"):
        assert number(scale[key]) and scale[key] > 0, key
    for key in ("idle_cpu_pct", "nats_idle_cpu_pct", "idle_loadgen_cpu_pct",
                "connect_chatd_cpu_pct", "connect_loadgen_cpu_pct"):
        assert number(scale[key]) and scale[key] >= 0, key
    assert scale["rss_kb_per_conn"] < 1024  # KiB per idle session: not a unit mix-up
    check_scale_processes(scale, warm)
    assert set(scale["single_process"]) == {"chatd", "peer"}
    assert all(f["connections"] == 20 for f in scale["single_process"].values())
    for line in ("idle sessions on chatd serve --workers 2 (scale)", "RSS KiB/conn, chatd",
                 "peak open files", "the peer is one process"):
        assert line in run.stdout, line
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert not leftover.stdout.strip(), f"processes left running: {leftover.stdout}"


def check_scale_processes(scale: dict[str, Any], warm: int) -> None:
    """Every process of chatd serve --workers 2 is reported: its RSS, CPU and open files,
    each worker's open files covering its sessions and staying under the cap."""
    processes = {p["name"]: p for p in scale["processes"]}
    assert [p["role"] for p in scale["processes"]] == [
        "supervisor", "worker", "worker", "watchdog", "nats-server"]
    workers = [p for p in scale["processes"] if p["role"] == "worker"]
    assert sum(w["sessions"] for w in workers) == 300 + warm
    assert sum(w["warmup_sessions"] for w in workers) == warm
    for worker in workers:
        assert worker["sessions"] == scale["sessions_by_worker"][worker["name"]]
        assert worker["sessions"] <= worker["fds_peak"] < scale["fd_cap"]
        assert worker["fds_before"] < worker["fds_peak"]
        assert worker["rss_kb_after"] > worker["rss_kb_before"] > 0
    for process in processes.values():
        assert process["fd_limit"] and process["fds_peak"] >= process["fds_end"] > 0
        assert number(process["idle_cpu_pct"]) and number(process["connect_cpu_pct"])
    assert scale["fds_peak_max"] == max(w["fds_peak"] for w in workers)
    assert scale["under_fd_cap"] is True
    assert scale["nats_rss_kb_after"] == processes["nats-server"]["rss_kb_after"]
    assert scale["rss_kb_after"] == sum(p["rss_kb_after"] for p in scale["processes"]
                                        if p["role"] != "nats-server")
