"""The stage model: one definition per pipeline stage, from which everything else derives.

A ``Stage`` says, in one place: its name, the typed parameters that shape its output (built from its config section,
with ``auto`` values *resolved* to what will actually run), the runtime settings that do not (devices, workers, batch
sizes), the library modules whose ``VERSION`` it depends on, the upstream stages it reads, the Parquet schema of its
stored rows, which items it has to process given the stored upstream rows, the library call for one chunk, and which
output files a row owns (verified on the next run). From it derive the cache key (``stage_key``), the keyword
arguments passed to the library, the CLI/flow parameters (``--set section.key=value`` over the same config), and the
summary. Nothing here imports Prefect, torch or spaCy at module level.
"""

from __future__ import annotations

import copy
import functools
import gc
import importlib.util
import json
import re
import threading
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, NamedTuple, Protocol

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from configs.schema import TINY_CLIP, Config
from storage.hashing import content_key, distinct_key_order, file_digest, table_digest
from storage.layout import OutputLayout
from storage.manifest import EXTRA_CAPTION_TYPE, SEGMENT_TYPE, STATUS_FAILED, STATUS_OK
from pipelines.engine.workers import usable_cpus
from storage.stage_store import ITEM_KEY, OUTPUT_TYPE, OUTPUTS
from pipelines.steps.manifest import one_line_error
from structxlip.devices import cuda_available

if TYPE_CHECKING:
    from pipelines.steps.ingest import ScanResult
    from pipelines.steps.manifest import ManifestRows

_STATUS = [pa.field(ITEM_KEY, pa.string(), nullable=False), pa.field("image_id", pa.string()),
           pa.field("status", pa.string()), pa.field("error", pa.string()), pa.field(OUTPUTS, OUTPUT_TYPE)]
Item = tuple[str, Any]  # (item key, input record)


class Params(BaseModel):
    """Result-shaping parameters of a stage (frozen, JSON-able): the only values that enter its cache key."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- resolving "auto" and model identities ---------------------------------------------------------------------
def resolve_structure_backend(backend: str) -> str:
    """Return the structure backend that will run: ``auto`` is kornia when CUDA is available, else opencv."""
    if backend != "auto":
        return backend
    return "kornia" if cuda_available() else "opencv"


@functools.lru_cache(maxsize=None)
def model_identity(name: str) -> dict:
    """Return what identifies a model's weights cheaply: a local folder's file sizes and config digest, a cached hub
    snapshot's revision, or the id itself (the tiny CLIP is identified by its builder's version)."""
    if name == TINY_CLIP:
        return {"id": name, "builder": module_version("structxlip.models")}
    folder = Path(name).expanduser()
    if folder.is_dir():
        files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
        config = folder / "config.json"
        return {"files": files, "config": file_digest(config) if config.is_file() else None}
    import os

    cache = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    ref = cache.expanduser() / f"models--{name.replace('/', '--')}" / "refs" / "main"
    return {"id": name, "revision": ref.read_text().strip() if ref.is_file() else None}


_VERSION_LINE = re.compile(r"""^VERSION\s*(?::\s*str\s*)?=\s*["']([^"']+)["']""", re.MULTILINE)


@functools.lru_cache(maxsize=None)
def module_version(name: str) -> str:
    """Return a module's ``VERSION = "..."`` read from its source without importing it (importing torch-based
    modules costs seconds per run); "0" when it declares none, "missing" when the module does not exist."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return "missing"
    match = _VERSION_LINE.search(Path(spec.origin).read_text(encoding="utf-8"))
    return match.group(1) if match else "0"


# The library code a stage's key covers: stage libraries, the training library, storage. The engine (which imports
# every stage) and the orchestration are not part of any stage's results.
_KEYED_PACKAGES = ("pipelines", "structxlip", "storage")
# The engine and reporting packages, the error classifier, the test fault points and the CLI: never keyed.
_NOT_KEYED = ("pipelines.engine.", "pipelines.reporting.", "pipelines.steps.errors", "structxlip.app.faults",
              "structxlip.app.commands")


_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _module_file(name: str) -> Path | None:
    """The source file of project module ``name`` (found on disk: importing torch-based modules costs seconds)."""
    base = _PROJECT_ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


# Import statements anywhere in a file (indented: function-level), "from a import (b, c)" over several lines too.
# A regex, not ast: parsing every library file with ast costs ~0.3 s per run, the whole of a fully cached run.
_FROM_IMPORT = re.compile(r"^[ \t]*from[ \t]+([\w.]+)[ \t]+import[ \t]+(\([^)]*\)|[^\n#]*)", re.MULTILINE)
_IMPORT = re.compile(r"^[ \t]*import[ \t]+([\w.][\w., \t]*)", re.MULTILINE)


@functools.lru_cache(maxsize=None)
def _direct_imports(name: str) -> tuple[str, ...]:
    """Project modules ``name`` imports anywhere in its source (function-level imports included), read, not run."""
    source = _module_file(name)
    if source is None:
        return ()
    text = source.read_text(encoding="utf-8")
    candidates = []
    for module, names in _FROM_IMPORT.findall(text):
        for imported in names.strip("()").replace("\n", ",").split(","):
            imported = imported.split(" as ")[0].strip()
            if imported and imported != "*":
                candidates.append(f"{module}.{imported}")
    for modules in _IMPORT.findall(text):
        candidates += [m.split(" as ")[0].strip() for m in modules.split(",")]
    found = set()
    for candidate in candidates:
        if candidate.split(".")[0] not in _KEYED_PACKAGES:
            continue
        while "." in candidate and _module_file(candidate) is None:  # "a.b.name": an attribute of module a.b
            candidate = candidate.rpartition(".")[0]
        if "." in candidate:  # a package's own __init__ holds no stage code
            found.add(candidate)
    return tuple(sorted(found - {name}))


@functools.lru_cache(maxsize=None)
def imported_modules(entry: tuple[str, ...]) -> tuple[str, ...]:
    """Return ``entry`` and every keyed project module they import, transitively, sorted."""
    seen: set[str] = set()
    pending = list(entry)
    while pending:
        name = pending.pop()
        if name in seen or name.startswith(_NOT_KEYED):
            continue
        seen.add(name)
        pending += _direct_imports(name)
    return tuple(sorted(seen))


def _vocab_digest(vocab_dir: str) -> dict[str, str]:
    """File name -> SHA-256 of the vocabulary files, so editing a word list changes the filter stage's key."""
    folder = Path(vocab_dir).expanduser()
    return {p.name: file_digest(p) for p in sorted(folder.glob("*")) if p.is_file()}


def text_item_key(image_id: str, caption: str | None, extra_captions: tuple[str, ...] | list[str] = ()) -> str:
    """Item key of the text stages: the image and all its captions, so editing any caption recomputes only the text
    stages (a single-caption image keeps the key it always had). A run keeps these keys for the next one
    (``Pipeline.caption_keys``): changing how they are made means bumping ``plan.CAPTION_KEYS_VERSION``."""
    if extra_captions:
        return content_key("text", image_id, caption or "", list(extra_captions))
    return content_key("text", image_id, caption or "")


# A stage's worker process pays its start-up before its first item (the captions stage's: loading its CLIP and spaCy
# pipeline, about 1 CPU-s, after the forkserver's preload; importing torch, transformers and spaCy too, about 4 CPU-s
# more, without it): with ``runtime.workers: 0`` a CPU stage gets one worker per this many pending items, up to one
# per core.
ITEMS_PER_WORKER = 32


def local_workers(config: Config, pending: int) -> tuple[int, int]:
    """Return ``(chunks at a time, worker processes)`` of a CPU data stage with ``pending`` items on this machine.

    ``runtime.workers`` N > 1: N worker processes; 1: in the calling process (no isolation); 0 (auto): one worker per
    ``ITEMS_PER_WORKER`` pending items, at least one (a crash of a decoder still fails only its item) and at most one
    per usable core, so a small folder does not start a process per core for a few images."""
    configured = config.runtime.workers
    if configured == 1:
        return 1, 0
    if configured > 1:
        return configured, configured
    processes = max(1, min(usable_cpus(), -(-pending // ITEMS_PER_WORKER)))
    return processes, processes


def _on_gpu(device: str) -> bool:
    """Whether a stage's ``device`` setting resolves to a CUDA device (without importing torch where there is none)."""
    if device == "auto":
        return cuda_available()
    return device.startswith("cuda")


# ---- heavy objects, built once per worker process and reused across chunks ---------------------------------------
_shared: dict[tuple, tuple[Any, threading.Lock]] = {}
_shared_lock = threading.Lock()


def shared(key: tuple, factory: Callable[[], Any]) -> tuple[Any, threading.Lock]:
    """Return the process-wide object for ``key`` (built by ``factory`` the first time) and the lock to hold while
    using it: tokenizers and spaCy pipelines are not safe to call from two threads at once, and torch already
    spreads one batch over every core, so chunks sharing a model take turns."""
    with _shared_lock:
        if key not in _shared:
            try:
                built = factory()
            except Exception as exc:
                # A model, pipeline or vocabulary that cannot be built is the environment's problem, never an item's:
                # the chunk fails and nothing is recorded (pipelines.steps.errors), so a re-run after the fix does the
                # work.
                from pipelines.steps.errors import EnvironmentFailure, one_line

                raise EnvironmentFailure(f"could not load {key[0]} ({_describe(key)}): {one_line(exc)}") from exc
            _shared[key] = (built, threading.Lock())
            # A model is hundreds of thousands of long-lived objects: keep them out of every later full collection
            # (~0.3 s each with the tiny CLIP and spaCy loaded, about 1 ms per image of a chunk).
            gc.freeze()
        return _shared[key]


def _describe(key: tuple) -> str:
    """The model or pipeline a ``shared`` key names, for the one-line error (its id or folder, not the whole key)."""
    for part in key[1:]:
        try:
            value = json.loads(part) if isinstance(part, str) and part.startswith("{") else part
        except ValueError:
            value = part
        if isinstance(value, dict):
            for name in ("model_name_or_dir", "model_id", "spacy_model"):
                if value.get(name):
                    return str(value[name])
        elif isinstance(value, str):
            return value
    return str(key[0])


def library_arguments(params: dict) -> dict:
    """Return a stage's parameters as library keyword arguments: ``*_identity`` values (what identifies a model's
    weights) are in the key only."""
    return {k: v for k, v in params.items() if not k.endswith("_identity")}


def _freeze(value: Any) -> Any:
    return json.dumps(value, sort_keys=True, default=str)


# ---- the stage base ------------------------------------------------------------------------------------------------
class PipelineView(Protocol):
    """What a stage reads of the run to list its items and gallery rows (``Stage.items``, ``Stage.example_rows``).
    ``pipelines.engine.plan.Pipeline`` provides it; declared here so the stage model does not import the planner above
    it."""

    stages: dict[str, Stage]  # every stage of the run's config, in pipeline order
    keys: dict[str, str]  # stage name -> stage key
    layout: OutputLayout

    @property
    def scan(self) -> ScanResult: ...

    @property
    def file_keys(self) -> pa.Array: ...

    @property
    def images(self) -> list[dict]: ...

    @property
    def text_keys(self) -> dict[str, str]: ...

    def text_keys_of(self, image_ids: pa.Array) -> pa.Array: ...

    @property
    def manifest_rows(self) -> ManifestRows: ...

    def manifest_update(self) -> dict: ...

    def done_rows(self, stage: str, image_ids: Collection[str] | None = None) -> dict[str, dict]: ...

    def done_table(self, stage: str) -> pa.Table: ...

    def rows_of(self, stage: str, keys: set[str]) -> dict[str, dict]: ...

    @property
    def image_table(self) -> pa.Table: ...

    @property
    def source_paths(self) -> dict[str, str]: ...

    def captions_digest(self) -> str: ...

    def captions_of_image(self, image_id: str) -> tuple[list[str], str | None, str | None]: ...

    def manifest_digest(self) -> str | None: ...


class Requirement(NamedTuple):
    """Something a stage needs from the machine before it runs, checked by the preflight: a spaCy pipeline
    (``spacy``) or a CLIP/SAM model folder or hub id (``model``), named by its config ``key``."""

    kind: Literal["spacy", "model"]
    key: str
    value: str


class Stage:
    """One pipeline stage. Subclasses set the class attributes and implement ``items`` and ``run`` (and ``params``
    unless the stage's config section is its ``Params`` model, as for a plugin)."""

    name: ClassVar[str]
    description: ClassVar[str]
    task_name: ClassVar[str]  # the verb-noun Prefect task of one chunk (extract_structure)
    task_doc: ClassVar[str]  # what one task does
    modules: ClassVar[tuple[str, ...]] = ()  # library modules whose VERSION enters the key
    upstream: ClassVar[tuple[str, ...]] = ()
    schema: ClassVar[pa.Schema]
    whole: ClassVar[bool] = False  # one item for the whole dataset (manifest, train, evaluate)
    data_stage: ClassVar[bool] = True  # prepares data (a run of the "data stages" ends with the manifest)
    rows_by_image: ClassVar[bool] = True  # later stages look its rows up by image id (else by item key)
    counts_rows: ClassVar[bool] = False  # its one item is a table: the summary counts its rows (the manifest)
    manifest_fields: ClassVar[tuple[pa.Field, ...]] = ()  # manifest columns the stage contributes (manifest_values)
    gallery: ClassVar[str | None] = None  # the gallery artifact its example_rows go to (None: no gallery)
    gallery_columns: ClassVar[tuple[str, ...]] = ()  # row columns holding images to show beside the source image
    report: ClassVar[str | None] = None  # the report published after it computed: quality, training, evaluation
    summary_params: ClassVar[tuple[str, ...]] = ()  # resolved parameters repeated in its summary (backend: kornia)
    source: str | None = None  # the plugin file that defines the stage (None: built in)
    # Stored columns, besides item_key, image_id, status and error, that item_keys (its own or a later stage's) read.
    key_columns: ClassVar[tuple[str, ...]] = ()

    def worker_imports(self, params: dict, runtime: dict) -> tuple[str, ...]:
        """Heavy modules its worker processes import to compute (torch, transformers, spaCy), in import order: a run
        has the workers' forkserver import those of its CPU stages once, in the background as it starts
        (``pipelines.engine.workers.prestart``), so no worker pays the import and they share its pages."""
        return ()

    def worker_skips(self, params: dict) -> tuple[str, ...]:
        """Installed modules its worker processes never import (ImportError there): ones a library imports when
        present though the stage, with these parameters, never uses them, each costing every worker memory and
        start-up."""
        return ()

    def params(self, config: Config) -> Params:
        """Return the resolved, result-shaping parameters: by default the stage's own config section (a plugin's
        ``Params`` model, validated when the config was loaded)."""
        section = getattr(config, self.name, None)
        if not isinstance(section, Params):
            raise NotImplementedError(f"stage {self.name} has no params() and no config section")
        return section

    def runtime(self, config: Config) -> dict:
        """Return settings passed to the library that do not change results (left out of the key)."""
        return {}

    def requirements(self, config: Config) -> list[Requirement]:
        """Return what the stage needs from the machine (models, pipelines, files), checked before any work."""
        return []

    def missing_input(self, pipeline: PipelineView, selected: list[str]) -> str | None:
        """Return one line when the stage's input is neither stored nor made by a stage of ``selected`` (run in
        this order); None when it is there. Data stages list their items from the upstream rows there are."""
        return None

    def items(self, pipeline: PipelineView) -> list[Item]:
        """Return every current ``(item_key, record)`` this stage should have a result for."""
        raise NotImplementedError

    def item_keys(self, pipeline: PipelineView) -> pa.Array:
        """Return the keys of ``items`` without building their records (planning, column-wise): by default the keys
        of ``items``; the built-in stages derive them from stored columns (``done_table``)."""
        return pa.array([key for key, _record in self.items(pipeline)], pa.string())

    def pending_items(self, pipeline: PipelineView, keys: set[str]) -> list[Item]:
        """Return the items of ``keys`` (current item keys without a reusable result) with their records, the same
        as ``items`` gives them: by default picked from ``items``; the built-in stages build only these records."""
        return [(key, record) for key, record in self.items(pipeline) if key in keys]

    def refreshed(self, runtime: dict) -> dict:
        """Return the runtime settings of a forced recompute (``--refresh``): the same by default."""
        return runtime

    def outdated(self, stored: pa.Table, layout: OutputLayout) -> dict[str, str]:
        """Item key -> why, for stored rows (``key_columns`` at least) that no longer hold although their output files
        are intact; none by default."""
        return {}

    def run(self, records: list, *, layout: OutputLayout, stage_key: str, params: dict, runtime: dict) -> list[dict]:
        """Process one chunk through the library; return one row per record (same order)."""
        raise NotImplementedError

    def output_paths(self, row: dict) -> list[str]:
        """Return the files (relative to OUT) that a stored ok row owns."""
        return []

    def failed_row(self, record: Any, error: str) -> dict:
        """Return the row of an item whose processing raised or whose worker died (``error``: one line)."""
        image_id = record.get("image_id") if isinstance(record, dict) else None
        return {"image_id": image_id, "status": STATUS_FAILED, "error": error}

    def on_cpu(self, params: dict, runtime: dict) -> bool:
        """Whether a chunk is CPU work, run in the engine's worker processes (the one layer of data parallelism). GPU
        work stays in the calling process (one device, batched across a chunk); so do whole-dataset stages."""
        return not self.whole

    def label(self, record: Any) -> str:
        """Return a human name for an input record (its file name) for failure lists."""
        if self.whole:
            return self.name
        path = record.get("source_path") if isinstance(record, dict) else getattr(record, "path", None)
        return Path(str(path)).name if path else str(record.get("image_id") if isinstance(record, dict) else record)

    def manifest_values(self, row: dict) -> dict:
        """Return the manifest values (``manifest_fields``) of one stored ok row of an image."""
        return {field.name: row.get(field.name) for field in self.manifest_fields}

    def join_manifest(self, row: dict, result: dict | None, note: str | None) -> str | None:
        """Fill an image's manifest ``row`` from this stage's ``result`` for it (None: not computed); return the
        image's error when it failed here (``"<stage>: ..."``), else None. ``note``: why the caption reader found no
        caption for the image, if it found none. By default an ok result fills ``manifest_fields``."""
        if result is None:
            return f"{self.name}: not computed"
        if result.get("status") != STATUS_OK:
            return f"{self.name}: {one_line_error(result.get('error'))}"
        row.update(self.manifest_values(result))
        return None

    def example_rows(self, pipeline: PipelineView, image_ids: Collection[str]) -> list[dict]:
        """Rows of its gallery, of the images ``image_ids`` (those the run computed, or a sample of them): each image
        with the stage's ``gallery_columns`` images under ``maps``."""
        done = pipeline.done_rows(self.name, image_ids)
        rows = []
        for image in _images_of(pipeline, image_ids):
            row = done.get(image["image_id"])
            if row is not None and row["status"] == STATUS_OK:
                rows.append({**image, "status": STATUS_OK, "segments": None,
                             "maps": {column.removesuffix("_path"): row.get(column) for column in self.gallery_columns}})
        return rows

    def version(self) -> dict[str, str]:
        """``VERSION`` of every project module the stage's run imports: its ``modules`` and, found from their imports
        (function-level ones included), every library module they reach; a plugin's file by its content."""
        versions = {name: module_version(name) for name in imported_modules(self.modules)}
        if self.source is not None:
            versions[f"plugin {Path(self.source).name}"] = file_digest(self.source)
        return versions

    def key(self, params: Params, upstream_keys: list[str]) -> str:
        """Return the stage key: content key of the name, code versions, resolved parameters and upstream keys."""
        return content_key(self.name, self.version(), params.model_dump(mode="json"), upstream_keys)


def _structure_rows(pipeline: PipelineView, image_ids: Collection[str], *, regions: bool,
                    captions: bool) -> list[dict]:
    """Gallery rows after the image stages, of the images ``image_ids``: images with their maps, regions (None before
    they are proposed) and, once scored, the sentences and scores of their regions."""
    structure = pipeline.done_rows("structure", image_ids)
    proposed = pipeline.done_rows("regions", image_ids) if regions else {}
    scored_rows = pipeline.done_rows("captions", image_ids) if captions else {}
    rows = []
    for image in _images_of(pipeline, image_ids):
        maps = structure.get(image["image_id"])
        if maps is None or maps["status"] != STATUS_OK:
            continue
        scored = scored_rows.get(image["image_id"])
        # After captions: the regions that received a sentence (scored); before: every proposed region.
        segments = (scored or {}).get("segments") if scored is not None else (
            proposed.get(image["image_id"]) or {}).get("segments")
        scored = scored or {}
        rows.append({**image, **{k: maps.get(k) for k in ("structure_path", "scribble_path")}, "status": STATUS_OK,
                     "caption": scored.get("caption"), "segments": list(segments or []) if regions else None})
    return rows


class KeyedStage(Stage):
    """A stage defined by its item keys (``item_keys``, from stored columns) and the records of any of them
    (``pending_items``); its ``items`` are all of them: one definition for the column-wise plan and the row-wise
    reader."""

    def items(self, pipeline: PipelineView) -> list[Item]:
        return self.pending_items(pipeline, set(self.item_keys(pipeline).to_pylist()))


def _images_of(pipeline: PipelineView, ids: Collection[str]) -> list[dict]:
    """``{image_id, source_path}`` of the images ``ids`` (as ``pipeline.images`` lists them), without the others."""
    table = pipeline.image_table
    return table.filter(pc.is_in(table.column("image_id"), value_set=pa.array(sorted(ids), pa.string()))).to_pylist()


GALLERY_CANDIDATES = 1000  # images a gallery chooses its examples from (it shows 5)


def even_picks(count: int, limit: int) -> list[int]:
    """Indices of ``limit`` of ``count`` items, evenly spread (all of them when ``count <= limit``)."""
    if limit <= 0 or count <= limit:
        return list(range(count)) if limit > 0 else []
    return [int(i * count / limit) for i in range(limit)]


def gallery_images(pipeline: PipelineView, pending: list[Item], limit: int = GALLERY_CANDIDATES) -> list[str]:
    """The images a stage's gallery picks its examples from: those its run computed (the ``image_id`` of each
    ``pending`` record; a stage whose items name no image, like the manifest's one item, computed them all), at most
    ``limit`` of them evenly spread by image id. A run that adds 20 images to a million shows those 20, and reads the
    rows of no others."""
    ids = sorted({record["image_id"] for _key, record in pending
                  if isinstance(record, dict) and record.get("image_id")})
    if not ids and pending:
        column = pipeline.image_table.column("image_id")
        order = pc.sort_indices(column)
        return column.take(order.take(pa.array(even_picks(len(order), limit), pa.int64()))).to_pylist()
    return [ids[i] for i in even_picks(len(ids), limit)]


def ok_image_ids(done: pa.Table) -> pa.Array:
    """Image ids of the ok rows of a stage's ``done_table``, column-wise (no Python string per image)."""
    return done.filter(pc.equal(done.column("status"), STATUS_OK)).column("image_id").combine_chunks()


def row_schema(*fields: pa.Field) -> pa.Schema:
    """Return the Parquet schema of a stage's stored rows: the item key, image id, status, error and output files
    every row has, then ``fields``."""
    return pa.schema([*_STATUS, *fields])


# ---- data stages ---------------------------------------------------------------------------------------------------
class IngestParams(Params):
    extensions: list[str]
    max_pixels: int
    max_aspect_ratio: float | None
    max_file_bytes: int
    follow_symlinks: bool


class Ingest(KeyedStage):
    name = "ingest"
    description = "Hash, open and measure every new or changed image file in the folder."
    task_name, task_doc = "ingest_images", "Hash, open and measure one chunk of source files."
    modules = ("pipelines.steps.ingest", "pipelines.steps.images")
    rows_by_image = False  # one row per file: identical files share an image id
    schema = pa.schema([*_STATUS, pa.field("source_path", pa.string()), pa.field("width", pa.int32()),
                        pa.field("height", pa.int32()), pa.field("note", pa.string())])

    def params(self, config):
        i = config.ingest
        return IngestParams(extensions=sorted(e.lower().lstrip(".") for e in i.extensions), max_pixels=i.max_pixels,
                            max_aspect_ratio=i.max_aspect_ratio, max_file_bytes=i.max_file_bytes,
                            follow_symlinks=i.follow_symlinks)

    key_columns = ("source_path",)

    def item_keys(self, pipeline):
        return pipeline.file_keys

    def pending_items(self, pipeline, keys):
        # Found among the scan's keys column-wise: a run adding 20 files to a million makes 20 SourceImages.
        file_keys = pipeline.file_keys
        wanted = pc.is_in(file_keys, value_set=pa.array(sorted(keys), pa.string()))
        positions = pc.indices_nonzero(wanted).to_pylist()
        return [(f.file_key, f) for f in pipeline.scan.files_at(positions)]

    def run(self, records, *, layout, stage_key, params, runtime):
        from pipelines.steps.ingest import ingest_images

        return ingest_images(records, max_pixels=params["max_pixels"], max_aspect_ratio=params["max_aspect_ratio"],
                             max_file_bytes=params["max_file_bytes"])

    def failed_row(self, record, error):
        return {**super().failed_row(record, error), "source_path": record.source_path}


class StructureParams(Params):
    backend: str
    long_side: int
    canny_low: float
    canny_high: float
    extra_maps: list[str]
    scribble_sigma: float
    scribble_threshold: float
    scribble_final_sigma: float


MAP_COLUMNS = ("structure_path", "scribble_path", "log_path", "sobel_path")


class Structure(KeyedStage):
    name = "structure"
    description = "Write Canny/scribble (and optional LoG/Sobel) structure maps of every ingested image."
    task_name, task_doc = "extract_structure", "Write the structure maps of one chunk of images."
    gallery = "structure"
    summary_params = ("backend",)
    modules = ("pipelines.steps.structure", "pipelines.steps.images")
    upstream = ("ingest",)
    schema = pa.schema([*_STATUS, *(pa.field(c, pa.string()) for c in MAP_COLUMNS)])

    def params(self, config):
        s = config.structure
        return StructureParams(
            backend=resolve_structure_backend(s.backend), long_side=s.long_side, canny_low=s.canny_low,
            canny_high=s.canny_high, extra_maps=sorted(s.extra_maps), scribble_sigma=s.scribble.sigma,
            scribble_threshold=s.scribble.threshold, scribble_final_sigma=s.scribble.final_sigma)

    def runtime(self, config):
        s = config.structure
        return {"max_pixels": config.ingest.max_pixels, "batch_size": s.batch_size}

    def on_cpu(self, params, runtime):
        return params["backend"] == "opencv"

    def item_keys(self, pipeline):
        return pipeline.image_table.column("image_id").combine_chunks()

    def pending_items(self, pipeline, keys):
        return [(image["image_id"], image) for image in _images_of(pipeline, keys)]

    def run(self, records, *, layout, stage_key, params, runtime):
        from pipelines.steps.structure import extract_structure

        return extract_structure(records, layout=layout, stage_key=stage_key, **params, **runtime)

    def join_manifest(self, row, result, note):
        row.update({column: (result or {}).get(column) for column in ("structure_path", "scribble_path")})
        return super().join_manifest(row, result, note)

    def output_paths(self, row):
        return [row[c] for c in MAP_COLUMNS if row.get(c)]

    def example_rows(self, pipeline, image_ids):
        return _structure_rows(pipeline, image_ids, regions=False, captions=False)


class RegionsParams(Params):
    method: str
    sam_model: str | None
    sam_identity: dict | None
    sam_model_type: str
    sam_checkpoint: str | None
    points_per_side: int
    min_area_fraction: float
    max_area_fraction: float
    max_regions: int
    nms_iou: float
    max_side: int


class Regions(KeyedStage):
    name = "regions"
    description = "Propose local regions (SAM or structure-based) and write their RGB and structure crops."
    task_name, task_doc = "propose_regions", "Propose regions and write crops for one chunk of images."
    gallery = "regions"
    summary_params = ("method",)
    modules = ("pipelines.steps.regions", "pipelines.steps.grouping", "pipelines.steps.images")
    upstream = ("structure",)
    schema = pa.schema([*_STATUS, pa.field("segments", pa.list_(SEGMENT_TYPE)), pa.field("region_method", pa.string())])

    def params(self, config):
        r = config.regions
        from pipelines.steps.region_method import resolve_region_method

        return RegionsParams(
            method=resolve_region_method(r.method, r.sam_model, r.sam_checkpoint), sam_model=r.sam_model,
            sam_identity=model_identity(r.sam_model) if r.sam_model else None, sam_model_type=r.sam_model_type,
            sam_checkpoint=r.sam_checkpoint, points_per_side=r.points_per_side,
            min_area_fraction=r.min_area_fraction, max_area_fraction=r.max_area_fraction, max_regions=r.max_regions,
            nms_iou=r.nms_iou, max_side=r.max_side)

    def runtime(self, config):
        r = config.regions
        return {"points_per_batch": r.points_per_batch, "device": r.device, "max_pixels": config.ingest.max_pixels}

    def requirements(self, config):
        params = self.params(config)
        if params.method != "sam":
            return []
        # A checkpoint file is checked when the config is loaded (configs.schema).
        return [Requirement("model", "regions.sam_model", params.sam_model)] if params.sam_model else []

    def on_cpu(self, params, runtime):
        # SAM stays in one process on CPU too: its intra-op threads use the cores, one copy of the model per worker
        # would not fit a many-core machine's memory (ViT-H: 2.5 GB each).
        return params["method"] != "sam"

    def item_keys(self, pipeline):
        return ok_image_ids(pipeline.done_table("structure"))

    def pending_items(self, pipeline, keys):
        structure = pipeline.rows_of("structure", keys)
        return [(i["image_id"], {**i, "structure_path": structure[i["image_id"]]["structure_path"]})
                for i in _images_of(pipeline, keys) if structure.get(i["image_id"], {}).get("status") == STATUS_OK]

    def run(self, records, *, layout, stage_key, params, runtime):
        from pipelines.steps.regions import propose_regions

        return propose_regions(records, layout=layout, stage_key=stage_key, **library_arguments(params), **runtime)

    def join_manifest(self, row, result, note):
        row["segments"] = list((result or {}).get("segments") or [])
        return super().join_manifest(row, result, note)

    def output_paths(self, row):
        paths = []
        for segment in row.get("segments") or []:
            paths += [p for p in (segment.get("crop_path"), segment.get("structure_crop_path")) if p]
        return paths

    def example_rows(self, pipeline, image_ids):
        return _structure_rows(pipeline, image_ids, regions=True, captions=False)


class CaptionsParams(Params):
    clip_model: str
    clip_identity: dict
    spacy_model: str
    include_full_image: bool
    captioner: str | None
    caption_regions: bool
    max_new_tokens: int


class Captions(KeyedStage):
    name = "captions"
    description = "Split captions into sentences and assign each to its best region with CLIP scores."
    task_name, task_doc = "score_local_captions", "Assign caption sentences to regions (CLIP scores)."
    gallery = "regions"  # the regions gallery again, now with each region's sentence and score
    modules = ("pipelines.steps.captions",)
    upstream = ("regions",)
    key_columns = ("caption",)  # the filter's items: the ok rows with a caption
    schema = pa.schema([*_STATUS, pa.field("caption", pa.string()), pa.field("caption_source", pa.string()),
                        pa.field("segments", pa.list_(SEGMENT_TYPE))])

    def params(self, config):
        c = config.captions
        return CaptionsParams(
            clip_model=config.scoring_model, clip_identity=model_identity(config.scoring_model),
            spacy_model=config.filter.spacy_model, include_full_image=c.include_full_image, captioner=c.captioner,
            caption_regions=c.caption_regions, max_new_tokens=c.max_new_tokens)

    def runtime(self, config):
        # Worker processes sharing this machine's cores (a local Dask cluster starts dask_workers of them, the local
        # runner the engine's workers); on a GPU the chunks run in one process and take turns on the scorer.
        runtime = config.runtime
        device = config.captions.device
        if runtime.runner == "dask":
            local_processes = 1 if runtime.dask_address else runtime.dask_workers
        else:
            # At most one per core (the workers set their own OMP_NUM_THREADS; this sizes threads in-process).
            local_processes = 1 if _on_gpu(device) else (runtime.workers or usable_cpus())
        return {"device": device, "batch_size": config.captions.batch_size, "processes_per_machine": local_processes,
                "max_pixels": config.ingest.max_pixels}

    def requirements(self, config):
        key = "captions.clip_model" if config.captions.clip_model else "model.clip_model"
        return [Requirement("spacy", "filter.spacy_model", config.filter.spacy_model),  # splits the sentences
                Requirement("model", key, config.scoring_model)]

    def on_cpu(self, params, runtime):
        return not _on_gpu(runtime["device"])

    def worker_imports(self, params, runtime):
        # The scorer's torch and transformers' CLIP (3-4 s of imports), the sentence splitter's spaCy.
        return ("torch", "transformers.models.clip.modeling_clip", "spacy")

    def item_keys(self, pipeline):
        return pipeline.text_keys_of(ok_image_ids(pipeline.done_table("regions")))

    def pending_items(self, pipeline, keys):
        ids = {image_id for image_id, key in pipeline.text_keys.items() if key in keys}
        regions = pipeline.rows_of("regions", ids)  # regions rows are keyed by image id
        items = []
        for image in _images_of(pipeline, ids):
            region = regions.get(image["image_id"])
            if region is None or region["status"] != STATUS_OK:
                continue
            captions, caption_source, _note = pipeline.captions_of_image(image["image_id"])
            items.append((pipeline.text_keys[image["image_id"]], {
                **image, "caption": captions[0] if captions else None, "caption_source": caption_source,
                "segments": region["segments"]}))
        return items

    def run(self, records, *, layout, stage_key, params, runtime):
        from pipelines.steps import captions as library
        scorer_args = {"model_name_or_dir": params["clip_model"], "device": runtime["device"],
                       "batch_size": runtime["batch_size"]}

        # Threads sized once per process, when its scorer is built (later the load average counts our own work), and
        # applied only around the scorer's calls: torch's setting is process-wide.
        scorer, scorer_lock = shared(("clip", _freeze(scorer_args)), lambda: (
            library.ClipScorer(**scorer_args), library.torch_threads_for(runtime.get("processes_per_machine", 1))))
        scorer, threads = scorer
        # Sentence-only splitters (the full parser only for texts they disagree on): the filter stage parses.
        nlp, nlp_lock = shared(("sentences", params["spacy_model"]),
                               lambda: library.SentenceSplitter(params["spacy_model"]))
        captioner, captioner_lock = None, threading.Lock()
        if params["captioner"]:
            captioner_args = {"model_id": params["captioner"], "device": runtime["device"],
                              "max_new_tokens": params["max_new_tokens"]}
            captioner, captioner_lock = shared(("captioner", _freeze(captioner_args)),
                                               lambda: library.Captioner(**captioner_args))
        with scorer_lock, nlp_lock, captioner_lock, library.torch_threads(threads):  # locks always in this order
            return library.score_local_captions(
                records, layout=layout, scorer=scorer, nlp=nlp, captioner=captioner,
                include_full_image=params["include_full_image"], caption_regions=params["caption_regions"],
                max_pixels=runtime["max_pixels"])

    def join_manifest(self, row, result, note):
        if result is None:
            return (f"{self.name}: not computed" if row["caption"]
                    else f"no caption: {one_line_error(note or 'no caption found for this image')}")
        row["caption"] = result.get("caption") or row["caption"]
        row["caption_source"] = result.get("caption_source") or row["caption_source"]
        row["segments"] = list(result.get("segments") or [])
        problem = super().join_manifest(row, result, note)
        if problem is None and not result.get("caption"):
            return f"no caption: {one_line_error(result.get('error') or note or 'no caption found or generated')}"
        return problem

    def example_rows(self, pipeline, image_ids):
        return _structure_rows(pipeline, image_ids, regions=True, captions=True)


class FilterParams(Params):
    spacy_model: str
    vocab: dict[str, str]
    vocab_dir: str
    remove_colors: bool
    remove_materials: bool
    remove_textures: bool
    remove_domain: bool
    min_content_words: int
    max_hard_negatives: int


class Filter(KeyedStage):
    name = "filter"
    description = "Remove appearance words (colours, materials, textures) from captions; build hard negatives."
    task_name, task_doc = "filter_captions", "Remove appearance words and build hard negatives."
    modules = ("pipelines.steps.filtering", "pipelines.steps.hard_negatives")
    upstream = ("captions",)
    schema = pa.schema([*_STATUS, pa.field("filtered_caption", pa.string()),
                        pa.field("segments", pa.list_(SEGMENT_TYPE)), pa.field("hard_negatives", pa.list_(pa.string())),
                        pa.field("extra_captions", pa.list_(EXTRA_CAPTION_TYPE))])

    def worker_imports(self, params, runtime):
        return ("spacy",)

    def worker_skips(self, params):
        # spaCy's thinc imports torch whenever it is installed; no component of a pipeline without a transformer uses
        # it: ~240 MB and ~2 s per worker. A transformer pipeline (en_core_web_trf) keeps it.
        from pipelines.steps.filtering import spacy_needs_torch

        return () if spacy_needs_torch(params["spacy_model"]) else ("torch",)

    def params(self, config):
        f = config.filter
        return FilterParams(
            spacy_model=f.spacy_model, vocab=_vocab_digest(f.vocab_dir), vocab_dir=str(Path(f.vocab_dir).name),
            remove_colors=f.remove_colors, remove_materials=f.remove_materials, remove_textures=f.remove_textures,
            remove_domain=f.remove_domain, min_content_words=f.min_content_words,
            max_hard_negatives=f.max_hard_negatives)

    def runtime(self, config):
        return {"vocab_path": config.filter.vocab_dir, "batch_size": config.filter.batch_size}

    def requirements(self, config):
        return [Requirement("spacy", "filter.spacy_model", config.filter.spacy_model)]

    def pending_items(self, pipeline, keys):
        rows = pipeline.rows_of("captions", keys)  # the filter's items have the captions stage's keys
        items = []
        for key, row in rows.items():
            if row["status"] == STATUS_OK and row.get("caption"):
                image_id = row["image_id"]
                record = {"image_id": image_id, "source_path": pipeline.source_paths.get(image_id),
                          "caption": row["caption"], "segments": row["segments"]}
                extra = pipeline.captions_of_image(image_id)[0][1:]
                if extra:
                    record["extra_captions"] = extra
                items.append((key, record))
        return items

    def item_keys(self, pipeline):
        done = pipeline.done_table("captions")
        captioned = done.filter(pc.and_(pc.equal(done.column("status"), STATUS_OK),
                                        pc.greater(pc.utf8_length(done.column("caption")), 0)))
        return pipeline.text_keys_of(captioned.column("image_id").combine_chunks())

    def run(self, records, *, layout, stage_key, params, runtime):
        from pipelines.steps.filtering import CaptionFilter
        from pipelines.steps.hard_negatives import filter_captions

        filter_args = {"spacy_model": params["spacy_model"], "vocab_dir": runtime["vocab_path"],
                       "batch_size": runtime["batch_size"], "min_content_words": params["min_content_words"],
                       **{k: params[k] for k in ("remove_colors", "remove_materials", "remove_textures",
                                                 "remove_domain")}}
        caption_filter, lock = shared(("caption_filter", _freeze(filter_args)), lambda: CaptionFilter(**filter_args))
        with lock:
            return filter_captions(records, caption_filter=caption_filter,
                                   max_hard_negatives=params["max_hard_negatives"])

    def join_manifest(self, row, result, note):
        if result is not None:
            row["filtered_caption"] = result.get("filtered_caption")
            row["segments"] = list(result.get("segments") or row["segments"])
            row["hard_negatives"] = list(result.get("hard_negatives") or [])
            if result.get("extra_captions"):
                row["extra_captions"] = [dict(extra) for extra in result["extra_captions"]]
        return super().join_manifest(row, result, note)


# ---- whole-dataset stages ------------------------------------------------------------------------------------------
_RESULT = [*_STATUS, pa.field("result", pa.string())]


class ManifestParams(Params):
    split_ratios: dict[str, float]


class Manifest(Stage):
    name = "manifest"
    description = "Join every stage's results into the manifest (one row per image), swapped in atomically."
    task_name, task_doc = "write_manifest", "Join every stage's rows into the manifest."
    gallery, report = "manifest", "quality"
    counts_rows = True
    modules = ("pipelines.steps.manifest",)
    upstream = ("filter",)
    schema = pa.schema(_RESULT)
    whole = True
    rows_by_image = False

    def params(self, config):
        return ManifestParams(split_ratios=dict(config.manifest.split_ratios))

    def refreshed(self, runtime):
        return {**runtime, "rewrite": True}  # --refresh manifest rewrites every part (swapped in atomically)

    key_columns = ("result",)

    def items(self, pipeline):
        record = pipeline.manifest_update()
        fields = [field for stage in pipeline.stages.values() for field in stage.manifest_fields]
        if fields:  # plugin stages' columns, after the built-in ones
            record["fields"] = fields
        return [(self.item_key(pipeline), record)]

    def item_keys(self, pipeline):
        return pa.array([self.item_key(pipeline)], pa.string())

    def item_key(self, pipeline: PipelineView) -> str:
        """The manifest's one item, named by what its rows are built from, column-wise (no rows built): the
        current results of every stage it joins (item key, status, error: a row's other values follow from its item
        key under the stage key, which the manifest's stage key covers) and every file's captions. The rules joining
        them are ``pipelines.steps.manifest`` and the stages' ``join_manifest``: a change to either bumps that
        module's ``VERSION``."""
        joined = sorted(upstream_closure(pipeline.stages, "manifest") | {"ingest"})
        results = {}
        for name in joined:
            done = pipeline.done_table(name).select([ITEM_KEY, "status", "error"])
            order = distinct_key_order(done.column(ITEM_KEY))
            results[name] = table_digest(done.sort_by(ITEM_KEY) if order is None else done.take(order))
        return content_key("manifest", results, pipeline.captions_digest(), length=32)

    def run(self, records, *, layout, stage_key, params, runtime):
        from pipelines.steps.manifest import manifest_digest, write_manifest
        from storage.manifest import manifest_batches, manifest_schema
        from storage.parquet import parquet_parts, write_derived

        (record,) = records
        layout.manifest_index.unlink(missing_ok=True)  # what it says of the manifest stops being true below
        result = write_manifest(layout, record["rows"], rewrite=runtime.get("rewrite", False),
                                schema=manifest_schema(record.get("fields", ())), replace=record.get("replace"))
        write_derived(layout.manifest_index, manifest_digest(layout.manifest_dir), record["signatures"])
        rows = ok = duplicates = 0
        for batch in manifest_batches(layout.manifest_dir, ["status", "duplicate_paths"]):
            rows += batch.num_rows
            ok += pc.sum(pc.equal(batch.column("status"), STATUS_OK)).as_py() or 0
            duplicates += pc.sum(pc.list_value_length(batch.column("duplicate_paths"))).as_py() or 0
        summary = {"rows": rows, "ok": ok, "written_rows": result.written_rows, "kept_rows": result.kept_rows,
                   "duplicates": duplicates, "parts": [layout.relative(p) for p in parquet_parts(layout.manifest_dir)]}
        return [{"image_id": None, "status": STATUS_OK, "error": None, "result": json.dumps(summary)}]

    def output_paths(self, row):
        return json.loads(row.get("result") or "{}").get("parts", [])

    def outdated(self, stored, layout):
        """A result whose manifest is not the one on disk: its parts are intact, but another run added parts beside
        them (a run adding an image keeps the parts it did not change; going back to the earlier folder must not
        keep that image's row)."""
        from storage.parquet import parquet_parts

        on_disk = sorted(layout.relative(p) for p in parquet_parts(layout.manifest_dir))
        return {key: "the manifest folder holds other parts than this result wrote"
                for key, result in zip(stored.column(ITEM_KEY).to_pylist(), stored.column("result").to_pylist())
                if sorted(self.output_paths({"result": result})) != on_disk}

    def example_rows(self, pipeline, image_ids):
        from storage.manifest import manifest_rows_with_ids

        return manifest_rows_with_ids(pipeline.layout.manifest_dir, image_ids) if pipeline.layout.manifest_dir.is_dir() else []


def ablation_arguments(config: Config) -> tuple[Any, dict, dict]:
    """Return ``(objective, train_options, eval_options)`` for ``structxlip.app.ablate``: the train and evaluate stages'
    own arguments, less what the ablation sets per run (model, seed, folders)."""
    from structxlip.app.train import train_arguments

    train_stage, evaluate_stage = STAGE_DEFINITIONS["train"], STAGE_DEFINITIONS["evaluate"]
    train_options = train_arguments(config.model.clip_model, train_stage.params(config).train,
                                    train_stage.runtime(config))
    objective = train_options.pop("objective")
    for set_per_run in ("clip_model", "seed"):
        train_options.pop(set_per_run)
    train_options["config"] = config.model_dump(mode="json")
    evaluated = evaluate_stage.params(config).model_dump()
    eval_options = {**{k: evaluated[k] for k in ("max_text_tokens", "keep_positions", "structure_kind")},
                    **evaluate_stage.runtime(config)}
    return objective, train_options, eval_options


def _missing_manifest(stage: str, manifest: str, pipeline: PipelineView, selected: list[str]) -> str | None:
    """One line when ``stage`` (train, evaluate) would read the manifest (written by stage ``manifest``) and it is
    neither stored nor made by a selected stage; None otherwise."""
    if manifest in selected or pipeline.manifest_digest() is not None:
        return None
    data_stages = ",".join(name for name, definition in pipeline.stages.items() if definition.data_stage)
    return (f"stage {stage} needs a manifest and {pipeline.layout.manifest_dir} has none: run the data stages first "
            f"(all stages, or --stages {data_stages})")


class TrainParams(Params):
    clip_model: str
    clip_identity: dict
    train: dict


TRAIN_RUNTIME = ("device", "num_workers", "precision", "checkpoint_every_steps")


class Train(Stage):
    name = "train"
    description = "Fine-tune CLIP with the StructXLIP losses on the manifest's train split (cached by data + params)."
    task_name, task_doc = "train_model", "Fine-tune CLIP on the manifest's train split (resumes a checkpoint)."
    data_stage, report = False, "training"
    modules = ("structxlip.app.train", "structxlip.losses", "structxlip.data", "structxlip.models", "structxlip.text")
    upstream = ("manifest",)
    schema = pa.schema(_RESULT)
    whole = True
    rows_by_image = False

    def params(self, config):
        t = config.train
        # nproc shapes the result (batch_size is per process) but is left out at 1: single-process keys stay as they were.
        excluded = set(TRAIN_RUNTIME) | ({"nproc"} if t.nproc == 1 else set())
        return TrainParams(clip_model=config.model.clip_model, clip_identity=model_identity(config.model.clip_model),
                           train=t.model_dump(mode="json", exclude=excluded))

    def runtime(self, config):
        return {name: getattr(config.train, name) for name in TRAIN_RUNTIME}

    def refreshed(self, runtime):
        return {**runtime, "fresh": True}  # --refresh train: start afresh, never resume a checkpoint

    def requirements(self, config):
        return [Requirement("model", "model.clip_model", config.model.clip_model)]

    def missing_input(self, pipeline, selected):
        return _missing_manifest(self.name, self.upstream[0], pipeline, selected)

    def items(self, pipeline):
        digest = pipeline.manifest_digest()
        if digest is None:
            return []
        key = content_key("train", digest, length=32)
        # The trainer resumes a checkpoint only when it was written for this stage key and item: same data, params.
        return [(key, {"manifest": digest, "run_key": content_key(pipeline.keys["train"], key)})]

    def run(self, records, *, layout, stage_key, params, runtime):
        from structxlip.app.train import train, train_arguments

        (record,) = records
        runtime = dict(runtime)
        resume = False if runtime.pop("fresh", False) else "auto"
        nproc = int(params["train"].get("nproc", 1))
        if nproc > 1:  # torchrun: N DDP processes, the same outputs layout and exact resume
            from pipelines.engine.distributed_train import train_distributed

            result = train_distributed(nproc, layout.manifest_dir, layout.root, clip_model=params["clip_model"],
                                       train=params["train"], runtime=runtime, resume=resume,
                                       run_key=record["run_key"])
        else:
            arguments = train_arguments(params["clip_model"], params["train"], runtime)
            # A killed run resumes from its last checkpoint (exactly); a checkpoint of other data or parameters is not.
            result = train(layout.manifest_dir, layout.root, **arguments, resume=resume, run_key=record["run_key"],
                           progress=False)
        model_dir = Path(result.model_dir) if result.model_dir is not None else None
        files = sorted(layout.relative(p) for p in model_dir.rglob("*") if p.is_file()) if model_dir else []
        summary = {"steps": result.steps, "skipped_steps": result.skipped_steps,
                   "epochs_completed": result.epochs_completed, "seconds_per_step": result.seconds_per_step,
                   "processes": nproc, "model_dir": layout.relative(model_dir) if model_dir else None,
                   "model_files": files}
        return [{"image_id": None, "status": STATUS_OK, "error": None, "result": json.dumps(summary, default=str)}]

    def output_paths(self, row):
        return json.loads(row.get("result") or "{}").get("model_files", [])


class EvaluateParams(Params):
    base_model: str
    split: str
    zero_shot: bool
    max_text_tokens: int
    keep_positions: int
    structure_kind: str


class Evaluate(Stage):
    name = "evaluate"
    description = "Retrieval Recall@K (image/text/structure directions) of the fine-tuned model."
    task_name, task_doc = "evaluate_model", "Retrieval metrics of the fine-tuned model."
    data_stage, report = False, "evaluation"
    modules = ("structxlip.app.evaluate", "structxlip.metrics", "structxlip.retrieval_ranks", "structxlip.data",
               "structxlip.models")
    upstream = ("train",)
    schema = pa.schema(_RESULT)
    whole = True
    rows_by_image = False

    def params(self, config):
        t = config.train
        return EvaluateParams(base_model=config.model.clip_model, split=config.evaluate.split,
                              zero_shot=config.evaluate.zero_shot,
                              max_text_tokens=t.max_text_tokens, keep_positions=t.keep_positions,
                              structure_kind=t.structure_kind)

    def runtime(self, config):
        return {"batch_size": config.evaluate.batch_size, "device": config.evaluate.device,
                "precision": config.train.precision, "num_workers": config.train.num_workers}

    def requirements(self, config):
        return [Requirement("model", "model.clip_model", config.model.clip_model)]

    def missing_input(self, pipeline, selected):
        (train,) = self.upstream
        if train in selected:
            return None  # the train stage runs first and checks the manifest
        problem = _missing_manifest(self.name, pipeline.stages[train].upstream[0], pipeline, selected)
        if problem is None and not pipeline.done_rows(train):
            problem = (f"stage {self.name} needs the fine-tuned model of this manifest and config, and none is "
                       f"stored: run the {train} stage first")
        return problem

    def items(self, pipeline):
        model = pipeline.done_rows("train")
        digest = pipeline.manifest_digest()
        if digest is None or not model:
            return []
        (train_key,) = model
        return [(content_key("evaluate", digest, train_key, length=32), {"manifest": digest, "model": train_key})]

    def run(self, records, *, layout, stage_key, params, runtime):
        from structxlip.app.evaluate import evaluate

        # Metrics and the per-query rankings of the static explorer's retrieval view (zero-shot beside fine-tuned),
        # from one encoding of the split per model.
        metrics = evaluate(layout.manifest_dir, checkpoint=str(layout.model_dir), out_path=layout.eval_metrics,
                           rankings_path=layout.eval_rankings, embeddings_path=layout.eval_embeddings,
                           **params, **runtime)
        result = {"files": [layout.relative(layout.eval_metrics), layout.relative(layout.eval_rankings),
                            layout.relative(layout.eval_embeddings)],
                  "summary": {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}}
        return [{"image_id": None, "status": STATUS_OK, "error": None, "result": json.dumps(result, default=str)}]

    def output_paths(self, row):
        return json.loads(row.get("result") or "{}").get("files", [])


# The built-in stages in pipeline order; a config's plugins are placed among them by ``registry``.
STAGE_DEFINITIONS: dict[str, Stage] = {s.name: s for s in (Ingest(), Structure(), Regions(), Captions(), Filter(),
                                                           Manifest(), Train(), Evaluate())}
STAGE_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")  # what a stage may be called (plugins are checked)


def upstream_closure(stages: dict[str, Stage], name: str) -> set[str]:
    """The stages ``name`` depends on: its ``upstream`` and theirs, recursively (``name`` left out)."""
    found: set[str] = set()
    pending = list(stages[name].upstream)
    while pending:
        upstream = pending.pop()
        if upstream not in found:
            found.add(upstream)
            pending += stages[upstream].upstream
    return found


def registry(config: Config) -> dict[str, Stage]:
    """Return every stage of ``config`` in pipeline order: the built-in ones and its plugins' (``config.plugins``),
    each plugin right after the last of its upstream stages. The manifest reads every stage that contributes
    manifest columns (they enter its key only where there are such stages)."""
    if not config.plugins:
        return STAGE_DEFINITIONS
    ordered = list(STAGE_DEFINITIONS.values())
    contributing = []
    for path in config.plugins:
        for stage in plugin_stages(path):
            names = [s.name for s in ordered]
            unknown = [u for u in stage.upstream if u not in names]
            if stage.name in names or unknown or not stage.upstream:
                why = (f"stage {stage.name!r} already exists" if stage.name in names else
                       f"its upstream {unknown[0]!r} is no stage" if unknown else "it declares no upstream stage")
                raise ValueError(f"plugins: {path}: {why} (stages: {', '.join(names)})")
            position = max(names.index(u) for u in stage.upstream) + 1
            if stage.manifest_fields and position > names.index("manifest"):
                raise ValueError(f"plugins: {path}: stage {stage.name!r} contributes manifest columns, so it must come "
                                 "before the manifest (an upstream among the data stages)")
            ordered.insert(position, stage)
            contributing += [stage.name] if stage.manifest_fields else []
    stages = {stage.name: stage for stage in ordered}
    if contributing:
        manifest = copy.copy(stages["manifest"])
        manifest.upstream = (*manifest.upstream, *contributing)
        stages["manifest"] = manifest
    return stages


def plugin_stages(path: str) -> list[Stage]:
    """Return the stages plugin file ``path`` defines, checked; raise ValueError (one line) for a bad one."""
    from configs.plugins import import_plugin, stage_classes

    found = []
    for cls in stage_classes(import_plugin(path)):
        def bad(why: str) -> ValueError:
            return ValueError(f"plugins: {path}: stage {cls.name!r} {why}")

        if not issubclass(cls, Stage):
            raise bad("is not a subclass of pipelines.engine.stages.Stage")
        if not STAGE_NAME.fullmatch(cls.name):
            raise bad("needs a name of lower-case letters, digits and _ (at most 40), starting with a letter")
        missing = [m for m in ("items", "run") if getattr(cls, m) is getattr(Stage, m)]
        if missing:
            raise bad(f"does not implement {missing[0]}()")
        schema = getattr(cls, "schema", None)
        if not isinstance(schema, pa.Schema) or any(f.name not in schema.names for f in _STATUS):
            raise bad("needs a schema built with pipelines.engine.stages.row_schema(...)")
        from storage.manifest import MANIFEST_COLUMNS

        clash = [f.name for f in cls.manifest_fields if f.name in MANIFEST_COLUMNS]
        if clash:
            raise bad(f"contributes manifest column {clash[0]!r}, which the manifest already has")
        stage = cls()
        stage.source = path
        if not getattr(stage, "task_name", None):
            stage.task_name = f"compute_{stage.name}"
        if not getattr(stage, "task_doc", None):
            stage.task_doc = stage.description
        if stage.gallery_columns and not stage.gallery:
            stage.gallery = stage.name
        found.append(stage)
    return found


def find_stage(name: str, source: str | None = None) -> Stage:
    """Return stage ``name``: built in, or defined by plugin file ``source`` (imported here when it is not yet: an
    engine worker process)."""
    if source is None:
        return STAGE_DEFINITIONS[name]
    for stage in plugin_stages(source):
        if stage.name == name:
            return stage
    raise KeyError(f"plugin {source} defines no stage {name!r}")


def data_stage_names(config: Config | None = None) -> list[str]:
    """Return the data stages (ingest ... manifest, plugins included) of ``config`` in pipeline order."""
    stages = registry(config) if config is not None else STAGE_DEFINITIONS
    return [name for name, stage in stages.items() if stage.data_stage]


def stage_keys(config: Config, stages: dict[str, Stage] | None = None) -> dict[str, str]:
    """Return the chained cache key of every stage (``stages``: ``registry(config)`` when None), in pipeline order."""
    keys: dict[str, str] = {}
    for name, stage in (registry(config) if stages is None else stages).items():
        keys[name] = stage.key(stage.params(config), [keys[u] for u in stage.upstream])
    return keys


def parse_stages(text: str | list[str] | None, names: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """Return the requested stages in pipeline order (``names``: every stage of the run, the built-in ones when
    None) from ``"a,b"`` or a list; raise ValueError naming an unknown one."""
    names = list(STAGE_DEFINITIONS) if names is None else list(names)
    if text is None:
        return names
    requested = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n and n.strip()]
    unknown = [n for n in requested if n not in names]
    if unknown or not requested:
        raise ValueError(f"expected stages from {', '.join(names)}, got {', '.join(unknown) or 'none'}")
    return [s for s in names if s in requested]
