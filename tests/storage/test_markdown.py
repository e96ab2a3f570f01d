"""storage.markdown.escape_markdown: captions and names render as their text in artifacts."""

from __future__ import annotations

import pytest

from storage.markdown import escape_markdown


@pytest.mark.parametrize("text, escaped", [
    ("A dog on a beach.", "A dog on a beach."),
    ("![x](http://evil.example/p.png)", "\\!\\[x\\]\\(http\\://evil.example/p.png\\)"),
    ("[click](javascript:alert(1))", "\\[click\\]\\(javascript:alert\\(1\\)\\)"),
    ("<img src=x onerror=alert(1)>", "&lt;img src=x onerror=alert\\(1\\)&gt;"),
    ("a | b\nc", "a \\| b c"),
    ("*bold* _it_ `code` ~~s~~ # h", "\\*bold\\* \\_it\\_ \\`code\\` \\~\\~s\\~\\~ \\# h"),
    ("see www.evil.com or https://x.y", "see www\\.evil.com or https\\://x.y"),
    ("Tom &amp; Jerry", "Tom &amp;amp; Jerry"),
    ("back\\slash", "back\\\\slash"),
])
def test_escape_markdown(text, escaped):
    assert escape_markdown(text) == escaped


def test_escaped_text_renders_as_the_original_text():
    markdown_it = pytest.importorskip("markdown_it")
    renderer = markdown_it.MarkdownIt("commonmark").enable("table")
    html = renderer.render(escape_markdown("![x](http://e/p.png) [a](b) <b>hi</b> a|b"))
    assert "<img" not in html and "<a " not in html and "<b>" not in html
    assert "![x](http://e/p.png) [a](b) &lt;b&gt;hi&lt;/b&gt; a|b" in html
