"""Connection-scaling benchmark: chatd (in-memory and durable store) against a peer router.

Usage: ``python -m benchmarks [--quick] [--json FILE] [--targets chatd,chatd_durable,peer]``.

For each target, in one invocation and each on a fresh server process: the connections
scenario (N idle authenticated sessions: connect rate, RSS per connection, idle CPU), the
throughput scenario (P pairs with delivered and read receipts: messages/s, server CPU per
routed message), the latency scenario (half the measured maximum: p50 to p99.99 of
send-to-deliver and of send-to-sent), the flood scenario (one sender, 256 sends outstanding,
1 KB bodies, to an offline recipient: messages/s, CPU and RSS per queued message, then the
backlog's streaming rate) and the SLA capacity search (the highest paced rate with both
p99.99s within 5 ms). Then nats_throughput: the throughput scenario on chatd on NATS
JetStream, one chatd node on one nats-server and two chatd nodes on three, each started
fresh by the harness, beside the embedded durable store (messages/s, and CPU per message
for chatd and for the nats-servers). Only when named in ``--scenarios``: scale, 100,000
idle sessions on ``chatd serve --workers 8`` (connect rate, RSS per connection and idle
CPU of chatd and of its nats-server, every process's peak open files). The load generator
runs in separate worker processes and reports its own CPU. A table goes to stdout at the
end; ``--json`` also writes the results. See benchmarks/README.md.

Exit status: 0 when every scenario ran; 1 with a one-line ``benchmarks: error: ...`` when a
server or a worker failed; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs

from benchmarks import scale, scenarios
from benchmarks.metrics_cost import recording_us_per_message
from benchmarks.natsdeploy import deployment_name, nats_version
from benchmarks.scenarios import NATS_SETUPS, Params, Tokens
from benchmarks.servers import TARGETS, BenchError, Server, kill_all, write_secret
from chatd.backends.nats.server import server_binary

FULL = Params()
QUICK = Params(connections=2_000, hold=3.0, pairs=64, seconds=5.0, warmup=2.0,
               latency_seconds=8.0, flood_seconds=5.0, flood_drain=30.0, sla_seconds=2.0,
               sla_warmup=0.5, sla_budget=15.0, scale_connections=10_000, scale_workers=4,
               scale_hold=10.0, throughput_rounds=1, ids_rounds=2, ids_seconds=10.0)
TINY = Params(connections=20, hold=0.5, pairs=8, window=1, seconds=1.0, warmup=0.5,
              latency_seconds=1.0, concurrency=20, drain=5.0, flood_seconds=0.5,
              flood_drain=10.0, sla_seconds=0.3, sla_warmup=0.2, sla_budget=1.0,
              scale_connections=300, scale_workers=2, scale_hold=1.0, scale_concurrency=40,
              throughput_rounds=1, ids_pairs=8, ids_rounds=2, ids_seconds=0.5)
#: The scenarios run for each target, then the one run on chatd on NATS.
TARGET_SCENARIOS = ("connections", "throughput", "latency", "flood", "sla", "ids")
NATS_SCENARIOS = ("nats_throughput",)
#: Run only when named: chatd serve --workers with its own nats-server, on many sessions.
WORKERS_SCENARIOS = ("scale",)
DEFAULT_SCENARIOS = TARGET_SCENARIOS + NATS_SCENARIOS
SCENARIOS = DEFAULT_SCENARIOS + WORKERS_SCENARIOS
_LIBRARIES = ("trio", "trio-websocket", "cbor2", "attrs", "websockets", "uvloop", "nats-py",
              "trio-asyncio")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes and shorter phases (under 3 minutes on 2 cores)")
    parser.add_argument("--tiny", action="store_true",
                        help="minimal sizes for the smoke test (numbers are meaningless)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results here")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help=f"comma-separated, from {','.join(TARGETS)} (default: all)")
    parser.add_argument("--connections", type=int, help="idle sessions (full 19000, quick 2000)")
    parser.add_argument("--hold", type=float, help="seconds to hold them (full 15, quick 3)")
    parser.add_argument("--pairs", type=int, help="sender/recipient pairs (64)")
    parser.add_argument("--window", type=int, help="sends awaiting 'sent' per sender (8)")
    parser.add_argument("--batch", action="store_true", default=None,
                        help="throughput: send all the refills for one incoming message in one "
                             "WebSocket message (default: one send per message)")
    parser.add_argument("--seconds", type=float, help="throughput window (full 20, quick 5)")
    parser.add_argument("--throughput-rounds", type=int,
                        help="throughput rounds per target, taken in turn across the targets; "
                             "the median is reported (full 3, quick 1)")
    parser.add_argument("--warmup", type=float, help="seconds before each measurement (2)")
    parser.add_argument("--latency-seconds", type=float, help="latency window (full 30, quick 8)")
    parser.add_argument("--latency-rate", type=float, metavar="MSGS_PER_S",
                        help="offered load of the latency scenario, the same for every target "
                             "(default: half of each target's measured msgs_per_s)")
    parser.add_argument("--flood-seconds", type=float,
                        help="flood window (full 10, quick 5)")
    parser.add_argument("--flood-window", type=int,
                        help="flood: sends awaiting 'sent' (256)")
    parser.add_argument("--sla-seconds", type=float,
                        help="SLA search: measured seconds per rate tried (full 4, quick 2)")
    parser.add_argument("--sla-budget", type=float,
                        help="SLA search: seconds of search per target (full 40, quick 15)")
    parser.add_argument("--ids-pairs", type=int,
                        help="ids: sender/recipient pairs (full 128, tiny 8)")
    parser.add_argument("--ids-rounds", type=int,
                        help="ids: rounds, after each of which RSS and CPU are taken (full 4, "
                             "quick 2)")
    parser.add_argument("--ids-seconds", type=float,
                        help="ids: seconds per round (full 45, quick 10)")
    parser.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all "
                             "but scale)")
    parser.add_argument("--drain", type=float,
                        help="longest wait, after the load, for the last messages and receipts "
                             "(10 s)")
    parser.add_argument("--workers", type=int,
                        help="load-generator processes for throughput, latency and "
                             "nats_throughput (2; the connections scenario uses as many as "
                             "9,500 sessions each need)")
    parser.add_argument("--concurrency", type=int,
                        help="handshakes in flight per worker while connecting (200)")
    parser.add_argument("--scale-connections", type=int,
                        help="scale: idle sessions (full 100000, quick 10000)")
    parser.add_argument("--scale-workers", type=int,
                        help="scale: chatd serve --workers N, 2 to 64 (full 8, quick 4)")
    parser.add_argument("--scale-hold", type=float,
                        help="scale: seconds to hold the sessions (full 30, quick 10)")
    parser.add_argument("--scale-concurrency", type=int,
                        help="scale: handshakes in flight over all load generators (400)")
    parser.add_argument("--data-dir", type=Path,
                        help="where servers keep their data, JetStream's included (default: "
                             "the system temp dir); the cost of fsync depends on this disk")
    args = parser.parse_args(argv)
    args.scenarios = [t.strip() for t in args.scenarios.split(",") if t.strip()]
    if not args.scenarios or set(args.scenarios) - set(SCENARIOS):
        parser.error(f"--scenarios: choose from {', '.join(SCENARIOS)}")
    if ("latency" in args.scenarios and "throughput" not in args.scenarios
            and not args.latency_rate):
        parser.error("the latency scenario without the throughput scenario needs --latency-rate")
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown or not args.targets:
        parser.error(f"unknown target(s) {unknown}; choose from {', '.join(TARGETS)}")
    base = TINY if args.tiny else QUICK if args.quick else FULL
    overrides = {name: getattr(args, name) for name in (
        "connections", "hold", "pairs", "window", "seconds", "warmup", "latency_seconds",
        "concurrency", "drain", "batch", "workers", "flood_seconds", "flood_window",
        "throughput_rounds", "sla_seconds", "sla_budget", "ids_pairs", "ids_rounds",
        "ids_seconds", "scale_connections", "scale_workers", "scale_hold", "scale_concurrency")
        if getattr(args, name) is not None}
    args.params = attrs.evolve(base, **overrides)
    if min(args.params.connections, args.params.pairs, args.params.window,
           args.params.workers, args.params.flood_window, args.params.throughput_rounds,
           args.params.ids_pairs, args.params.ids_rounds) < 1:
        parser.error("--connections, --pairs, --window, --flood-window, --workers, "
                     "--throughput-rounds, --ids-pairs and --ids-rounds must be at least 1")
    if (min(args.params.scale_connections, args.params.scale_concurrency) < 1
            or not 2 <= args.params.scale_workers <= 64):
        parser.error("--scale-connections and --scale-concurrency must be at least 1, "
                     "--scale-workers from 2 to 64")
    return args


def _fields(params: Params) -> dict[str, Any]:
    return attrs.asdict(params)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _filesystem(path: Path) -> str:
    """The type of the filesystem holding ``path`` (tmpfs makes fsync free)."""
    best, kind = "", "?"
    path = path.resolve()
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1]
            if (str(path) == point or str(path).startswith(point.rstrip("/") + "/")) and len(
                    point) > len(best):
                best, kind = point, fields[2]
    return kind


def machine(data_dir: Path) -> dict[str, Any]:
    """Cores, memory, CPU model, Python and library versions, and the data disk."""
    meminfo = Path("/proc/meminfo").read_text().split()
    cpu_model = next((line.split(":", 1)[1].strip() for line in
                      Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
        if commit and subprocess.run(["git", "status", "--porcelain", "--", "chatd"],
                                     capture_output=True, text=True, timeout=5,
                                     cwd=Path(__file__).parent.parent).stdout.strip():
            commit += "+modified"  # chatd/ differs from the commit
    except (OSError, subprocess.SubprocessError):
        commit = ""
    info: dict[str, Any] = {
        "cores": os.cpu_count(), "cpu": cpu_model,
        "memory_gib": round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1),
        "python": platform.python_version(), "platform": platform.platform(),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        "data_fs": _filesystem(data_dir), "chatd_commit": commit or None,
        "nats_server": nats_version(),
    }
    info.update({name.replace("-", "_"): _version(name) for name in (*_LIBRARIES, "chatd")})
    return info


def summarize(conn: dict[str, Any] | None, thr: dict[str, Any] | None,
              lat: dict[str, Any] | None, fld: dict[str, Any] | None = None,
              sla: dict[str, Any] | None = None,
              ids: dict[str, Any] | None = None) -> dict[str, Any]:
    """One target's headline figures, with each scenario's details under ``scenarios``.

    A figure of a scenario that was not run is ``None``.
    """
    conn, thr, lat, fld, sla = conn or {}, thr or {}, lat or {}, fld or {}, sla or {}
    ids = ids or {}
    rounds = ids.get("rounds") or [{}]
    errors: dict[str, int] = {}
    for part in (thr, lat, fld):
        for code, count in part.get("errors", {}).items():
            errors[code] = errors.get(code, 0) + count
    measured = lat.get("latency_ms", {})
    to_sent = lat.get("sent_latency_ms", {})
    backlog = fld.get("backlog") or {}
    details = {"connections": conn or None, "throughput": thr or None,
               "latency": {k: v for k, v in lat.items()
                           if k not in ("histogram", "sent_histogram")} or None,
               "flood": fld or None, "sla": sla or None, "ids": ids or None}
    return {
        "cpu_us_per_msg": thr.get("cpu_us_per_msg"), "msgs_per_s": thr.get("msgs_per_s"),
        "rss_kb_per_conn": conn.get("rss_kb_per_conn"), "connections": conn.get("connections"),
        "latency_ms": {k: measured.get(k) for k in ("p50", "p99", "p99_9", "p99_99")},
        "connect_per_s": conn.get("connect_per_s"), "idle_cpu_pct": conn.get("idle_cpu_pct"),
        "server_cpu_pct": thr.get("server_cpu_pct"),
        "loadgen_cpu_pct": thr.get("loadgen_cpu_pct"),
        "latency_offered_per_s": lat.get("offered_per_s"),
        "latency_delivered_per_s": lat.get("msgs_per_s"),
        "latency_server_cpu_pct": lat.get("server_cpu_pct"),
        "latency_loadgen_cpu_pct": lat.get("loadgen_cpu_pct"),
        "latency_max_ms": measured.get("max"), "samples": lat.get("samples"),
        "sent_latency_ms": {k: to_sent.get(k) for k in ("p50", "p99", "p99_9", "p99_99")},
        "sent_latency_max_ms": to_sent.get("max"),
        "flood_msgs_per_s": fld.get("msgs_per_s"),
        "flood_cpu_us_per_msg": fld.get("cpu_us_per_msg"),
        "flood_rss_kb_per_msg": fld.get("rss_kb_per_msg"),
        "flood_server_cpu_pct": fld.get("server_cpu_pct"),
        "flood_loadgen_cpu_pct": fld.get("loadgen_cpu_pct"),
        "flood_backlog_msgs_per_s": backlog.get("msgs_per_s"),
        "sla_capacity_per_s": sla.get("capacity_per_s"),
        "sla_sent_p99_99_ms": sla.get("sent_p99_99_ms"),
        "sla_deliver_p99_99_ms": sla.get("deliver_p99_99_ms"),
        "sla_server_cpu_pct": sla.get("server_cpu_pct"),
        "ids_messages": ids.get("messages"), "ids_remembered": ids.get("remembered_ids"),
        "ids_bytes_per_message": ids.get("bytes_per_message"),
        "ids_bytes_per_id": ids.get("bytes_per_id"),
        "ids_cpu_us_first": rounds[0].get("cpu_us_per_msg"),
        "ids_cpu_us_last": rounds[-1].get("cpu_us_per_msg"),
        "errors": errors, "scenarios": details,
    }


def _metrics_cost(results: dict[str, Any]) -> dict[str, float | None]:
    """What recording the metrics costs per routed message, alone and as a share of chatd's
    CPU per routed message in this run (goal: under 2%): at the messages per write and the
    garbage collections per message of chatd's throughput scenario, and in the worst case
    (one message per write)."""
    chatd = results.get("chatd") or {}
    throughput = (chatd.get("scenarios") or {}).get("throughput") or {}
    per_write = throughput.get("msgs_per_write") or 1.0
    collections = throughput.get("gc_collections_per_msg")
    cost = recording_us_per_message(round(per_write), collections)
    worst = recording_us_per_message(1, collections)
    per_msg = chatd.get("cpu_us_per_msg")
    return {"us_per_msg": round(cost, 3), "msgs_per_write": per_write,
            "gc_collections_per_msg": collections,
            "pct_of_chatd_cpu_per_msg": round(cost / per_msg * 100, 2) if per_msg else None,
            "worst_us_per_msg": round(worst, 3),
            "worst_pct_of_chatd_cpu_per_msg": (round(worst / per_msg * 100, 2) if per_msg
                                               else None)}


def _ratio(results: dict[str, Any], target: str) -> dict[str, float | None] | None:
    if target not in results or "peer" not in results:
        return None
    ratio: dict[str, float | None] = {}
    for key in ("cpu_us_per_msg", "rss_kb_per_conn", "flood_cpu_us_per_msg"):
        ours, theirs = results[target][key], results["peer"][key]
        ratio[key] = round(ours / theirs, 2) if ours and theirs and theirs > 0 else None
    return ratio


async def _throughput_rounds(targets: list[str], params: Params, tokens: Tokens,
                             secret_path: Path, work: Path) -> dict[str, dict[str, Any]]:
    """The throughput scenario, ``params.throughput_rounds`` rounds per target taken in
    turn across the targets, each on a fresh server: per target, its median round (the
    lower of the middle two for an even count) with every round's figures under
    ``rounds``.

    Raises:
        BenchError: A round delivered no message.
    """
    rounds: dict[str, list[dict[str, Any]]] = {target: [] for target in targets}
    for k in range(params.throughput_rounds):
        for target in targets:
            print(f"== {target}: throughput, round {k + 1} of {params.throughput_rounds}",
                  file=sys.stderr, flush=True)
            async with Server(target, secret_path, work) as server:
                thr = await scenarios.throughput(server, params, tokens, work)
            if not thr["delivered"]:
                raise BenchError(f"{target}: no message was delivered in the throughput "
                                 "window")
            rounds[target].append(thr)
    return {target: median_round(taken) for target, taken in rounds.items()}


def median_round(taken: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median ``msgs_per_s`` (the lower of the middle two for an even
    count), whole, with every round's ``msgs_per_s`` and ``cpu_us_per_msg`` in the order
    taken under ``rounds``."""
    ranked = sorted(taken, key=lambda thr: float(thr["msgs_per_s"]))
    return {**ranked[(len(ranked) - 1) // 2], "rounds": [
        {"msgs_per_s": thr["msgs_per_s"], "cpu_us_per_msg": thr["cpu_us_per_msg"]}
        for thr in taken]}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    params: Params = args.params
    scenarios.WARNINGS.clear()
    if "peer" in args.targets and importlib.util.find_spec(
            "benchmarks.peers.websockets_peer") is None:
        raise BenchError("the peer (benchmarks/peers/websockets_peer.py) is missing; "
                         "use --targets chatd,chatd_durable")
    if set(args.scenarios) & {*NATS_SCENARIOS, *WORKERS_SCENARIOS} and (
            server_binary() is None or importlib.util.find_spec("nats") is None
            or importlib.util.find_spec("trio_asyncio") is None):
        raise BenchError("the NATS and scale scenarios need nats-server, nats-py and "
                         "trio-asyncio (pip install -e '.[nats,bench]'); or leave them out "
                         "with --scenarios connections,throughput,latency")
    started = datetime.datetime.now(datetime.UTC)
    clock = time.monotonic()
    out: dict[str, Any] = {}
    histograms: dict[str, Any] = {}
    sent_histograms: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="chatd-bench-", dir=args.data_dir) as tmp:
        work = Path(tmp)
        secret_path = work / "secret"
        write_secret(secret_path)
        tokens = Tokens(secret_path.read_text().rstrip("\n").encode())
        per_target = [s for s in args.scenarios if s in TARGET_SCENARIOS]
        throughputs = (await _throughput_rounds(args.targets, params, tokens, secret_path, work)
                       if "throughput" in args.scenarios else {})
        for target in args.targets if per_target else ():
            print(f"== {target}", file=sys.stderr, flush=True)
            conn = lat = fld = sla = ids = None
            thr = throughputs.get(target)
            if "connections" in args.scenarios:
                async with Server(target, secret_path, work) as server:
                    conn = await scenarios.connections(server, params, tokens, work)
            if "latency" in args.scenarios:
                rate = args.latency_rate or 0.5 * thr["msgs_per_s"] if thr else args.latency_rate
                async with Server(target, secret_path, work) as server:
                    lat = await scenarios.latency(server, params, tokens, work, rate)
                histograms[target] = lat["histogram"]
                sent_histograms[target] = lat["sent_histogram"]
            if "flood" in args.scenarios:
                async with Server(target, secret_path, work,
                                  settings=scenarios.FLOOD_SETTINGS) as server:
                    fld = await scenarios.flood(server, params, tokens, work)
            if "sla" in args.scenarios:
                async with Server(target, secret_path, work) as server:
                    sla = await scenarios.sla(server, params, tokens, work)
            if "ids" in args.scenarios:
                async with Server(target, secret_path, work) as server:
                    ids = await scenarios.remembered(server, params, tokens, work)
            out[target] = summarize(conn, thr, lat, fld, sla, ids)
        if "nats_throughput" in args.scenarios:
            measured = (out.get("chatd_durable") or {}).get("scenarios") or {}
            out["nats"] = await scenarios.nats_throughput(params, tokens, secret_path, work,
                                                          measured.get("throughput"))
        if "scale" in args.scenarios:
            out["scale"] = await scale.scale(params, tokens, secret_path, work)
            out["scale"]["single_process"] = {
                target: {key: conn[key] for key in ("connections", "rss_kb_per_conn",
                                                    "idle_cpu_pct", "connect_per_s")}
                for target in args.targets
                if (conn := ((out.get(target) or {}).get("scenarios") or {}).get("connections"))}
        data_fs = machine(work)
    out["ratio"] = _ratio(out, "chatd")
    out["ratio_durable"] = _ratio(out, "chatd_durable")
    out["metrics_cost"] = _metrics_cost(out)
    out["machine"] = data_fs
    out["run"] = {"quick": args.quick, "tiny": args.tiny, "targets": args.targets,
                  "scenarios": args.scenarios, "latency_rate": args.latency_rate,
                  "started": started.isoformat(timespec="seconds"),
                  "duration_s": round(time.monotonic() - clock, 1),
                  "parameters": _fields(params), "warnings": scenarios.WARNINGS}
    out["histograms"] = histograms
    out["sent_histograms"] = sent_histograms
    return out


_ROWS = [
    ("connections", "connections", "{:,.0f}"),
    ("connect/s", "connect_per_s", "{:,.0f}"),
    ("RSS KiB/conn", "rss_kb_per_conn", "{:.2f}"),
    ("idle server CPU %", "idle_cpu_pct", "{:.1f}"),
    ("messages/s", "msgs_per_s", "{:,.0f}"),
    ("server CPU us/msg", "cpu_us_per_msg", "{:.1f}"),
    ("server CPU %", "server_cpu_pct", "{:.0f}"),
    ("load gen CPU %", "loadgen_cpu_pct", "{:.0f}"),
    ("latency load msg/s", "latency_offered_per_s", "{:,.0f}"),
    ("  delivered msg/s", "latency_delivered_per_s", "{:,.0f}"),
    ("  server CPU %", "latency_server_cpu_pct", "{:.0f}"),
    ("  load gen CPU %", "latency_loadgen_cpu_pct", "{:.0f}"),
    ("latency p50 ms", ("latency_ms", "p50"), "{:.2f}"),
    ("latency p99 ms", ("latency_ms", "p99"), "{:.2f}"),
    ("latency p99.9 ms", ("latency_ms", "p99_9"), "{:.2f}"),
    ("latency p99.99 ms", ("latency_ms", "p99_99"), "{:.2f}"),
    ("latency max ms", "latency_max_ms", "{:.2f}"),
    ("latency samples", "samples", "{:,.0f}"),
    ("sent p50 ms", ("sent_latency_ms", "p50"), "{:.2f}"),
    ("sent p99 ms", ("sent_latency_ms", "p99"), "{:.2f}"),
    ("sent p99.9 ms", ("sent_latency_ms", "p99_9"), "{:.2f}"),
    ("sent p99.99 ms", ("sent_latency_ms", "p99_99"), "{:.2f}"),
    ("sent max ms", "sent_latency_max_ms", "{:.2f}"),
    ("flood msg/s *", "flood_msgs_per_s", "{:,.0f}"),
    ("  CPU us/msg", "flood_cpu_us_per_msg", "{:.1f}"),
    ("  RSS KiB/msg", "flood_rss_kb_per_msg", "{:.2f}"),
    ("  server CPU %", "flood_server_cpu_pct", "{:.0f}"),
    ("  load gen CPU %", "flood_loadgen_cpu_pct", "{:.0f}"),
    ("  backlog msg/s", "flood_backlog_msgs_per_s", "{:,.0f}"),
    ("SLA capacity msg/s", "sla_capacity_per_s", "{:,.0f}"),
    ("  sent p99.99 ms", "sla_sent_p99_99_ms", "{:.2f}"),
    ("  deliver p99.99 ms", "sla_deliver_p99_99_ms", "{:.2f}"),
    ("  server CPU %", "sla_server_cpu_pct", "{:.0f}"),
    ("ids: messages", "ids_messages", "{:,.0f}"),
    ("  ids remembered", "ids_remembered", "{:,.0f}"),
    ("  RSS B/message", "ids_bytes_per_message", "{:,.1f}"),
    ("  RSS B/id", "ids_bytes_per_id", "{:,.1f}"),
    ("  CPU us/msg first", "ids_cpu_us_first", "{:.1f}"),
    ("  CPU us/msg last", "ids_cpu_us_last", "{:.1f}"),
]


def _cell(value: Any, fmt: str, width: int = 15) -> str:
    return f"{fmt.format(value) if value is not None else '-':>{width}}"


#: The NATS table's rows: label, key, format.
_NATS_ROWS = [
    ("messages/s", "msgs_per_s", "{:,.0f}"),
    ("chatd CPU us/msg (all nodes)", "cpu_us_per_msg", "{:.1f}"),
    ("nats-server CPU us/msg (all)", "nats_cpu_us_per_msg", "{:.1f}"),
    ("chatd + nats CPU us/msg", "total_cpu_us_per_msg", "{:.1f}"),
    ("chatd CPU % (all nodes)", "server_cpu_pct", "{:.0f}"),
    ("nats-server CPU % (all)", "nats_cpu_pct", "{:.0f}"),
    ("load gen CPU %", "loadgen_cpu_pct", "{:.0f}"),
    ("machine CPU %", "machine_cpu_pct", "{:.0f}"),
    ("pairs crossing nodes", "cross_pairs", "{:,.0f}"),
]


def nats_table(figures: dict[str, Any]) -> list[str]:
    """The NATS scenario's lines of the table: the embedded durable store, then each
    deployment, one column each."""
    columns = ["chatd_durable", *(deployment_name(n, k) for n, k in NATS_SETUPS)]
    columns = [c for c in columns if figures.get(c)]
    lines = ["", f"{'throughput, chatd on NATS':32}" + "".join(f"{c:>15}" for c in columns)]
    for label, key, fmt in _NATS_ROWS:
        lines.append(f"{label:32}" + "".join(_cell(figures[c].get(key), fmt)
                                              for c in columns))
    missing = [sum((figures[c].get("outstanding") or {}).values()) for c in columns]
    lines.append(f"{'undelivered/unreceipted at end':32}"
                 + "".join(_cell(m, "{:,.0f}") for m in missing))
    return lines


def _throughput_notes(results: dict[str, Any], targets: list[str], rounds: int) -> list[str]:
    """What the throughput rows are (each target's rounds, when there are several) and the
    durable store's goal against the memory store (issue 14, goal 2)."""
    notes = []
    if rounds > 1:
        notes.append(f"messages/s, server CPU: the median of {rounds} throughput rounds per "
                     "target, taken in turn across the targets; every round's msg/s:")
        for target in targets:
            taken = ((results[target].get("scenarios") or {}).get("throughput") or {}).get(
                "rounds") or []
            notes.append(f"  {target}: " + ", ".join(f"{r['msgs_per_s']:,.0f}" for r in taken))
    memory, durable = results.get("chatd") or {}, results.get("chatd_durable") or {}
    if memory.get("msgs_per_s") and durable.get("msgs_per_s") and memory.get(
            "cpu_us_per_msg") and durable.get("cpu_us_per_msg"):
        speed = durable["msgs_per_s"] / memory["msgs_per_s"]
        cost = durable["cpu_us_per_msg"] / memory["cpu_us_per_msg"]
        notes.append(f"  goal: chatd_durable >= 0.6 x chatd's msg/s and <= 2 x its CPU per "
                     f"message: {speed:.2f} x ({'met' if speed >= 0.6 else 'not met'}), "
                     f"{cost:.2f} x ({'met' if cost <= 2 else 'not met'})")
    return notes


def _notes(results: dict[str, Any], targets: list[str]) -> list[str]:
    """The footnotes of the targets' table: what its latency, flood and SLA rows mean, and
    the issue's goals for them."""
    params = results["run"]["parameters"]
    scenarios_run = results["run"]["scenarios"]
    notes = []
    if targets and "throughput" in scenarios_run:
        notes.extend(_throughput_notes(results, targets, params["throughput_rounds"]))
    if targets and "latency" in scenarios_run:
        notes.append("latency: send to deliver (in the recipient); sent: send to the 'sent' "
                     "answer (in the sender)")
    if targets and "flood" in scenarios_run:
        settings = scenarios.FLOOD_SETTINGS
        notes.append(f"* flood: one sender, {params['flood_window']} sends outstanding, "
                     f"{params['flood_body']} B bodies, to an offline recipient, "
                     f"{params['flood_seconds']:g} s; messages/s answered 'sent', CPU and RSS "
                     f"growth per queued message; chatd started with rate_limit = "
                     f"{settings['rate_limit']:,.0f}, rate_burst = {settings['rate_burst']:,} "
                     "(default 500/s, 2000: the flood limit would cap it at ~500/s); backlog: "
                     "the recipient then logs in and takes it")
        durable = (results.get("chatd_durable") or {}).get("flood_msgs_per_s")
        if durable is not None:
            notes.append(f"  goal: chatd_durable flood >= 10,000 msg/s: {durable:,.0f} "
                         f"({'met' if durable >= 10_000 else 'not met'})")
    if targets and "ids" in scenarios_run:
        notes.append(f"ids: {params['ids_pairs']} pairs, {params['ids_rounds']} rounds of "
                     f"{params['ids_seconds']:g} s, read nothing (receipts acknowledged); RSS "
                     "growth per message routed and per id remembered; CPU per message in "
                     "the first and the last round (goal: at most 100 B per id, CPU flat)")
    if targets and "sla" in scenarios_run:
        notes.append(f"SLA capacity: highest paced rate ({params['pairs']} pairs) with p99.99 of "
                     f"send-to-sent and send-to-deliver <= {params['sla_bound_ms']:g} ms; "
                     f"doubling from {params['sla_start']:,.0f} msg/s, then bisecting, "
                     f"{params['sla_seconds']:g} s per rate, {params['sla_budget']:g} s per "
                     "target; p99.99s at that rate (at the lowest rate tried if none met it; "
                     "under 10,000 samples p99.99 is about the maximum)")
    return notes


def table(results: dict[str, Any]) -> str:
    """The results as a plain-text table, one column per target and the chatd/peer ratio,
    then the NATS scenario's figures."""
    targets = [t for t in TARGETS if t in results]
    header = f"{'':20}" + "".join(f"{t:>15}" for t in targets)
    ratio = results.get("ratio") or {}
    if ratio:
        header += f"{'chatd/peer':>12}"
    lines = [header] if targets else []
    for label, key, fmt in _ROWS if targets else ():
        row = f"{label:20}"
        for target in targets:
            value = results[target]
            for part in (key if isinstance(key, tuple) else (key,)):
                value = value.get(part) if isinstance(value, dict) else None
            row += f"{fmt.format(value) if value is not None else '-':>15}"
        if isinstance(key, str) and ratio.get(key) is not None:
            row += f"{ratio[key]:>11.2f}x"
        lines.append(row)
    if results.get("nats"):
        lines.extend(nats_table(results["nats"]))
    if results.get("scale"):
        lines.extend(scale.scale_table(results["scale"]))
    cost = results.get("metrics_cost") or {}
    if cost:
        share = cost.get("pct_of_chatd_cpu_per_msg")
        worst = cost.get("worst_pct_of_chatd_cpu_per_msg")
        lines.append(f"metrics recording: {cost['us_per_msg']:.2f} us per routed message at "
                     f"{cost['msgs_per_write']:g} messages per write"
                     + (f", {share:.1f}% of chatd's CPU per message (goal: under 2%)"
                        if share is not None else "")
                     + f"; {cost['worst_us_per_msg']:.2f} us at one per write"
                     + (f" ({worst:.1f}%)" if worst is not None else ""))
    lines.extend(_notes(results, targets))
    lines.extend(f"!!! {message}" for message in results["run"].get("warnings", ()))
    run_info = results["run"]
    lines.append(f"({'quick' if run_info['quick'] else 'tiny' if run_info['tiny'] else 'full'} "
                 f"run, {run_info['duration_s']:.0f} s; load generator CPU in % of one core; "
                 f"{results['machine']['cores']} cores, data on {results['machine']['data_fs']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results = asyncio.run(run(args))
    except BenchError as exc:
        print(f"benchmarks: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("benchmarks: interrupted", file=sys.stderr)
        return 130
    finally:
        kill_all()
    print(table(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"results written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
