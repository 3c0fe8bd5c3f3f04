"""``python -m attnzoo`` runs the command-line interface."""

from attnzoo.cli import main

raise SystemExit(main())
