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
__all__ += ["BiLevelRoutingAttention", "nchwBRA"]  # biformer
