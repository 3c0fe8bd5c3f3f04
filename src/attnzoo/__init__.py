"""attnzoo: attention mechanisms for PyTorch.

Canonical classes come from ``attnzoo``; classes with the seed documents' names and constructor
arguments come from :mod:`attnzoo.compat`. Build any mechanism by name with :func:`create`.
"""

from attnzoo._registry import Example, Spec, create, get_spec, list_modules
from attnzoo.functional import attend, fused_attn, fused_enabled

# Family modules register their classes on import (one family per file).
# --- global self-attention (issue 4): SAGAN spatial/channel, non-local ---
from attnzoo.non_local import NonLocalBlock
from attnzoo.sagan import ChannelSelfAttention, SpatialSelfAttention

# --- end global self-attention ---

__version__ = "0.1.0"

__all__ = [
    "Example",
    "Spec",
    "attend",
    "create",
    "fused_attn",
    "fused_enabled",
    "get_spec",
    "list_modules",
    # --- global self-attention (issue 4) ---
    "ChannelSelfAttention",
    "NonLocalBlock",
    "SpatialSelfAttention",
    # --- end global self-attention ---
]
