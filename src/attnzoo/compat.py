"""Seed-compatible classes: the seed documents' class names, constructor arguments and state_dict keys.

Code and checkpoints written against the seeds (and the papers' official code) load here unchanged
(``load_state_dict(..., strict=True)``) and give the seed's numbers; each class's docstring lists what
differs from the seed and why.
"""

# --- biformer ---
from attnzoo.biformer import LegacyBiLevelRoutingAttention as BiLevelRoutingAttention
from attnzoo.biformer_nchw import nchwBRA

# --- end biformer ---

__all__: list[str] = []

# --- seq2seq (issue 8) ---
from attnzoo.seq2seq import Attn  # noqa: E402

__all__ += ["Attn"]
# --- end seq2seq ---
# --- transformer family (mha, swin, temporal) ---
# The seed's MultiHeadAttention shares the canonical class's name, so it is exported here under the
# seed's name but not registered as a seed name (create("MultiHeadAttention") builds the canonical).
from attnzoo.mha import SeedMultiHeadAttention as MultiHeadAttention  # noqa: E402
from attnzoo.swin import WindowAttention  # noqa: E402  (the official Swin class, unchanged API)
from attnzoo.temporal import Attention  # noqa: E402

__all__ += ["Attention", "MultiHeadAttention", "WindowAttention"]
# --- end transformer family ---
# --- blocks (issue 6): the seed-001 tutorial's builders, returning PyTorch modules ---
from attnzoo.blocks import cross_attention, feed_forward, self_attention  # noqa: E402

__all__ += ["self_attention", "cross_attention", "feed_forward"]
# --- end blocks ---
# --- gating family ---
from attnzoo.cbam import CBAtten_Res, ChannelAttention, SpatialAttention  # noqa: E402
from attnzoo.dual import SeedDualAttention  # noqa: E402
from attnzoo.se import SELayer  # noqa: E402
from attnzoo.sk import SKEConv  # noqa: E402

__all__ += ["CBAtten_Res", "ChannelAttention", "SELayer", "SKEConv", "SeedDualAttention", "SpatialAttention"]
# --- end gating family ---
__all__ += ["BiLevelRoutingAttention", "nchwBRA"]  # biformer
# --- acmix (issue 7): the canonical class already has the official signature and state_dict ---
from attnzoo.acmix import ACmix  # noqa: E402

# --- end acmix ---

__all__ += ["ACmix"]  # acmix (issue 7)
# --- global self-attention (issue 4) ---
from attnzoo.non_local import NonLocalBlockND  # noqa: E402
from attnzoo.sagan import Self_Attn_Channel, Self_Attn_Spatial  # noqa: E402

__all__ += ["NonLocalBlockND", "Self_Attn_Channel", "Self_Attn_Spatial"]
# --- end global self-attention ---
