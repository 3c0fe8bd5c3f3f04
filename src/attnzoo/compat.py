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

from attnzoo.blocks.transformer import cross_attention, feed_forward, self_attention
from attnzoo.mechanisms.acmix import ACmix
from attnzoo.mechanisms.biformer import LegacyBiLevelRoutingAttention as BiLevelRoutingAttention
from attnzoo.mechanisms.biformer_nchw import nchwBRA
from attnzoo.mechanisms.cbam import CBAtten_Res, ChannelAttention, SpatialAttention
from attnzoo.mechanisms.dual_gated import SeedDualAttention
from attnzoo.mechanisms.mha import SeedMultiHeadAttention as MultiHeadAttention
from attnzoo.mechanisms.non_local import NonLocalBlockND
from attnzoo.mechanisms.sagan import Self_Attn_Channel, Self_Attn_Spatial
from attnzoo.mechanisms.se import SELayer
from attnzoo.mechanisms.seq2seq_location import Attn
from attnzoo.mechanisms.sk import SKEConv
from attnzoo.mechanisms.swin import WindowAttention
from attnzoo.mechanisms.temporal import Attention

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
