"""Seed-compatible classes: the seed documents' class names, constructor arguments and state_dict keys.

Code and checkpoints written against the seeds (and the papers' official code) load here unchanged
(``load_state_dict(..., strict=True)``) and give the seed's numbers; each class's docstring lists what
differs from the seed and why.
"""

__all__: list[str] = []

# --- global self-attention (issue 4) ---
from attnzoo.non_local import NonLocalBlockND  # noqa: E402
from attnzoo.sagan import Self_Attn_Channel, Self_Attn_Spatial  # noqa: E402

__all__ += ["NonLocalBlockND", "Self_Attn_Channel", "Self_Attn_Spatial"]
# --- end global self-attention ---
