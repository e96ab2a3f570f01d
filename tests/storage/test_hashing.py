"""Content keys: the flat fast path writes exactly the JSON the encoder writes (a changed key would recompute every
cached item of an upgraded catalogue)."""

from __future__ import annotations

import hashlib
import json

import pytest

from storage.hashing import _flat_payload, content_key

TRICKY = ["", "plain", "caf\u00e9", "\u65e5\u672c", "quote \" and \\ back", "tab\tnew\nline\r", "\x00\x1f\x7f",
          "line sep \u2028 para \u2029", "emoji \U0001f600", "lone \udcff surrogate", "</script>", "a" * 500]
NUMBERS = [0, 1, -1, 2**63 - 1, -(2**63), 10**30, 1765000000123456789]


def _reference(*parts, length=16):
    """The key as it was always computed: json.dumps with sorted keys, compact separators, no ASCII escaping."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()[:length]


@pytest.mark.parametrize("text", TRICKY)
def test_flat_keys_equal_the_encoders_for_any_text_and_integer(text):
    for parts in [(text,), ("text", text, ""), (text, *NUMBERS), (*NUMBERS, text)]:
        assert _flat_payload(parts) == json.dumps(parts, separators=(",", ":"), ensure_ascii=False)
        if "\udcff" not in text:  # a lone surrogate cannot be encoded, by either path
            assert content_key(*parts) == _reference(*parts)
            assert content_key(*parts, length=32) == _reference(*parts, length=32)


@pytest.mark.parametrize("parts", [(True,), (1, False), (None,), (1.5,), ("a", ["b"]), ({"k": 1},), (b"x",)])
def test_other_values_go_through_the_encoder(parts):
    assert _flat_payload(parts) is None
    assert content_key(*parts) == _reference(*parts)


def test_the_keys_a_catalogue_stores_are_unchanged():
    # Literal keys computed by the code before the fast path (git 35eaeba): a file key and a text item key.
    assert content_key("/data/images/0000/img-0000000.png", 4096, 1765000000123456789, 1765000000123456789,
                       2049, 123456) == "2737146090f85cbd"
    assert content_key("text", "0123456789abcdef0123456789abcdef", "a dog on the caf\u00e9 terrace") == "f7b5309a1f829e71"
