"""Which region proposer runs: one small, import-light function shared by the regions stage and the stage model
(which keys the regions stage by the *resolved* method without importing OpenCV or scikit-image)."""

from __future__ import annotations

METHODS = ("auto", "sam", "grouping", "structure")


def resolve_region_method(method: str, sam_model: str | None, sam_checkpoint: str | None) -> str:
    """Return the proposer that runs: ``auto`` is ``sam`` when a SAM model or checkpoint is set, else ``grouping``.

    Raises ValueError for an unknown method or when both ``sam_model`` and ``sam_checkpoint`` are set.
    """
    if method not in METHODS:
        raise ValueError(f"unknown regions method {method!r} (expected one of {list(METHODS)})")
    if sam_model and sam_checkpoint:
        raise ValueError(
            f"set regions.sam_model ({sam_model}) or regions.sam_checkpoint ({sam_checkpoint}), not both"
        )
    if method == "auto":
        return "sam" if (sam_model or sam_checkpoint) else "grouping"
    return method
