"""The `attnzoo` command and everything only it needs: bench harness, demo, plots, console, matrix.

Nothing outside `attnzoo.cli` imports it, and `import attnzoo` loads none of it.
"""

from attnzoo.cli.command import main

__all__ = ["main"]
