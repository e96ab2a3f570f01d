"""The engine's worker processes: chunks sized from the pending count, each worker on its share of the cores, the same
results as in one process, and a worker that dies fails only the item it was processing."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from configs import load_config
from pipelines.engine import workers
from pipelines.engine.execute import run_inline
from pipelines.engine.plan import MAX_CHUNK, MIN_CHUNK, Pipeline, auto_chunk_size
from pipelines.engine.stages import ITEMS_PER_WORKER, find_stage, local_workers, usable_cpus
from tests.corpus import make_generated_images

DATA = ["ingest", "structure", "regions", "captions", "filter", "manifest"]
CONFIG = {"model.clip_model": "structxlip/tiny-clip", "regions.method": "grouping", "regions.max_regions": 3,
          "captions.device": "cpu"}


@pytest.fixture
def fresh_pool():
    """Workers take the environment of the moment their pool is created: start and end each test with none."""
    workers.shutdown()
    yield
    workers.shutdown()


def test_auto_chunk_size_gives_about_four_chunks_per_worker_within_bounds():
    assert (MIN_CHUNK, MAX_CHUNK) == (8, 256)
    assert auto_chunk_size(0, 2) == 8
    assert auto_chunk_size(14, 2) == 8  # 2 chunks: both workers busy on the demo's 14 photos
    assert auto_chunk_size(2000, 2) == 250  # ceil(2000 / 8): 8 chunks
    assert auto_chunk_size(2001, 2) == 251
    assert auto_chunk_size(100, 1) == 25
    assert auto_chunk_size(10 ** 6, 16) == 256


def test_plan_uses_workers_for_cpu_stages_only(tmp_path):
    images = tmp_path / "images"
    make_generated_images(images, 3, size=(64, 48))
    pipeline = Pipeline(images, tmp_path / "out", load_config(overrides={**CONFIG, "runtime.workers": 3}))
    assert (pipeline.plan("ingest").workers, pipeline.plan("ingest").processes) == (3, 3)
    assert pipeline.plan("ingest").chunk_size == MIN_CHUNK
    manifest = pipeline.plan("manifest")
    assert (manifest.workers, manifest.processes) == (1, 0)  # whole-dataset stages run in the calling process
    inline = Pipeline(images, tmp_path / "out", load_config(overrides={**CONFIG, "runtime.workers": 1}))
    assert (inline.plan("ingest").workers, inline.plan("ingest").processes) == (1, 0)
    # 0 (auto): one worker process per ITEMS_PER_WORKER pending items, at least one, at most one per usable core.
    default = Pipeline(images, tmp_path / "out", load_config(overrides=CONFIG))
    assert (default.plan("ingest").workers, default.plan("ingest").processes) == (1, 1)  # 3 images: one worker
    assert local_workers(default.config, ITEMS_PER_WORKER + 1) == (min(2, usable_cpus()),) * 2
    assert local_workers(default.config, 10 ** 6) == (usable_cpus(),) * 2
    explicit = Pipeline(images, tmp_path / "out", load_config(overrides={**CONFIG, "runtime.chunk_size": 2}))
    assert explicit.plan("ingest").chunk_size == 2


def test_each_worker_gets_its_share_of_the_cores(fresh_pool):
    pool = workers.pool(2)
    expected = str(max(1, usable_cpus() // 2))
    assert [pool.submit(os.getenv, "OMP_NUM_THREADS").result() for _ in range(4)] == [expected] * 4


def _mmapped_bytes_of_a_new_array(size: int) -> int:
    """Return how many bytes glibc maps from the kernel (``mallinfo2().hblkhd``) for a new ``size``-byte array."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                          "fsmblks", "uordblks", "fordblks", "keepcost")]

    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = MallInfo2
    before = mallinfo2().hblkhd
    array = bytearray(size)
    mapped = mallinfo2().hblkhd - before
    del array
    return mapped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_workers_keep_image_sized_arrays_in_the_heap(fresh_pool):
    # By default glibc maps a 4 MiB array from the kernel and unmaps it when freed, so every image's arrays fault
    # their pages in again; a worker serves it from the heap, where freed memory stays for the next image.
    import subprocess

    size = 4 << 20
    script = f"import tests.pipelines.test_workers as t; print(t._mmapped_bytes_of_a_new_array({size}))"
    default = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[2])
    assert int(default.stdout) >= size  # a fresh interpreter with glibc's defaults: mapped
    assert workers.pool(1).submit(_mmapped_bytes_of_a_new_array, size).result() == 0


def _imported(names: tuple[str, ...]) -> list[str]:
    return [name for name in names if sys.modules.get(name) is not None]  # None: a skipped module


def test_each_stage_gets_fresh_workers_holding_only_its_own_imports(tmp_path, fresh_pool):
    # One pool for every stage added the stages up: the filter's workers still held the captions stage's CLIP.
    images = tmp_path / "images"
    make_generated_images(images, 4, size=(64, 48))
    pipeline = Pipeline(images, tmp_path / "out", load_config(overrides={**CONFIG, "runtime.workers": 2}))
    run_inline(pipeline, ["ingest", "structure", "regions", "captions"])
    captions = workers.pool(2, "captions")
    assert captions.submit(_models).result() == ["clip", "sentences"]
    run_inline(pipeline, ["filter"])
    assert workers.pool(2, "filter").submit(_models).result() == ["caption_filter"]
    assert workers.pool(2, "filter") is not captions


def _models() -> list[str]:
    from pipelines.engine.stages import _shared

    return sorted({key[0] for key in _shared})


# A fresh process (its forkservers its own) runs the stages given with 2 workers, or prestarts their forkservers
# ("prestart" first), then starts the pool of each stage in PROBED, in order, and reports what its new workers have
# imported before any work (what their forkserver preloaded) and their torch threads; how many forkservers it launched
# after that start, and how many run and how many KiB of unchanged library pages the pool's forkserver holds after
# each pool started.
_PROBE = """
import json, sys
from pathlib import Path
import psutil
from configs import load_config
from pipelines.engine import workers
from pipelines.engine.execute import _worker_modules, prestart_workers, run_inline
from pipelines.engine.plan import Pipeline

images, out, overrides, probed, stages, started = (sys.argv[1], sys.argv[2], json.loads(sys.argv[3]),
                                                   [s for s in sys.argv[4].split(",") if s], sys.argv[5:], None)
pipeline = Pipeline(Path(images), Path(out), load_config(overrides=overrides))
if stages[0] == "prestart":
    started = prestart_workers(pipeline, stages[1:])
else:
    run_inline(pipeline, stages)
launched, launch = [], workers._launch
workers._launch = lambda kind: launched.append(kind) or launch(kind)

from tests.pipelines.test_workers import _preloaded
names = ("torch", "transformers.models.clip.modeling_clip", "spacy", "triton", "pipelines.engine.execute")
probes = {}
for stage in probed:
    plan = pipeline.plan(stage)
    options = {"params": plan.params, "runtime": plan.runtime, "source": plan.source}
    pool = workers.pool(2, stage, *_worker_modules(stage, options))
    imported, threads = pool.submit(_preloaded, names).result()
    server = workers._servers[workers.kind(*reversed(_worker_modules(stage, options)))]
    library_kib = sum(m.rss for m in psutil.Process(server._forkserver_pid).memory_maps(grouped=False)
                      if m.path.startswith("/") and "w" not in m.perms and m.anonymous == 0) // 1024
    probes[stage] = {"imported": imported, "threads": threads, "forkservers": len(workers._servers),
                     "library_kib": library_kib}
print(json.dumps({"started": started, "launched": len(launched), "probes": probes}))
workers.shutdown()
"""


def _preloaded(names: tuple[str, ...]) -> tuple[list[str], int | None]:
    """In a worker: which of ``names`` are imported, and torch's threads (None: no torch)."""
    torch = sys.modules.get("torch")
    return _imported(names), (torch.get_num_threads() if torch is not None else None)


def _probe(tmp_path, stages: list[str], probed: list[str] = (), out: str = "out", **overrides) -> dict:
    import json
    import subprocess

    images = tmp_path / "images"
    if not images.exists():
        make_generated_images(images, 4, size=(64, 48))
    done = subprocess.run([sys.executable, "-c", _PROBE, str(images), str(tmp_path / out),
                           json.dumps({**CONFIG, "runtime.workers": 2, **overrides}), ",".join(probed), *stages],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


ENGINE = "pipelines.engine.execute"
CLIP = ["torch", "transformers.models.clip.modeling_clip", "spacy"]


def test_each_cpu_stage_forks_its_workers_from_a_forkserver_that_preloaded_what_it_imports(tmp_path):
    # A run starts one forkserver per kind of CPU stage as it starts: each imports in the background, so the ingest
    # stage's workers start at once (they waited ~5 s for the captions stage's imports when one forkserver imported
    # everything) and hold no torch; the captions stage's workers start with torch, transformers' CLIP and spaCy
    # imported, on their share of the cores; the filter's with spaCy, torch kept out (spaCy's thinc would import it
    # because it is installed); triton (GPU kernels) nowhere. No stage launched a forkserver of its own.
    result = _probe(tmp_path, ["prestart", *DATA[:-1]], ["ingest", "structure", "regions", "captions", "filter"])
    assert result["started"] is True and result["launched"] == 0
    probes = result["probes"]
    for stage in ("ingest", "structure", "regions"):
        assert probes[stage]["imported"] == [ENGINE] and probes[stage]["threads"] is None
    assert probes["captions"]["imported"] == [*CLIP, ENGINE]
    assert probes["captions"]["threads"] == max(1, usable_cpus() // 2)
    assert probes["filter"]["imported"] == ["spacy", ENGINE] and probes["filter"]["threads"] is None
    # A forkserver no later stage uses is stopped as a stage starts its workers: 3 kinds, then 2, then 1.
    assert [probes[stage]["forkservers"] for stage in ("ingest", "regions", "captions", "filter")] == [3, 3, 2, 1]


def test_a_forkserver_releases_the_library_pages_its_imports_touched(tmp_path):
    # Importing torch maps ~240 MB of CUDA libraries and more of torch's own, which no CPU worker reads: the
    # forkserver releases them (a worker maps the pages it reads itself), so it holds a few MB of them, not hundreds.
    probe = _probe(tmp_path, ["prestart", "captions"], ["captions"])["probes"]["captions"]
    assert probe["imported"] == [*CLIP, ENGINE]
    assert probe["library_kib"] < 40 * 1024, probe


_RELEASED = """
import json
import psutil
import torch
from pipelines.engine.preload import release_file_pages

def unchanged_library_kib():
    return sum(m.rss for m in psutil.Process().memory_maps(grouped=False)
               if m.path.startswith("/") and "w" not in m.perms and m.anonymous == 0) // 1024

before = unchanged_library_kib()
released = release_file_pages()
after = unchanged_library_kib()
product = float((torch.ones(64, 64) @ torch.ones(64, 64)).sum())
print(json.dumps([before, released, after, product]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps")
def test_release_file_pages_unmaps_only_unchanged_file_pages_and_the_libraries_still_run():
    import json
    import subprocess

    done = subprocess.run([sys.executable, "-c", _RELEASED], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    before, released, after, product = json.loads(done.stdout)
    assert before > 100 * 1024  # torch's libraries, resident after its import
    assert released >= 0.9 * before  # what psutil counts is what it released (its own reading maps a few pages back)
    assert after < 0.1 * before
    assert product == 64.0 ** 3  # torch runs: the pages came back from the page cache as it read them


def test_runs_without_cpu_workers_start_no_forkserver_early(tmp_path):
    # An in-process run or a Dask runner has no engine workers; stages that import nothing heavy still get theirs.
    assert _probe(tmp_path, ["prestart", "ingest", "structure", "regions"])["started"] is True
    assert _probe(tmp_path, ["prestart", "captions"], **{"runtime.workers": 1})["started"] is False
    assert _probe(tmp_path, ["prestart", "captions"], **{"runtime.runner": "dask"})["started"] is False
    assert _probe(tmp_path, ["prestart", "manifest"])["started"] is False  # a whole-dataset stage: in the caller


CRASH_ON = Path(__file__).resolve().parents[1] / "plugins" / "crash_on.py"


def _crash_config(tmp_path, **overrides):
    """The test config with the crash_on stage plugin (its worker dies on the image CRASH_ON names)."""
    path = tmp_path / "crash.yaml"
    path.write_text(f"plugins: [{CRASH_ON}]\n")
    return load_config(path, overrides={**CONFIG, **overrides})


def _rows(out):
    table = pq.read_table(sorted((out / "manifest").glob("*.parquet")))
    rows = sorted(table.to_pylist(), key=lambda r: r["source_path"])
    return [{k: v for k, v in r.items() if not k.endswith("_path") and k != "source_path"} for r in rows]


def test_two_workers_write_the_manifest_one_process_writes(tmp_path, fresh_pool):
    images = tmp_path / "images"
    make_generated_images(images, 10, size=(160, 120), seed=5)  # chunks of 3: 4 chunks over 2 workers
    config = {**CONFIG, "runtime.chunk_size": 3}
    serial = run_inline(Pipeline(images, tmp_path / "one", load_config(overrides={**config, "runtime.workers": 1})),
                        DATA)
    parallel = run_inline(Pipeline(images, tmp_path / "two", load_config(overrides={**config, "runtime.workers": 2})),
                          DATA)
    assert [(s["stage"], s["processed"], s["failed"]) for s in parallel] == \
        [(s["stage"], s["processed"], s["failed"]) for s in serial]
    assert parallel[0]["processed"] == 10
    assert _rows(tmp_path / "two") == _rows(tmp_path / "one")


def test_a_worker_that_dies_fails_only_its_item_and_the_pool_recovers(tmp_path, fresh_pool, monkeypatch):
    images = tmp_path / "images"
    make_generated_images(images, 10, size=(96, 72), seed=3)
    victim = sorted(p.name for p in images.glob("*.jpg"))[4]
    monkeypatch.setenv("CRASH_ON", victim)
    pipeline = Pipeline(images, tmp_path / "out", _crash_config(tmp_path, **{"runtime.workers": 2,
                                                                             "runtime.chunk_size": 4}))
    (ingest, crashed, structure) = run_inline(pipeline, ["ingest", "crash_on", "structure"])
    assert (ingest["processed"], ingest["failed"]) == (10, 0)
    assert (crashed["processed"], crashed["failed"]) == (9, 1)
    (failure,) = crashed["failures"]
    assert failure["file"] == victim
    assert "worker process died" in failure["reason"]
    assert (structure["processed"], structure["failed"]) == (10, 0)  # the pool was rebuilt and kept working

    monkeypatch.delenv("CRASH_ON")
    workers.shutdown()
    again = run_inline(Pipeline(images, tmp_path / "out", pipeline.config), ["crash_on"], refresh=("crash_on",))
    assert (again[0]["processed"], again[0]["failed"]) == (10, 0)


def test_chunks_in_flight_when_another_chunks_worker_dies_are_never_blamed(tmp_path, fresh_pool, monkeypatch):
    # One item per chunk, two workers: when the victim's worker dies, the pool breaks under the chunks of the other
    # worker too, and it dies again when the victim is retried. Only the victim's own death may fail an item.
    images = tmp_path / "images"
    make_generated_images(images, 12, size=(64, 48), seed=4)
    names = sorted(p.name for p in images.glob("*.jpg"))
    monkeypatch.setenv("CRASH_ON", names[5])
    pipeline = Pipeline(images, tmp_path / "out", _crash_config(tmp_path, **{"runtime.workers": 2,
                                                                             "runtime.chunk_size": 1}))
    (_, crashed) = run_inline(pipeline, ["ingest", "crash_on"])
    assert [f["file"] for f in crashed["failures"]] == [names[5]]
    assert (crashed["processed"], crashed["failed"]) == (11, 1)


SLOW_OR_FATAL = """
import os, time
from pipelines.engine.stages import Params, Stage, row_schema

class SlowOrFatal(Stage):
    name = "slow_or_fatal"
    Params = Params
    description = "Takes two seconds per chunk; its worker dies on the item named victim."
    upstream = ("ingest",)
    schema = row_schema()

    def items(self, pipeline):
        return []

    def run(self, records, *, layout, stage_key, params, runtime):
        if any(r["image_id"] == "victim" for r in records):
            os._exit(1)
        open(os.path.join(layout.root, "started"), "w").close()
        time.sleep(2.0)
        return [{"image_id": r["image_id"], "status": "ok", "error": None} for r in records]
"""


def _pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_a_chunk_in_flight_when_another_chunks_worker_dies_is_computed_again_not_blamed(tmp_path, fresh_pool):
    # The victim's worker dies while the innocent chunk runs in the other worker: the pool breaks under both, and
    # the victim kills its worker again wherever it is retried. Only the victim may fail.
    from concurrent.futures import ThreadPoolExecutor

    from pipelines.engine.execute import compute_isolated

    plugin = tmp_path / "slow_or_fatal.py"
    plugin.write_text(SLOW_OR_FATAL)
    (tmp_path / "out").mkdir()
    options = dict(out_dir=str(tmp_path / "out"), stage_key="k", params={}, runtime={}, source=str(plugin))
    warm = workers.pool(2, "slow_or_fatal")  # the pool compute_isolated uses for this stage
    assert len({future.result() for future in [warm.submit(_pid_after, 0.5) for _ in range(2)]}) == 2  # both up
    with ThreadPoolExecutor(2) as threads:
        innocent = threads.submit(compute_isolated, 2, "slow_or_fatal", [{"image_id": "a"}], **options)
        started = tmp_path / "out" / "started"
        while not started.exists() and not innocent.done():
            time.sleep(0.01)
        victim = threads.submit(compute_isolated, 2, "slow_or_fatal", [{"image_id": "victim"}], **options)
        assert [(r["image_id"], r["status"]) for r in innocent.result()] == [("a", "ok")]
        (failed,) = victim.result()
    assert failed["status"] == "failed" and "worker process died" in failed["error"]


KILLED_OWNER = """
import os, signal, sys
from pipelines.engine import workers
pool = workers.pool(2)
pids = sorted({pool.submit(os.getpid).result() for _ in range(8)} | {pool.submit(os.getpid).result()})
print(" ".join(map(str, pids)), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_workers_end_when_the_run_that_owns_them_is_killed(tmp_path):
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    # Output to a file, not a pipe: a worker left behind would hold a pipe open and hang this test instead of failing it.
    log = tmp_path / "out.txt"
    with open(log, "wb") as out:
        process = subprocess.run([sys.executable, "-c", KILLED_OWNER], cwd=root, stdout=out, stderr=subprocess.DEVNULL,
                                 timeout=120)
    assert process.returncode == -9
    pids = [int(p) for p in log.read_text().split()]
    assert pids
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), f"workers left running after their owner was killed: {pids}"


STOPPED_RUN = """
import concurrent.futures, sys
from pipelines.engine import workers

def died(_):
    import os
    os._exit(1)

executor = workers.pool(1, "probe")
try:
    executor.submit(died, None).result()
except concurrent.futures.process.BrokenProcessPool:
    pass
workers.stop_starting()  # what an interrupt's clean-up does first
outcomes = []
for start in (lambda: workers.pool(1, "probe"), lambda: workers.pool(1, "other"),
              lambda: workers.alone(1).__enter__()):
    try:
        start()
        outcomes.append("started")
    except workers.Stopping:
        outcomes.append("refused")
outcomes.append(workers.prestart([workers.kind(("json",))]))
print(outcomes)
"""


def test_an_ending_run_starts_no_worker_process_or_forkserver(tmp_path):
    # During an interrupt's clean-up, a chunk whose workers were killed would be computed again in a new process
    # (and the killed forkserver started again, importing the run's libraries into the terminal's next Ctrl-C):
    # once the run is ending, every way of starting one is refused. (In a process of its own: the flag is for good.)
    import subprocess

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", STOPPED_RUN], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "['refused', 'refused', 'refused', False]"
