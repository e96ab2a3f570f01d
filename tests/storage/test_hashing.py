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


# ---- key order and distinctness from the keys' bytes (storage.hashing.key_codes) ------------------------------------
def _random_keys(rng, count, width):
    return ["".join(rng.choice(list("0123456789abcdef"), width)) for _ in range(count)]


@pytest.mark.parametrize("width", [16, 32, 40])
def test_key_order_and_distinctness_equal_arrows(width):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from storage.hashing import distinct_key_order, keys_distinct

    rng = np.random.default_rng(width)
    keys = _random_keys(rng, 3000, width)
    # sliced and chunked arrays: the offsets and data buffers start inside an allocation
    chunked = pa.chunked_array([pa.array(keys[:1000]).slice(10), pa.array(keys[1000:])])
    for array in (pa.array(keys), chunked, pa.array(keys).slice(7, 500)):
        order = distinct_key_order(array)
        assert order is not None
        np.testing.assert_array_equal(order, pc.sort_indices(array).to_numpy())
        assert keys_distinct(array) is True
    # mixed lengths, all starting with 16 hex digits: still Arrow's order
    mixed = pa.array([key[:16 + n % 5] for n, key in enumerate(keys)])
    np.testing.assert_array_equal(distinct_key_order(mixed), pc.sort_indices(mixed).to_numpy())


@pytest.mark.parametrize("keys", [
    ["a" * 16, "a" * 16],  # equal keys
    ["0123456789abcdef" + "0" * 16, "0123456789abcdef" + "1" * 16],  # distinct, but not in their first 16 digits
    ["0123456789ABCDEF", "0123456789abcdee"],  # upper case: another order than the numbers'
    ["0123456789abcde", "0123456789abcdef"],  # shorter than 16
    ["0123456789abcdeg", "0123456789abcdef"],  # not hex
    ["0123456789abcdef", None],
    ["", ""],  # no data buffer at all
    ["", "0123456789abcdef"],
])
def test_keys_the_numbers_cannot_tell_apart_are_left_to_arrow(keys):
    import pyarrow as pa

    from storage.hashing import distinct_key_order, keys_distinct

    assert distinct_key_order(pa.array(keys, pa.string())) is None
    assert keys_distinct(pa.array(keys, pa.string())) is None


def test_no_keys_are_distinct_and_ordered():
    import pyarrow as pa

    from storage.hashing import distinct_key_order, keys_distinct

    assert keys_distinct(pa.array([], pa.string())) is True
    assert len(distinct_key_order(pa.array([], pa.string()))) == 0
    assert distinct_key_order(pa.array(["f" * 16])).tolist() == [0]
