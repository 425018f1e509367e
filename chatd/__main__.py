"""``python -m chatd`` runs the command-line interface."""

from chatd.cli import main

raise SystemExit(main())
