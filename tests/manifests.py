"""Comparing manifests across runs: same rows and values, floats within a small tolerance."""

from __future__ import annotations

import math


def assert_same(a, b, where="row"):
    """Equal values; floats within 1e-4. similarity_score is 100 * a float32 cosine, and CLIP embeddings of a crop
    depend in the last bits on which batch it was embedded in (a resumed run or a Dask worker batches differently,
    measured differences ~6e-6)."""
    if isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-4), f"{where}: {a} != {b}"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: {len(a)} != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def builtin_joins(structure=None, regions=None, captions=None, filtered=None) -> list:
    """``build_manifest_rows``'s ``joins`` of the built-in stages from their results by image id (None: none)."""
    from pipelines.engine.stages import STAGE_DEFINITIONS

    results = {"structure": structure, "regions": regions, "captions": captions, "filter": filtered}
    return [(STAGE_DEFINITIONS[name], rows or {}) for name, rows in results.items()]
