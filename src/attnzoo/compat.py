"""Seed-compatible classes: the seed documents' class names, constructor arguments and state_dict keys.

Code and checkpoints written against the seeds (and the papers' official code) load here unchanged
(``load_state_dict(..., strict=True)``) and give the seed's numbers; each class's docstring lists what
differs from the seed and why.
"""

__all__: list[str] = []

# --- blocks (issue 6): the seed-001 tutorial's builders, returning PyTorch modules ---
from attnzoo.blocks import cross_attention, feed_forward, self_attention  # noqa: E402

__all__ += ["self_attention", "cross_attention", "feed_forward"]
# --- end blocks ---
