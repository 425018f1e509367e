"""``chatd status``: a one-screen summary of a running node, read from its ``/metrics``."""

from __future__ import annotations

import argparse
import math
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families

from chatd.cli._common import CommandError

__all__ = ["add_status", "summary"]

if TYPE_CHECKING:
    from chatd.cli._common import Commands

#: Where ``chatd status`` looks by default: the node's default ``http_listen``.
DEFAULT_URL = "http://127.0.0.1:8766"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def add_status(commands: Commands) -> None:
    """Add ``status`` to the subcommands."""
    status = commands.add_parser(
        "status", help="print a summary of a running node, from its HTTP port's /metrics")
    status.add_argument("url", nargs="?", default=DEFAULT_URL,
                        help=f"the node's HTTP port (default {DEFAULT_URL})")
    status.add_argument("--timeout", type=float, default=5.0,
                        help="seconds to wait for the node (default 5)")
    status.set_defaults(run=_status)


def _status(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise CommandError(f"the URL must start with http:// or https://, not {args.url!r}")
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=args.timeout) as answer:
            text = answer.read().decode()
    except urllib.error.HTTPError as exc:
        raise CommandError(f"cannot read {url}/metrics: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CommandError(f"cannot read {url}/metrics: {reason}") from None
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    if not any(name == "chatd_ready" for name, _ in samples):
        raise CommandError(f"{url}/metrics is not a chatd node's")
    print(summary(url, samples))
    return 0


def _get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _latency(seconds: float) -> str:
    if math.isinf(seconds):
        return "over 1 s"
    if seconds == 0:
        return "-"
    return f"<= {seconds * 1000:g} ms"


def summary(url: str, samples: Samples) -> str:
    """The summary's lines for the samples of one scrape.

    Args:
        url: The node's HTTP port, for the first line.
        samples: Every sample of ``/metrics``, by name and sorted labels.
    """
    ready = _get(samples, "chatd_ready") == 1
    unreadable = _get(samples, "chatd_replica_unreadable")
    alarms = sorted(f"{labels[0][1]} {labels[1][1]}" for (name, labels), value in
                    samples.items() if name == "chatd_slo_alarm" and value == 1)
    errors = sorted(((labels[0][1], value) for (name, labels), value in samples.items()
                     if name == "chatd_errors_total" and value), key=lambda kv: -kv[1])
    lines = [
        f"chatd at {url}: {'ready' if ready else 'NOT READY (see /readyz)'}",
        f"{'sessions':22}{_get(samples, 'chatd_sessions'):,.0f} "
        f"({_get(samples, 'chatd_connections', state='open'):,.0f} connections open, "
        f"{_get(samples, 'chatd_connections', state='authenticating'):,.0f} authenticating)",
        f"{'sends/s, last minute':22}{_get(samples, 'chatd_sends_recent_per_second'):,.1f}",
        f"{'send latency, 1 min':22}"
        f"p99 {_latency(_get(samples, 'chatd_send_latency_recent_seconds', quantile='0.99'))}"
        f", p99.99 "
        f"{_latency(_get(samples, 'chatd_send_latency_recent_seconds', quantile='0.9999'))}",
        f"{'messages':22}sent {_get(samples, 'chatd_messages_total', status='sent'):,.0f}, "
        f"delivered {_get(samples, 'chatd_messages_total', status='delivered'):,.0f}, "
        f"read {_get(samples, 'chatd_messages_total', status='read'):,.0f}",
        f"{'failed sends':22}{_get(samples, 'chatd_send_failures_total'):,.0f}",
        f"{'errors sent':22}"
        + (", ".join(f"{code} {count:,.0f}" for code, count in errors[:5]) or "none"),
        f"{'queue backlog':22}{_get(samples, 'chatd_queue_backlog_items'):,.0f} items, "
        f"{_get(samples, 'chatd_queue_backlog_bytes') / 2**20:,.1f} MiB",
        f"{'SLO alarms':22}" + (", ".join(alarms) if alarms else "none"),
        f"{'replicas':22}" + (f"UNREADABLE ({unreadable:,.0f}; see the log's "
                              "replica_unreadable)" if unreadable else "readable"),
        f"{'process':22}CPU {_get(samples, 'process_cpu_seconds_total'):,.1f} s, "
        f"RSS {_get(samples, 'process_resident_memory_bytes') / 2**20:,.0f} MiB, "
        f"{_get(samples, 'process_open_fds'):,.0f} open files",
    ]
    return "\n".join(lines)
