"""attnzoo: attention mechanisms for PyTorch.

Canonical classes come from ``attnzoo``; classes with the seed documents' names and constructor
arguments come from :mod:`attnzoo.compat`. Build any mechanism by name with :func:`create`.

Importing a family module registers its mechanisms (one family per file), so importing the package
fills the registry.
"""

from attnzoo._blocked import global_kernel
from attnzoo._registry import Example, Spec, create, get_spec, list_modules
from attnzoo.acmix import ACmix
from attnzoo.biformer import BiLevelRoutingAttention
from attnzoo.biformer_nchw import nchwBRA
from attnzoo.blocks import CrossAttentionBlock, FeedForwardBlock, SelfAttentionBlock
from attnzoo.blocks_attention import KerasMultiHeadAttention
from attnzoo.cbam import CBAM, CBAtten_Res, ChannelAttention, SpatialAttention
from attnzoo.dual import DualGatedAttention
from attnzoo.functional import attend, fused_attn, fused_enabled
from attnzoo.maps import AttentionMap, capture_maps
from attnzoo.mha import MultiHeadAttention
from attnzoo.non_local import NonLocalBlock
from attnzoo.sagan import ChannelSelfAttention, SpatialSelfAttention
from attnzoo.se import SqueezeExcite
from attnzoo.seq2seq import (
    AdditiveAttention,
    ConcatAttention,
    DotProductAttention,
    GeneralAttention,
    LocationAttention,
)
from attnzoo.sk import SKConv
from attnzoo.surgery import find, insert, replace
from attnzoo.swin import (
    ShiftedWindowAttention,
    WindowAttention,
    shifted_window_mask,
    window_partition,
    window_reverse,
)
from attnzoo.temporal import TemporalAttention

__version__ = "0.1.0"

__all__ = [
    # registry
    "Example",
    "Spec",
    "create",
    "get_spec",
    "list_modules",
    # attention core
    "attend",
    "fused_attn",
    "fused_enabled",
    "global_kernel",
    # surgery and maps
    "AttentionMap",
    "capture_maps",
    "find",
    "insert",
    "replace",
    # gating: SE, CBAM, SK, dual gated
    "CBAM",
    "CBAtten_Res",
    "ChannelAttention",
    "DualGatedAttention",
    "SKConv",
    "SpatialAttention",
    "SqueezeExcite",
    # global self-attention: SAGAN spatial and channel, non-local
    "ChannelSelfAttention",
    "NonLocalBlock",
    "SpatialSelfAttention",
    # transformer: multi-head, Swin windows, temporal
    "MultiHeadAttention",
    "ShiftedWindowAttention",
    "TemporalAttention",
    "WindowAttention",
    "shifted_window_mask",
    "window_partition",
    "window_reverse",
    # prefix-named transformer blocks
    "CrossAttentionBlock",
    "FeedForwardBlock",
    "KerasMultiHeadAttention",
    "SelfAttentionBlock",
    # BiFormer and ACmix
    "ACmix",
    "BiLevelRoutingAttention",
    "nchwBRA",
    # seq2seq scoring rules
    "AdditiveAttention",
    "ConcatAttention",
    "DotProductAttention",
    "GeneralAttention",
    "LocationAttention",
]
