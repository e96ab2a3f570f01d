"""Untrusted text (captions, file names, error messages) placed inside Markdown reports, shown as the text itself.

A caption such as ``![x](http://evil/a.png)`` or ``[click](javascript:...)`` must not become an image or a link in
a Prefect artifact, and ``|`` or a newline must not break a table row.
"""

from __future__ import annotations

import re

# Every ASCII punctuation character may be backslash-escaped in CommonMark; these are the ones that start or shape
# markup (emphasis, code, links/images, headings, tables, strikethrough, lists).
_MARKUP = re.compile(r"([\\`*_\[\]()!#|~+\-{}])")
_AUTOLINK = re.compile(r"(?i)(?<=[a-z])(:)(?=//)|\b(www)(\.)")


def escape_markdown(text: object) -> str:
    """Return ``text`` as one line of Markdown that renders as exactly that text: no links, images, HTML, emphasis,
    table breaks or bare-URL autolinks (``<`` ``>`` ``&`` become entities, markup characters are backslash-escaped,
    line breaks become spaces)."""
    value = " ".join(str(text).split())
    value = value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    value = _MARKUP.sub(r"\\\1", value)
    return _AUTOLINK.sub(lambda m: "\\:" if m.group(1) else f"{m.group(2)}\\.", value)
