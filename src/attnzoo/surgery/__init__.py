"""Network surgery: put attention into an existing model, swap modules for attention, find attention.

- `insert` / `replace` (`attnzoo.surgery.core`) edit a model in place;
- `find` (`attnzoo.surgery.find`) lists the attention a model holds;
- `attnzoo.surgery.places` selects places and measures what flows through them;
- `attnzoo.surgery.adapters` builds one module for one place (`LayoutAdapter`);
- `attnzoo.surgery.build` builds any registered mechanism for a given input.
"""

from attnzoo.surgery.adapters import LayoutAdapter
from attnzoo.surgery.core import insert, replace
from attnzoo.surgery.find import FoundAttention, find
from attnzoo.surgery.places import select

__all__ = ["FoundAttention", "LayoutAdapter", "find", "insert", "replace", "select"]
