"""attnzoo: attention mechanisms for PyTorch.

Canonical classes come from ``attnzoo``; classes with the seed documents' names and constructor
arguments come from :mod:`attnzoo.compat`. Build any mechanism by name with :func:`create`.
"""

from attnzoo._registry import Example, Spec, create, get_spec, list_modules
from attnzoo.functional import attend, fused_attn, fused_enabled

# Family modules register their classes on import (one family per file).
# --- acmix (issue 7) ---
from attnzoo.acmix import ACmix
# --- end acmix ---

__version__ = "0.1.0"

__all__ = [
    "ACmix",  # acmix (issue 7)
    "Example",
    "Spec",
    "attend",
    "create",
    "fused_attn",
    "fused_enabled",
    "get_spec",
    "list_modules",
]
