"""attnzoo: attention mechanisms for PyTorch.

Canonical classes come from ``attnzoo``; classes with the seed documents' names and constructor
arguments come from :mod:`attnzoo.compat`. Build any mechanism by name with :func:`create`.
"""

from attnzoo._registry import Example, Spec, create, get_spec, list_modules
from attnzoo.functional import attend, fused_attn, fused_enabled

# Family modules register their classes on import (one family per file).

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
]

# --- gating family (SE, CBAM, SK, dual gated): importing registers them ---
from attnzoo.cbam import CBAM, CBAtten_Res, ChannelAttention, SpatialAttention  # noqa: E402
from attnzoo.dual import DualGatedAttention  # noqa: E402
from attnzoo.se import SqueezeExcite  # noqa: E402
from attnzoo.sk import SKConv  # noqa: E402

__all__ += [
    "CBAM",
    "CBAtten_Res",
    "ChannelAttention",
    "DualGatedAttention",
    "SKConv",
    "SpatialAttention",
    "SqueezeExcite",
]
# --- end gating family ---
