"""The caching layer under the real Prefect engine: stage keys chain, chunk cache keys ignore the run, only pending
items are mapped, refresh recomputes, and a deleted part is restored from Prefect's persisted result, not recomputed."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
from prefect import flow, task

from configs import load_config
from flows import tasks as flow_tasks
from flows.pipeline import RunState, run_chunks
from flows.stages import parse_stages, stage_keys, text_item_key
from flows.tasks import ChunkCachePolicy, _write

CALLS: list[list[str]] = []
_calls_lock = threading.Lock()


@task(name="extract_structure")
def fake_extract_structure(records, *, item_keys, out_dir, stage_key, options):
    """Stand-in for the structure library: one ok row per record, plus a call log to count real executions."""
    with _calls_lock:
        CALLS.append(list(item_keys))
    outputs = [{"image_id": r["image_id"], "status": "failed" if r["image_id"] == "bad" else "ok",
                "error": "boom" if r["image_id"] == "bad" else None,
                "structure_path": f"maps/{r['image_id']}.png"} for r in records]
    return _write(out_dir, "structure", stage_key, item_keys, outputs)


@flow(name="caching-test")
def run_fake_stage(images_dir: str, out_dir: str, config_path: str, ids: list[str], refresh: bool = False) -> dict:
    state = RunState(images_dir, out_dir, config_path)
    items = [(i, {"image_id": i, "source_path": f"/img/{i}.jpg"}) for i in ids]
    return run_chunks(state, "structure", items, options={}, refresh=refresh)


def _ctx(name="extract_structure", source="def f(): pass"):
    return SimpleNamespace(task=SimpleNamespace(name=name, source_code=source))


def test_chunk_cache_key_ignores_order_and_run_but_not_stage_or_items():
    policy = ChunkCachePolicy()
    key = policy.compute_key(_ctx(), {"item_keys": ["a", "b"], "stage_key": "s1", "records": [1]}, {})
    assert key == policy.compute_key(_ctx(), {"item_keys": ["b", "a"], "stage_key": "s1", "records": [2]}, {"x": 1})
    assert key != policy.compute_key(_ctx(), {"item_keys": ["a", "b"], "stage_key": "s2"}, {})
    assert key != policy.compute_key(_ctx(), {"item_keys": ["a"], "stage_key": "s1"}, {})
    assert key != policy.compute_key(_ctx(source="def f(): return 1"), {"item_keys": ["a", "b"], "stage_key": "s1"}, {})
    assert policy.compute_key(_ctx(), {"records": []}, {}) is None


def test_stage_keys_chain_forward_only(tmp_path):
    base = stage_keys(load_config())
    canny = stage_keys(load_config(overrides={"structure.canny_low": 50}))
    split = stage_keys(load_config(overrides={"manifest.split_ratios": {"train": 0.5, "val": 0.25, "test": 0.25}}))
    runtime = stage_keys(load_config(overrides={"runtime.chunk_size": 3, "structure.workers": 1, "captions.batch_size": 2}))
    order = list(base)
    assert runtime == base  # runtime-only settings never invalidate results
    assert [s for s in order if canny[s] != base[s]] == order[order.index("structure"):]
    assert [s for s in order if split[s] != base[s]] == order[order.index("manifest"):]
    assert text_item_key("a", "A cat.") != text_item_key("a", "A dog.")


def test_parse_stages_orders_and_rejects_unknown():
    assert parse_stages("manifest,ingest") == ["ingest", "manifest"]
    with pytest.raises(ValueError, match="got bogus"):
        parse_stages(["ingest", "bogus"])


def test_only_pending_chunks_run_and_cache_survives_deleted_parts(prefect_api, tmp_path, monkeypatch):
    monkeypatch.setitem(flow_tasks.STAGE_TASKS, "structure", fake_extract_structure)
    import flows.pipeline as pipeline

    monkeypatch.setitem(pipeline.STAGE_TASKS, "structure", fake_extract_structure)
    images = tmp_path / "images"
    images.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text("runtime: {chunk_size: 2, task_retries: 0}\n")
    out = tmp_path / "out"
    args = dict(images_dir=str(images), out_dir=str(out), config_path=str(config))
    CALLS.clear()

    first = run_fake_stage(**args, ids=["e", "bad", "a", "d", "c"])
    # Sorted item keys in chunks of 2: [a, bad], [c, d], [e].
    assert sorted(CALLS) == [["a", "bad"], ["c", "d"], ["e"]]
    assert (first["processed"], first["failed"], first["cached"]) == (4, 1, 0)
    assert first["failures"] == [{"file": "bad.jpg", "reason": "boom"}]

    CALLS.clear()
    second = run_fake_stage(**args, ids=["a", "bad", "c", "d", "e", "f", "g"])
    assert CALLS == [["f", "g"]]  # only the new items, one chunk
    assert (second["processed"], second["failed"], second["cached"]) == (2, 0, 5)

    CALLS.clear()
    refreshed = run_fake_stage(**args, ids=["a", "c"], refresh=True)
    assert CALLS == [["a", "c"]] and refreshed["processed"] == 2 and refreshed["cached"] == 0

    # Parts deleted but Prefect's persisted results kept: the same pending chunks are cache hits, parts are restored.
    state = RunState(images, out, str(config))
    for part in state.store("structure").parts():
        part.unlink()
    CALLS.clear()
    restored = run_fake_stage(**args, ids=["a", "bad", "c", "d", "e"])
    assert CALLS == []
    assert state.store("structure").done_keys() == {"a", "bad", "c", "d", "e"}
    assert restored["processed"] + restored["failed"] == 5


def test_module_version_is_read_without_import_and_matches_the_module(tmp_path, monkeypatch):
    import importlib
    import sys

    from flows.stages import module_version

    assert module_version("pipelines.manifest") == importlib.import_module("pipelines.manifest").VERSION
    package = tmp_path / "fakepkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "stage.py").write_text('"""doc"""\nimport not_installed_anywhere\nVERSION = "7b"\n')
    (package / "bare.py").write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert module_version("fakepkg.stage") == "7b"  # read from source: the broken import never runs
    assert module_version("fakepkg.bare") == "0"
    assert module_version("fakepkg.absent") == "missing"
    assert "fakepkg.stage" not in sys.modules


def test_format_summary_lists_counts_and_first_failures():
    from flows.pipeline import format_summary

    report = {"out_dir": "/o", "seconds": 3.25, "stages": [
        {"stage": "ingest", "processed": 3, "cached": 2, "failed": 4, "seconds": 1.5, "chunk_errors": [],
         "failures": [{"file": f"f{i}.jpg", "reason": "cannot decode"} for i in range(4)]},
        {"stage": "manifest", "processed": 0, "cached": 9, "failed": 0, "seconds": 0.01, "duplicates": 1}]}
    lines = format_summary(report).splitlines()
    assert lines[1] == "ingest             3       2       4     1.50"
    assert lines[2:6] == ["  x f0.jpg: cannot decode", "  x f1.jpg: cannot decode", "  x f2.jpg: cannot decode",
                          "  x ... 1 more (see the ingest-failures artifact or the manifest)"]
    assert lines[6] == "manifest           0       9       0     0.01"
    assert "1 duplicate file(s)" in lines[7] and lines[-1] == "total 3.2 s; outputs in /o"
