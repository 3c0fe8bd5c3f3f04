"""Seed-compatible classes: the seed documents' class names, constructor arguments and state_dict keys.

Code and checkpoints written against the seeds (and the papers' official code) load here unchanged
(``load_state_dict(..., strict=True)``) and give the seed's numbers; each class's docstring lists what
differs from the seed and why.
"""

__all__: list[str] = []

# --- seq2seq (issue 8) ---
from attnzoo.seq2seq import Attn  # noqa: E402

__all__ += ["Attn"]
# --- end seq2seq ---
