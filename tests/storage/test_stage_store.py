"""StageStore: atomic parts with nested segment columns, done keys, last-part-wins reads, superseded-part pruning."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.hashing import content_key
from storage.layout import OutputLayout
from storage.manifest import SEGMENT_TYPE, bbox
from storage.stage_store import ITEM_KEY, StageStore

SCHEMA = pa.schema(
    [
        pa.field("item_key", pa.string(), nullable=False),
        pa.field("image_id", pa.string()),
        pa.field("status", pa.string()),
        pa.field("segments", pa.list_(SEGMENT_TYPE)),
    ]
)


def _segment(n: int) -> dict:
    return {"bbox": bbox(0, 0, n + 1, n + 2), "crop_path": f"crops/{n}.jpg", "structure_crop_path": None}


@pytest.fixture()
def store(tmp_path) -> StageStore:
    return StageStore(OutputLayout(tmp_path), "regions", "k1", SCHEMA)


def test_write_part_is_named_by_item_keys_and_round_trips_nested_segments(store, tmp_path):
    rows = [
        {"item_key": "b", "image_id": "b", "status": "ok", "segments": [_segment(1), _segment(2)]},
        {"item_key": "a", "image_id": "a", "status": "ok", "segments": []},
    ]
    part = store.write_part(rows)
    assert part == tmp_path / "stages" / "regions" / "k1" / f"part-{content_key(['a', 'b'])}.parquet"
    table = store.read()
    assert table.schema.field("segments").type == pa.list_(SEGMENT_TYPE)
    by_key = {r["item_key"]: r for r in table.to_pylist()}
    assert by_key["a"]["segments"] == []
    assert by_key["b"]["segments"][1]["bbox"] == {"x1": 0, "y1": 0, "x2": 3, "y2": 4, "width": 3, "height": 4}
    assert by_key["b"]["segments"][0]["caption"] is None  # fields the stage does not produce are typed nulls
    assert _keys(store) == {"a", "b"}


def _keys(store) -> set[str]:
    return set(store.read([ITEM_KEY]).column(ITEM_KEY).to_pylist())


def test_empty_store_reads_typed_empty_table(store):
    assert _keys(store) == set()
    table = store.read()
    assert table.num_rows == 0 and table.schema == SCHEMA


def test_read_dedupes_item_keys_newest_part_wins(store):
    first = store.write_part([{"item_key": "a", "image_id": "a", "status": "failed"},
                              {"item_key": "b", "image_id": "b", "status": "ok"}])
    os.utime(first, ns=(1_000_000_000, 1_000_000_000))  # make the order unambiguous
    store.write_part([{"item_key": "a", "image_id": "a", "status": "ok"}])
    rows = {r["item_key"]: r["status"] for r in store.read(columns=["status"]).to_pylist()}
    assert rows == {"a": "ok", "b": "ok"}
    assert store.read().num_rows == 2


def test_temporary_files_are_not_parts(store):
    store.write_part([{"item_key": "a", "image_id": "a", "status": "ok"}])
    (store.folder / ".part-x.parquet.123.tmp").write_bytes(b"half written")
    (store.folder / ".part-y.parquet").write_bytes(b"half written")
    assert _keys(store) == {"a"}


def test_remove_superseded_keeps_parts_with_uncovered_items(store):
    old_ab = store.write_part([{"item_key": k, "image_id": k, "status": "ok"} for k in "ab"])
    old_c = store.write_part([{"item_key": "c", "image_id": "c", "status": "ok"}])
    new = store.write_part([{"item_key": k, "image_id": k, "status": "ok"} for k in "abd"])
    assert store.remove_superseded([new]) == 1
    assert not old_ab.exists() and old_c.exists() and new.exists()
    assert _keys(store) == {"a", "b", "c", "d"}


def test_rows_without_item_key_are_refused(store):
    with pytest.raises(ValueError, match="item_key"):
        store.write_part([{"image_id": "a"}])
    with pytest.raises(ValueError, match="at least one row"):
        store.write_part([])


def test_schemaless_store_infers_columns(tmp_path):
    store = StageStore(OutputLayout(tmp_path), "train", "k")
    store.write_part([{"item_key": "m", "result": "{}"}])
    assert pq.read_table(store.parts()[0]).column_names == ["item_key", "result"]
    assert store.read().to_pylist() == [{"item_key": "m", "result": "{}"}]


def _write_in_order(store, parts: list[list[tuple[str, str]]]) -> None:
    """Write parts oldest first (distinct modification times), each ``[(item_key, status)]``."""
    for number, rows in enumerate(parts):
        path = store.write_part([{"item_key": k, "image_id": k, "status": s, "segments": []} for k, s in rows])
        os.utime(path, ns=(10**18 + number * 10**9,) * 2)


def test_compaction_merges_small_parts_keeping_each_keys_newest_row(store):
    # 6 small parts: key "k3" rewritten twice; a 5-row part counts as big (rows_per_part=5) and is newer than the
    # first small parts: its "k0" beats theirs, while a later small part's "k9" beats the big part's.
    parts = [[("k0", "old"), ("k1", "ok")], [("k2", "ok"), ("k3", "old")], [("k3", "older?")],
             [("k0", "big"), ("k9", "old"), ("x1", "ok"), ("x2", "ok"), ("x3", "ok")],
             [("k3", "new"), ("k4", "ok")], [("k5", "ok")], [("k9", "new")]]
    _write_in_order(store, parts)
    before = {r["item_key"]: r["status"] for r in store.read().to_pylist()}
    assert before["k0"] == "big" and before["k3"] == "new" and before["k9"] == "new"
    assert store.compact(rows_per_part=5, after=7) == 0  # fewer small parts than asked for: nothing changes
    assert len(store.parts()) == 7
    removed = store.compact(rows_per_part=5, after=6)
    # the merged remainder holds only "k9", as the last small part did: the same name, so that part was rewritten
    assert removed == 5
    # the 6 small parts' 7 winning rows (k1 k2 k3 k4 k5 k9, and not k0) became one full part and one of 1 row
    sizes = sorted(pq.ParquetFile(p).metadata.num_rows for p in store.parts())
    assert sizes == [1, 5, 5]
    assert {r["item_key"]: r["status"] for r in store.read().to_pylist()} == before
    assert store.compact(rows_per_part=5, after=2) == 0  # one small part left
