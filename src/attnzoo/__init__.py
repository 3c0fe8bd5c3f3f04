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
# --- seq2seq (issue 8) ---
from attnzoo.seq2seq import (
    AdditiveAttention,
    ConcatAttention,
    DotProductAttention,
    GeneralAttention,
    LocationAttention,
)

# --- end seq2seq ---

# --- transformer family (mha, swin, temporal) ---
from attnzoo.mha import MultiHeadAttention
from attnzoo.swin import (
    ShiftedWindowAttention,
    WindowAttention,
    shifted_window_mask,
    window_partition,
    window_reverse,
)
from attnzoo.temporal import TemporalAttention
# --- end transformer family ---
# --- blocks (issue 6: prefix-named transformer blocks of seed 001) ---
# isort: split
from attnzoo.blocks import CrossAttentionBlock, FeedForwardBlock, SelfAttentionBlock
from attnzoo.blocks_attention import KerasMultiHeadAttention

# --- end blocks ---
# --- biformer (BiLevelRoutingAttention, nchwBRA) ---
from attnzoo.biformer import BiLevelRoutingAttention
from attnzoo.biformer_nchw import nchwBRA as _nchwBRA  # noqa: F401 (registers "bra_nchw"; public in compat)
# --- end biformer ---
# --- acmix (issue 7) ---
from attnzoo.acmix import ACmix
# --- end acmix ---
# --- global self-attention (issue 4): SAGAN spatial/channel, non-local ---
from attnzoo.non_local import NonLocalBlock
from attnzoo.sagan import ChannelSelfAttention, SpatialSelfAttention

# --- end global self-attention ---

__version__ = "0.1.0"

__all__ = [
    # --- cli / maps (issue 10) ---
    "AttentionMap",
    "capture_maps",
    # --- end cli / maps ---
    # --- blocks ---
    "CrossAttentionBlock",
    "FeedForwardBlock",
    "KerasMultiHeadAttention",
    "SelfAttentionBlock",
    # --- end blocks ---
    "BiLevelRoutingAttention",  # biformer
    "ACmix",  # acmix (issue 7)
    "Example",
    "Spec",
    # transformer family
    "MultiHeadAttention",
    "ShiftedWindowAttention",
    "TemporalAttention",
    "WindowAttention",
    "shifted_window_mask",
    "window_partition",
    "window_reverse",
    # end transformer family
    "attend",
    "create",
    "find",
    "fused_attn",
    "fused_enabled",
    "get_spec",
    "insert",
    "list_modules",
    "replace",
    # --- seq2seq (issue 8) ---
    "AdditiveAttention",
    "ConcatAttention",
    "DotProductAttention",
    "GeneralAttention",
    "LocationAttention",
    # --- end seq2seq ---
    # --- global self-attention (issue 4) ---
    "ChannelSelfAttention",
    "NonLocalBlock",
    "SpatialSelfAttention",
    # --- end global self-attention ---
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
