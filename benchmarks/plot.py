"""Plots of a ``python -m benchmarks --json`` result file, as PNG images.

Usage: ``python -m benchmarks.plot RESULTS.json OUTDIR``. Writes:

- ``throughput.png``: messages per second and server CPU microseconds per routed message;
- ``connections.png``: server RSS per idle connection and connect rate;
- ``latency.png``: send-to-deliver latency by percentile (HDR-style percentile chart,
  both axes logarithmic), one line per target, at that target's offered load;
- ``flood.png`` (when the results hold the flood scenario): messages per second answered
  ``sent`` with one sender flooding an offline recipient, and server CPU microseconds per
  queued message;
- ``sla.png`` (when the results hold the SLA search): each target's capacity (the highest
  paced rate with both p99.99s within 5 ms), and the p99.99 of send-to-sent and of
  send-to-deliver at every rate the search tried;
- ``nats.png`` (when the results hold the NATS scenario): messages per second, and CPU
  microseconds per message (chatd's, summed over its nodes, with the nats-servers' stacked
  on top), for the embedded durable store, one chatd on one nats-server, and two chatd
  nodes on three nats-servers.

A chart whose figures the results do not hold is skipped.

Needs matplotlib (the ``bench`` extra); nothing else in the harness imports it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

from benchmarks.hdr import Histogram
from benchmarks.natsdeploy import deployment_name
from benchmarks.scenarios import NATS_SETUPS
from benchmarks.servers import TARGETS

COLORS = {"chatd": "#1f77b4", "chatd_durable": "#9467bd", "peer": "#ff7f0e"}
#: Percentiles drawn on the latency chart (as fractions): 0 to 99.999 %.
_NINES = [0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999]


def _bars(ax: Any, results: dict[str, Any], key: str, title: str, fmt: str) -> None:
    targets = [t for t in TARGETS if t in results and results[t].get(key) is not None]
    values = [results[t][key] for t in targets]
    bars = ax.bar(targets, values, color=[COLORS[t] for t in targets])
    ax.bar_label(bars, labels=[fmt.format(v) for v in values], padding=2)
    ax.set_title(title)
    ax.margins(y=0.15)
    ax.tick_params(axis="x", labelrotation=0)


def _subtitle(results: dict[str, Any]) -> str:
    machine, run = results["machine"], results["run"]
    kind = "quick" if run.get("quick") else "tiny" if run.get("tiny") else "full"
    return (f"{kind} run {run['started']}, {machine['cores']} cores, Python {machine['python']},"
            f" data on {machine.get('data_fs', '?')}")


def throughput(results: dict[str, Any], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    _bars(left, results, "msgs_per_s", "messages delivered per second (higher is better)",
          "{:,.0f}")
    _bars(right, results, "cpu_us_per_msg", "server CPU µs per message (lower is better)",
          "{:.1f}")
    fig.suptitle(_subtitle(results), fontsize=8, y=0.02, va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def connections(results: dict[str, Any], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    counts = {results[t].get("connections") for t in TARGETS if t in results}
    label = "/".join(f"{c:,}" for c in sorted(c for c in counts if c))
    _bars(left, results, "rss_kb_per_conn",
          f"server RSS KiB per idle connection ({label} open)", "{:.1f}")
    _bars(right, results, "connect_per_s", "connections opened per second", "{:,.0f}")
    fig.suptitle(_subtitle(results), fontsize=8, y=0.02, va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def latency(results: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for target in TARGETS:
        data = results.get("histograms", {}).get(target)
        if not data or not data["total"]:
            continue
        histogram = Histogram.from_json(data)
        nines = [p for p in _NINES if (1 - p) * histogram.total >= 1] or [0.0]
        xs = [1 / (1 - p) for p in nines]
        ys = [max(histogram.percentile(100 * p), 1) / 1000 for p in nines]
        rate = results[target].get("latency_offered_per_s") or 0
        ax.plot(xs, ys, marker="o", color=COLORS[target],
                label=f"{target} at {rate:,.0f} msg/s ({histogram.total:,} samples)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [1 / (1 - p) for p in (0.0, 0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999)]
    ax.set_xticks(ticks, ["0%", "50%", "90%", "99%", "99.9%", "99.99%", "99.999%"])
    ax.set_xlabel("percentile")
    ax.set_ylabel("send-to-deliver latency, ms")
    fixed = results["run"].get("latency_rate")
    ax.set_title(f"latency by percentile at {fixed:,.0f} msg/s" if fixed else
                 "latency by percentile at half of each target's maximum throughput")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(_subtitle(results), fontsize=8, y=0.01, va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def flood(results: dict[str, Any], path: Path) -> bool:
    """The flood scenario's chart; False (nothing drawn) without its figures."""
    if not any((results.get(t) or {}).get("flood_msgs_per_s") for t in TARGETS):
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    _bars(left, results, "flood_msgs_per_s",
          "flood: messages/s answered 'sent' (goal, durable: 10,000)", "{:,.0f}")
    left.axhline(10_000, color="#9467bd", linestyle="--", linewidth=1)
    _bars(right, results, "flood_cpu_us_per_msg", "flood: server CPU µs per queued message",
          "{:.1f}")
    for ax in (left, right):
        ax.title.set_fontsize(10)
    fig.suptitle(_subtitle(results) + "; chatd with rate_limit and rate_burst raised",
                 fontsize=8, y=0.02, va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def sla(results: dict[str, Any], path: Path) -> bool:
    """The SLA search's chart; False (nothing drawn) without its figures."""
    searched: dict[str, dict[str, Any]] = {}
    for target in TARGETS:
        search = ((results.get(target) or {}).get("scenarios") or {}).get("sla")
        if search:
            searched[target] = search
    if not searched:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    _bars(left, results, "sla_capacity_per_s",
          "SLA capacity: msg/s with both p99.99 <= 5 ms", "{:,.0f}")
    for target, search in searched.items():
        steps = sorted(search["steps"], key=lambda step: step["rate"])
        rates = [step["rate"] for step in steps]
        right.plot(rates, [step["sent_latency_ms"]["p99_99"] for step in steps], marker="o",
                   linestyle="--", color=COLORS[target], label=f"{target}: to sent")
        right.plot(rates, [step["latency_ms"]["p99_99"] for step in steps], marker="s",
                   color=COLORS[target], label=f"{target}: to deliver")
    bound = next(iter(searched.values()))["bound_ms"]
    right.axhline(bound, color="black", linewidth=1)
    right.set_xscale("log")
    right.set_yscale("log")
    for axis in (right.xaxis, right.yaxis):
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.4g}"))
        axis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:,.4g}"))
    right.set_xlabel("paced rate, messages/s")
    right.set_ylabel("p99.99, ms")
    right.set_title("p99.99 at each rate tried", fontsize=10)
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=7)
    left.title.set_fontsize(10)
    fig.suptitle(_subtitle(results), fontsize=8, y=0.02, va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def nats(results: dict[str, Any], path: Path) -> bool:
    """The NATS scenario's chart; False (nothing drawn) without its figures."""
    figures = results.get("nats") or {}
    columns = [c for c in ("chatd_durable", *(deployment_name(n, k) for n, k in NATS_SETUPS))
               if figures.get(c)]
    if not columns:
        return False
    labels = {"chatd_durable": "embedded durable\n(chatd_durable)"}
    for nodes, servers in NATS_SETUPS:
        name = deployment_name(nodes, servers)
        labels[name] = (f"{nodes} chatd on {servers} nats-server{'s' if servers > 1 else ''}"
                        f"\n({name})")
    names = [labels[c] for c in columns]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    rates = [figures[c].get("msgs_per_s") or 0 for c in columns]
    bars = left.bar(names, rates, color="#9467bd")
    left.bar_label(bars, labels=[f"{v:,.0f}" for v in rates], padding=2)
    left.set_title("messages delivered per second (all processes on the same cores)",
                   fontsize=10)
    left.margins(y=0.15)
    chatd = [figures[c].get("cpu_us_per_msg") or 0 for c in columns]
    nats_cpu = [figures[c].get("nats_cpu_us_per_msg") or 0 for c in columns]
    right.bar(names, chatd, color="#1f77b4", label="chatd (all nodes)")
    bars = right.bar(names, nats_cpu, bottom=chatd, color="#ff7f0e",
                     label="nats-server (all servers)")
    right.bar_label(bars, labels=[f"{a:.0f}" + (f" + {b:.0f}" if b else "")
                                  for a, b in zip(chatd, nats_cpu, strict=True)], padding=2)
    right.set_title("CPU µs per message (lower is better)", fontsize=10)
    right.legend(fontsize=8, loc="upper left")
    right.margins(y=0.15)
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(_subtitle(results) + f"; nats-server {results['machine'].get('nats_server')}"
                 ", sync_interval: always", fontsize=8, y=0.02, va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot")
    parser.add_argument("results", type=Path, help="JSON written by python -m benchmarks")
    parser.add_argument("outdir", type=Path, help="directory for the PNG files")
    args = parser.parse_args(argv)
    plt.switch_backend("Agg")  # files only, no display needed
    results = json.loads(args.results.read_text())
    args.outdir.mkdir(parents=True, exist_ok=True)
    for name, draw in (("throughput", throughput), ("connections", connections),
                       ("latency", latency)):
        if any(t in results for t in TARGETS):
            draw(results, args.outdir / f"{name}.png")
            print(args.outdir / f"{name}.png")
    for name, chart in (("flood", flood), ("sla", sla), ("nats", nats)):
        if chart(results, args.outdir / f"{name}.png"):
            print(args.outdir / f"{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
