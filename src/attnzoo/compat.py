"""Seed-compatible classes: the seed documents' class names, constructor arguments and state_dict keys.

Code and checkpoints written against the seeds (and the papers' official code) load here unchanged
(``load_state_dict(..., strict=True)``) and give the seed's numbers; each class's docstring lists what
differs from the seed and why.
"""

__all__: list[str] = []

# --- gating family ---
from attnzoo.cbam import CBAtten_Res, ChannelAttention, SpatialAttention  # noqa: E402
from attnzoo.dual import SeedDualAttention  # noqa: E402
from attnzoo.se import SELayer  # noqa: E402
from attnzoo.sk import SKEConv  # noqa: E402

__all__ += ["CBAtten_Res", "ChannelAttention", "SELayer", "SKEConv", "SeedDualAttention", "SpatialAttention"]
# --- end gating family ---
