"""MkDocs hook: dotted names in table cells may wrap after their dots.

docs/stylesheets/extra.css keeps the theme from breaking inline code anywhere in a table (it split
names mid-word), so a long dotted name (``timm.models.swin_transformer_v2_cr.WindowMultiHeadAttention``)
is one unbreakable piece, and a table of a few such names ran far past the text column (the
interop page's timm table hid its last two columns behind a sideways scroll). This hook puts a
``<wbr>`` (a line-break opportunity that adds no character, so copying the name is unchanged) after
each dot between two names in the inline code inside tables.
"""

from __future__ import annotations

import re
from typing import Any

_TABLE = re.compile(r"<table>.*?</table>", re.S)
_CODE = re.compile(r"<code>([^<]*)</code>")


def wrap_dots(page_html: str) -> str:
    """``page_html`` with ``<wbr>`` after the dots of inline code in tables (between names only)."""

    def code(match: re.Match[str]) -> str:
        return "<code>" + re.sub(r"(?<=\w)\.(?=[A-Za-z_])", ".<wbr>", match.group(1)) + "</code>"

    return _TABLE.sub(lambda table: _CODE.sub(code, table.group()), page_html)


def on_page_content(html_text: str, page: Any, config: Any, files: Any) -> str:
    return wrap_dots(html_text)
