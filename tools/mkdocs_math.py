"""MkDocs hook: typeset the site's math at build time, as MathML, so no page needs a script or the network.

``pymdownx.arithmatex`` (generic mode) wraps every ``$...$`` / ``$$...$$`` of the Markdown pages and of
the docstrings that mkdocstrings renders in ``<span class="arithmatex">\\(...\\)</span>`` or
``<div class="arithmatex">\\[...\\]</div>``. This hook replaces each with the MathML that
``latex2mathml`` (pure Python, from PyPI) makes of the TeX, which every current browser draws natively.
TeX that ``latex2mathml`` cannot read fails the build and names the page and the formula.

A browser never breaks a MathML formula across lines, so a display formula that lists several
equations (``a = ...,\\qquad b = ...``) would run past the text column. Such a formula is cut at its
top-level separators (outside braces, brackets, ``\\left...\\right`` and environments) into one
``<math>`` per part, in a ``math-row`` (a wrapping flexbox, styled in docs/stylesheets/extra.css):
the parts sit side by side, the separator's width apart, while they fit, and wrap onto the next
line where they do not. ``\\qquad`` cuts before ``\\quad`` (a part that still holds a ``\\quad``
is a row of its own, which wraps only if it alone is too wide); a chain ``a = b = c`` with neither
may break before its second and later ``=``; a ``,`` or ``;`` before a separator stays with its
part; a top-level ``\\\\`` always starts a new line. The cut changes only where lines may break,
never the TeX of a part. A single part wider than the column still scrolls sideways:
tests/test_browser.py fails on it, and its TeX needs rewriting (several ``$$`` blocks, or named
sub-terms joined by ``\\qquad``).
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

# A TeX token: a control word, a control symbol (\\ included) or one character.
_TOKEN = re.compile(r"\\[A-Za-z]+|\\.|.", re.S)
# Where a display formula may be cut, strongest first: a line break, the spaces between equations
# (their width in em is the gap between the parts), and "=" in a chain a = b = c (cut before the "=").
_SEPARATORS = ("\\\\", r"\qquad", r"\quad", "=")
_GAP_EM = {r"\qquad": 2, r"\quad": 1, "=": 0}
_OPEN = {"{", "(", "[", r"\{", r"\left", r"\begin"}
_CLOSE = {"}", ")", "]", r"\}", r"\right", r"\end"}


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


def split_top_level(tex: str) -> tuple[str | None, list[str]]:
    """``tex`` cut at its strongest top-level separator: ``(separator, parts)``.

    Top level is outside braces, brackets, ``\\left...\\right`` and ``\\begin...\\end``. The
    strongest separator present there is ``\\\\``, else ``\\qquad``, else ``\\quad``: ``tex`` is cut at
    each of its occurrences, which are dropped (weaker ones stay inside the parts). Failing these, a
    chain ``a = b = c`` (two or more top-level ``=``, no top-level ``,`` or ``;`` before the last) is
    cut before each ``=`` but the first, which stays: ``a = b``, ``= c``. Empty parts are dropped.
    Without a cut: ``(None, [tex])``.
    """
    depth = 0
    found: list[tuple[str, int, int]] = []  # (separator or punctuation, start, end) at top level
    for token in _TOKEN.finditer(tex):
        word = token.group()
        if word in _OPEN:
            depth += 1
        elif word in _CLOSE:
            depth -= 1
        elif depth == 0 and (word in _SEPARATORS or word in ",;"):
            found.append((word, token.start(), token.end()))
    strongest = next((s for s in _SEPARATORS if any(f[0] == s for f in found)), None)
    if strongest is None:
        return None, [tex.strip()]
    cuts = [(begin, end) for word, begin, end in found if word == strongest]
    if strongest == "=":
        last = cuts[-1][0]
        if len(cuts) < 2 or any(word in ",;" and begin < last for word, begin, _ in found):
            return None, [tex.strip()]
        cuts = [(begin, begin) for begin, _ in cuts[1:]]  # the "=" starts the next part
    parts, start = [], 0
    for begin, end in cuts:
        parts.append(tex[start:begin].strip())
        start = end
    parts.append(tex[start:].strip())
    parts = [p for p in parts if p]
    if len(parts) == 1:  # only leading or trailing separators: cut what is left at weaker ones
        return split_top_level(parts[0])
    return (strongest, parts) if parts else (None, [tex.strip()])


def layout(tex: str) -> str:
    """The HTML of one display formula: one ``<math>``, or a ``math-row`` of its parts.

    A row's parts sit side by side, the separator's width apart, and wrap where the column is
    too narrow; a row cut at ``\\\\`` puts each part on a line of its own.
    """
    separator, parts = split_top_level(tex)
    if separator is None:
        return render(parts[0], display=True)
    inner = [layout(part) for part in parts]
    if separator == "\\\\":
        return '<span class="math-row">' + '<span class="math-break"></span>'.join(inner) + "</span>"
    gap = _GAP_EM[separator]
    return f'<span class="math-row" style="column-gap: {gap}em">' + "".join(inner) + "</span>"


def render_display(tex: str) -> str:
    """The ``<div class="math">`` of one display formula (its TeX kept in ``data-tex``)."""
    source = html.escape(" ".join(tex.split()), quote=True)
    return f'<div class="math" data-tex="{source}">{layout(tex)}</div>'


def typeset(page_html: str) -> str:
    """``page_html`` with every arithmatex span/div replaced by its MathML."""

    def one(match: re.Match[str]) -> str:
        display = match.group("block") is not None
        tex = html.unescape(match.group("block") if display else match.group("inline"))
        if display:
            return render_display(tex)
        return f'<span class="math">{render(tex, display=False)}</span>'

    return _MATH.sub(one, page_html)


def on_page_content(html_text: str, page: Any, config: Any, files: Any) -> str:
    try:
        return typeset(html_text)
    except ValueError as exc:
        raise PluginError(f"{page.file.src_path}: {exc}") from exc
