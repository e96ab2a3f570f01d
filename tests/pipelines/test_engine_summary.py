"""The engine's end-of-run table (pipelines.engine.execute): the first failures are always shown and every count is right, the manifest's
failed rows included."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from pipelines.engine.execute import format_summary, summarize
from pipelines.engine.plan import StagePlan


def _stage(name: str, failed: int, failures: int, **extra) -> dict:
    listed = [{"file": f"img{n}.jpg", "reason": f"cannot decode image {n}", "cached": n % 2 == 1}
              for n in range(failures)]
    return {"stage": name, "processed": 10, "cached": 4, "failed": failed, "seconds": 1.0, "failures": listed,
            **extra}


def _table(*stages: dict) -> list[str]:
    return format_summary({"stages": list(stages), "seconds": 1.0, "out_dir": "/out"}).splitlines()


def test_the_first_three_failures_then_the_right_number_more():
    lines = _table(_stage("ingest", 14, 14))
    assert lines[2:6] == ["  x img0.jpg: cannot decode image 0",
                          "  x img1.jpg: cannot decode image 1 (cached)",
                          "  x img2.jpg: cannot decode image 2",
                          "  x ... 11 more (see the ingest-failures artifact or the manifest)"]
    lines = _table(_stage("ingest", 3, 3))
    assert [line for line in lines if line.startswith("  x")] == [
        "  x img0.jpg: cannot decode image 0", "  x img1.jpg: cannot decode image 1 (cached)",
        "  x img2.jpg: cannot decode image 2"]  # exactly three: no "more" line


def test_items_of_failed_chunks_are_not_counted_as_unshown_failures():
    # 14 items were in chunks that failed (a full disk, a model that cannot load): none of them is an item failure.
    stage = _stage("captions", 14 + 2, 2, unfinished=14, chunk_errors=["ModelLoadError: m.safetensors is corrupt",
                                                                     "ModelLoadError: m.safetensors is corrupt"])
    lines = _table(stage)
    assert [line for line in lines if line.startswith("  x")] == [
        "  x img0.jpg: cannot decode image 0", "  x img1.jpg: cannot decode image 1 (cached)"]
    assert lines[4] == "  ! chunk failed (retried next run; 14 item(s) pending): ModelLoadError: m.safetensors is " \
                       "corrupt"
    assert lines[5] == "  ! chunk failed (retried next run): ModelLoadError: m.safetensors is corrupt"


def test_failures_without_a_listing_are_counted_not_called_more():
    lines = _table(_stage("regions", 5, 0))
    assert lines[2] == "  x 5 failed (see the regions-failures artifact or the manifest)"


def _manifest_summary(rows: list[dict], written: int) -> dict:
    """The manifest stage's summary through ``summarize``: rewritten now (its record pending, the chunk's result) or
    cached (its stored row; its failures as the plan lists them from the manifest on disk)."""
    ok = sum(r["status"] == "ok" for r in rows)
    info = json.dumps({"rows": len(rows), "ok": ok, "written_rows": written, "duplicates": 0})
    failed = [r for r in rows if r["status"] == "failed"]
    if written:
        plan = StagePlan(stage="manifest", stage_key="m", params={}, runtime={},
                         pending=[("k", {"rows": rows, "duplicates": []})])
        return summarize(plan, [{"ok": 1, "failures": [], "results": [info]}], [], 0.1)
    plan = StagePlan(stage="manifest", stage_key="m", params={}, runtime={}, pending=[],
                     cached=pa.table({"item_key": ["k"], "status": ["ok"], "result": [info]}),
                     cached_failures=[{"file": Path(r["source_path"]).name, "reason": r["error"], "cached": True}
                                      for r in failed[:3]])
    return summarize(plan, [], [], 0.1)


def test_the_manifest_row_counts_its_failed_rows_and_shows_the_first():
    rows = [{"image_id": f"id{n}", "source_path": f"/data/photo{n}.jpg", "status": "ok" if n < 3 else "failed",
             "error": None if n < 3 else f"ingest: cannot decode image ({n})"} for n in range(8)]
    fresh = _manifest_summary(rows, written=8)
    assert (fresh["processed"], fresh["cached"], fresh["failed"], fresh["rows"], fresh["ok"]) == (8, 0, 5, 8, 3)
    assert [f["file"] for f in fresh["failures"]] == ["photo3.jpg", "photo4.jpg", "photo5.jpg"]
    lines = _table(fresh)
    assert lines[1].split() == ["manifest", "8", "0", "5", "0.10"]
    assert lines[2] == "  x photo3.jpg: ingest: cannot decode image (3)"
    assert lines[5] == "  x ... 2 more (see the manifest's error column)"
    again = _manifest_summary(rows, written=0)  # nothing rewritten: every row kept, the failures cached
    assert (again["processed"], again["cached"], again["failed"]) == (0, 8, 5)
    assert all(f["cached"] for f in again["failures"])
