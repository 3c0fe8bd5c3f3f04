"""attnzoo: attention mechanisms for PyTorch.

Canonical classes come from ``attnzoo``; classes with the seed documents' names and constructor
arguments come from :mod:`attnzoo.compat`. Build any mechanism by name with :func:`create`.
"""

from attnzoo._registry import Example, Spec, create, get_spec, list_modules
from attnzoo.functional import attend, fused_attn, fused_enabled
from attnzoo.surgery import find, insert, replace

# --- cli / maps (issue 10) ---
from attnzoo.maps import AttentionMap, capture_maps
# --- end cli / maps ---

# Family modules register their classes on import (one family per file).

__version__ = "0.1.0"

__all__ = [
    # --- cli / maps (issue 10) ---
    "AttentionMap",
    "capture_maps",
    # --- end cli / maps ---
    "Example",
    "Spec",
    "attend",
    "create",
    "find",
    "fused_attn",
    "fused_enabled",
    "get_spec",
    "insert",
    "list_modules",
    "replace",
]
