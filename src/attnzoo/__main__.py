"""``python -m attnzoo`` runs the command-line interface."""

from attnzoo.cli.command import main

raise SystemExit(main())
