"""The ``chatd`` command: run the daemon, mint tokens, configure NATS, send, listen, ask
for last seen.

Exit status: 0 on success; 1 when the operation failed at run time (refused, timed out,
connection lost), with a one-line ``chatd: error: ...`` on stderr; 2 for a usage or
configuration error. Client commands print one JSON object per line on stdout.

One module per command group: :mod:`chatd.cli._serve` (``serve``; with ``--workers N``
above 1 it supervises N node processes, :mod:`chatd.workers`), :mod:`chatd.cli._tokens`
(``token``, ``secret new``), :mod:`chatd.cli._nats` (``nats-config``) and :mod:`chatd.cli._client`
(``send``, ``listen``, ``lastseen``); :mod:`chatd.cli._main` puts them together.
"""

from chatd.cli._main import main, parser

__all__ = ["main", "parser"]
