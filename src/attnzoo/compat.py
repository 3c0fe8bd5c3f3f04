"""Seed-compatible classes: the seed documents' class names, constructor arguments and state_dict keys.

Code and checkpoints written against the seeds (and the papers' official code) load here unchanged
(``load_state_dict(..., strict=True)``) and give the seed's numbers; each class's docstring lists what
differs from the seed and why.
"""

# --- acmix (issue 7): the canonical class already has the official signature and state_dict ---
from attnzoo.acmix import ACmix

# --- end acmix ---

__all__: list[str] = []
__all__ += ["ACmix"]  # acmix (issue 7)
