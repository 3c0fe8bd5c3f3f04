"""MkDocs hook: typeset the site's math at build time, as MathML, so no page needs a script or the network.

``pymdownx.arithmatex`` (generic mode) wraps every ``$...$`` / ``$$...$$`` of the Markdown pages and of
the docstrings that mkdocstrings renders in ``<span class="arithmatex">\\(...\\)</span>`` or
``<div class="arithmatex">\\[...\\]</div>``. This hook replaces each with the MathML that
``latex2mathml`` (pure Python, from PyPI) makes of the TeX, which every current browser draws natively.
TeX that ``latex2mathml`` cannot read fails the build and names the page and the formula.
"""

from __future__ import annotations

import html
import re
from typing import Any

from latex2mathml.converter import convert
from mkdocs.exceptions import PluginError

_MATH = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*'
    r"(?:\\\((?P<inline>.*?)\\\)|\\\[(?P<block>.*?)\\\])"
    r"\s*</(?P=tag)>",
    re.S,
)

_UNKNOWN = re.compile(r">\s*(\\[A-Za-z]+)")


def render(tex: str, *, display: bool) -> str:
    """The MathML of one formula (``display`` for a block of its own)."""
    try:
        mathml = convert(tex.strip(), display="block" if display else "inline")
    except Exception as exc:  # latex2mathml raises many types; all mean "cannot read this TeX"
        raise ValueError(f"cannot typeset {tex.strip()!r}: {type(exc).__name__}: {exc}") from exc
    if "<merror" in mathml:
        raise ValueError(f"cannot typeset {tex.strip()!r}: latex2mathml reports an error")
    unknown = _UNKNOWN.findall(mathml)  # latex2mathml passes a command it does not know through as text
    if unknown:
        raise ValueError(f"cannot typeset {tex.strip()!r}: unknown TeX command(s) {sorted(set(unknown))}")
    return mathml


def typeset(page_html: str) -> str:
    """``page_html`` with every arithmatex span/div replaced by its MathML."""

    def one(match: re.Match[str]) -> str:
        display = match.group("block") is not None
        tex = html.unescape(match.group("block") if display else match.group("inline"))
        mathml = render(tex, display=display)
        return f'<div class="math">{mathml}</div>' if display else f'<span class="math">{mathml}</span>'

    return _MATH.sub(one, page_html)


def on_page_content(html_text: str, page: Any, config: Any, files: Any) -> str:
    try:
        return typeset(html_text)
    except ValueError as exc:
        raise PluginError(f"{page.file.src_path}: {exc}") from exc
