"""Seed-compatible classes: the seed documents' class names, constructor arguments and state_dict keys.

Code and checkpoints written against the seeds (and the papers' official code) load here unchanged
(``load_state_dict(..., strict=True)``) and give the seed's numbers; each class's docstring lists what
differs from the seed and why.

Two names are shared with canonical classes and mean the seed's version here: ``MultiHeadAttention``
(the seed's module; ``create("MultiHeadAttention")`` still builds the canonical one) and
``BiLevelRoutingAttention`` (the official BiFormer module's ``forward(x, ret_attn_mask=False)``,
which can also return the routing and attention weights as the official tuple). ``WindowAttention`` and
``ACmix`` are the canonical classes themselves: they already keep the official API and state_dict.
"""

from attnzoo.acmix import ACmix
from attnzoo.biformer import LegacyBiLevelRoutingAttention as BiLevelRoutingAttention
from attnzoo.biformer_nchw import nchwBRA
from attnzoo.blocks import cross_attention, feed_forward, self_attention
from attnzoo.cbam import CBAtten_Res, ChannelAttention, SpatialAttention
from attnzoo.dual import SeedDualAttention
from attnzoo.mha import SeedMultiHeadAttention as MultiHeadAttention
from attnzoo.non_local import NonLocalBlockND
from attnzoo.sagan import Self_Attn_Channel, Self_Attn_Spatial
from attnzoo.se import SELayer
from attnzoo.seq2seq import Attn
from attnzoo.sk import SKEConv
from attnzoo.swin import WindowAttention
from attnzoo.temporal import Attention

__all__ = [
    # gating
    "CBAtten_Res",
    "ChannelAttention",
    "SELayer",
    "SKEConv",
    "SeedDualAttention",
    "SpatialAttention",
    # global self-attention
    "NonLocalBlockND",
    "Self_Attn_Channel",
    "Self_Attn_Spatial",
    # transformer
    "Attention",
    "MultiHeadAttention",
    "WindowAttention",
    # prefix-named blocks (builders returning PyTorch modules)
    "cross_attention",
    "feed_forward",
    "self_attention",
    # BiFormer and ACmix
    "ACmix",
    "BiLevelRoutingAttention",
    "nchwBRA",
    # seq2seq
    "Attn",
]
