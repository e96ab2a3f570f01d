"""The data stages at scale, side by side in one run: ``structxlip run`` as a user runs it and the stage engine alone,
on N generated 640x480 images (``tests.corpus.make_generated_images``: JPEGs with captions; N = 1,000, or
$STRUCTXLIP_BENCH_IMAGES, 24 with --quick), demo config (tiny CLIP, grouping regions), ingest .. manifest.

Rows, each one fresh process tree, in this order:
- the Prefect floor (``prefect_floor``): the run's own API server and a parent flow with one empty subflow per stage,
  no work; first with a fresh $PREFECT_HOME (Prefect creates its database: a user's first run on a machine), then
  again (the database exists: every later run). What ``structxlip run`` spends beyond its stages and beyond this
  floor is the pipeline's own overhead;
- ``structxlip run`` cold: ``python -m flows.cli run IMAGES --out OUT --config configs/demo.yaml --stages ...`` into
  an empty folder, that $PREFECT_HOME and no $PREFECT_API_URL (the run starts its own API server), then the
  same command again (fully cached);
- the engine alone: ``pipelines.engine.execute.run_inline`` over ``pipelines.engine.plan.Pipeline`` in one fresh
  Python process (no Prefect), on the same N images into another empty folder;
- ``structxlip run`` again on the first folder after adding 20 images (4 with --quick).
Per row: wall seconds; images/s (images the first stage computed / wall); the stages' own seconds (the stage
summaries' ``seconds``, from the run report OUT/runs/<stamp>.json for the CLI) and the wall beyond them (start-up,
imports, the API server, planning, artifacts, exit); the tree's peak PSS (``psutil``, every process of the tree every
0.1 s) and CPU seconds (user + system of every process of the tree, exited ones included); processes still running
20 s after the command exited (then killed); the 1-minute load average when the row started. Model caches and the
page cache are warm (the images were just written).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from benchmarks.common import BenchmarkResult, Target

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"
IMAGES_ENV = "STRUCTXLIP_BENCH_IMAGES"
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


@dataclass
class TreeUsage:
    """What one command and every process it started used: wall s, peak PSS (MiB) and CPU s of the whole tree, its
    exit code and how many of its processes were still running ``grace_s`` after it exited (then killed)."""

    wall_s: float
    peak_pss_mb: float
    cpu_s: float
    returncode: int
    left_running: int


def _child_subreaper(on: bool) -> None:
    # A descendant whose parent exits first (a forkserver, an API server) is then re-parented to this process instead
    # of init, so it is reaped here and its CPU (with its own reaped children's) lands in RUSAGE_CHILDREN.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def measure_tree(command: list[str], *, log: Path, env: dict | None = None, interval: float = 0.1,
                 grace_s: float = 20.0, timeout_s: float = 3600.0) -> TreeUsage:
    """Run ``command`` (output to ``log``) and return its process tree's usage (Linux). This process's other children
    are neither counted nor touched, but one of them exiting meanwhile would add its CPU."""
    me = psutil.Process()
    others = {child.pid for child in me.children()}
    peak_bytes, stop = [0], threading.Event()

    def tree() -> list[psutil.Process]:
        found = []
        for root in [child for child in me.children() if child.pid not in others]:
            with contextlib.suppress(psutil.Error):
                found += [root, *root.children(recursive=True)]
        return found

    def sample() -> None:
        while True:
            total = 0
            for process in tree():
                with contextlib.suppress(psutil.Error):  # gone, or a zombie
                    total += process.memory_full_info().pss
            peak_bytes[0] = max(peak_bytes[0], total)
            if stop.wait(interval):
                return

    _child_subreaper(True)
    try:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with open(log, "wb") as output:
            start = time.perf_counter()
            process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
            sampler = threading.Thread(target=sample, name="tree-pss", daemon=True)
            sampler.start()
            try:
                returncode = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                returncode = process.wait()
            wall = time.perf_counter() - start
            left = _reap_adopted(me, others, grace_s)
            stop.set()
            sampler.join()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        _child_subreaper(False)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return TreeUsage(wall, peak_bytes[0] / 2**20, cpu, returncode, left)


def _reap_adopted(me: psutil.Process, others: set[int], grace_s: float) -> int:
    """Wait up to ``grace_s`` for the processes re-parented here to exit, then kill what is left with its descendants;
    reap everything. Return how many processes were killed."""
    deadline, killed = time.monotonic() + grace_s, 0
    while adopted := [child for child in me.children() if child.pid not in others]:
        _gone, alive = psutil.wait_procs(adopted, timeout=max(deadline - time.monotonic(), 0.1))
        if alive and time.monotonic() >= deadline:
            for process in alive:
                with contextlib.suppress(psutil.Error):
                    for victim in [process, *process.children(recursive=True)]:
                        with contextlib.suppress(psutil.Error):
                            victim.kill()
                            killed += 1
    return killed


def new_run_report(runs_dir: Path, known: set[str]) -> dict:
    """Return the one run report in ``runs_dir`` whose name is not in ``known`` (the run just measured wrote it)."""
    new = sorted(p for p in runs_dir.glob("*.json") if p.name not in known)
    if len(new) != 1:
        raise RuntimeError(f"expected one new run report in {runs_dir}, found {[p.name for p in new]}")
    return json.loads(new[0].read_text(encoding="utf-8"))


def timing_row(run: str, usage: TreeUsage, stages: list[dict], load_1m: float) -> dict:
    """Return one table row from a measured command and its stage summaries (``processed`` and ``seconds`` each)."""
    stages_s = sum(float(stage["seconds"]) for stage in stages)
    computed = int(stages[0]["processed"])
    return {"run": run, "wall_s": usage.wall_s, "images_computed": computed,
            "img_s": computed / usage.wall_s if computed else None,
            "stages_s": stages_s, "beyond_stages_s": usage.wall_s - stages_s,
            "peak_tree_pss_mb": usage.peak_pss_mb, "tree_cpu_s": usage.cpu_s,
            "cpu_ms_per_img": 1000 * usage.cpu_s / computed if computed else None,
            "processed_per_stage": "/".join(str(stage["processed"]) for stage in stages),
            "left_running": usage.left_running, "load_1m": load_1m}


def engine_run(images: str, out: str, summaries: str) -> None:
    """The engine-alone row's process: every data stage through ``run_inline``; the summaries go to ``summaries``."""
    from configs.schema import load_config
    from pipelines.engine import workers
    from pipelines.engine.execute import run_inline
    from pipelines.engine.plan import Pipeline
    from pipelines.engine.stages import data_stage_names

    try:
        result = run_inline(Pipeline(Path(images), Path(out), load_config(CONFIG)), data_stage_names())
    finally:
        workers.shutdown()
    Path(summaries).write_text(json.dumps(result, default=str), encoding="utf-8")


def prefect_floor(stages: str) -> None:
    """The Prefect floor row's process: what any run orchestrated like ``structxlip run`` pays without doing work. It
    starts the run's own API server (``flows.api_server``) at once, imports Prefect while it starts, then runs a parent
    flow with ``stages`` stage subflows, each mapping one empty task, heartbeats off as in ``flows.pipeline``."""
    from flows.api_server import ApiServer
    from flows.commands import api_environment, prepare_environment

    prepare_environment(verbose=False)  # the CLI's settings, before Prefect is imported
    server = ApiServer()
    try:
        from prefect import flow, task
        from prefect.settings import temporary_settings

        from flows.pipeline import NO_HEARTBEATS

        @task
        def chunk(index: int) -> int:
            return index

        @flow
        def stage() -> None:
            chunk.map(range(1)).result()

        @flow
        def parent() -> None:
            for _ in range(int(stages)):
                stage()

        with api_environment(server.wait_ready()), temporary_settings(NO_HEARTBEATS):
            parent()
    finally:
        server.stop()


def run(*, quick: bool = False, n_images: int | None = None) -> BenchmarkResult:
    """Return the rows above for ``n_images`` (default 1,000; $STRUCTXLIP_BENCH_IMAGES; 24 with ``quick``)."""
    from pipelines.engine.stages import data_stage_names
    from tests.corpus import make_generated_images

    n = n_images or (24 if quick else int(os.environ.get(IMAGES_ENV) or 1000))
    added = 4 if quick else 20
    stages = data_stage_names()
    root = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    images, out = root / "images", root / "out"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(root / "prefect-home"), PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    cli = [sys.executable, "-m", "flows.cli", "run", str(images), "--out", str(out), "--config", str(CONFIG),
           "--stages", ",".join(stages)]
    load_before = os.getloadavg()[0]
    rows, reports = [], {}
    try:
        make_generated_images(images, n, seed=0)

        def measured(label: str, command: list[str]) -> TreeUsage:
            log = root / f"{len(rows)}.log"
            usage = measure_tree(command, log=log, env=env)
            if usage.returncode != 0:
                tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
                raise RuntimeError(f"{label} exited with {usage.returncode}: {tail}")
            return usage

        def cli_row(label: str) -> None:
            known = {p.name for p in (out / "runs").glob("*.json")}
            load = os.getloadavg()[0]
            usage = measured(label, cli)
            reports[label] = new_run_report(out / "runs", known)["stages"]
            rows.append(timing_row(label, usage, reports[label], load))

        floor = [sys.executable, "-c", "import sys; from benchmarks.scale import prefect_floor; "
                 "prefect_floor(sys.argv[1])", str(len(stages))]
        for label in ("Prefect floor, new database", "Prefect floor"):
            load = os.getloadavg()[0]
            rows.append(timing_row(label, measured(label, floor), [{"processed": 0, "seconds": 0.0}], load))
        cli_row("structxlip run, cold")
        cli_row("structxlip run, fully cached")
        label, load = "engine alone (run_inline, no Prefect), cold", os.getloadavg()[0]
        usage = measured(label, [sys.executable, "-c", "import sys; from benchmarks.scale import engine_run; "
                                 "engine_run(*sys.argv[1:])", str(images), str(root / "engine-out"),
                                 str(root / "engine.json")])
        reports[label] = json.loads((root / "engine.json").read_text(encoding="utf-8"))
        rows.append(timing_row(label, usage, reports[label], load))
        make_generated_images(images, added, seed=0, start=n)
        cli_row(f"structxlip run, +{added} images")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    load_after = os.getloadavg()[0]
    result = BenchmarkResult(
        name="scale",
        description=f"Data stages ({', '.join(stages)}; demo config: tiny CLIP, grouping regions) on {n} generated "
                    f"640x480 images: `structxlip run` (fresh processes, cold then cached, then +{added} images) "
                    f"and the stage engine alone, each a fresh process tree.",
        params={"images": n, "added": added, "stages": stages, "config": "configs/demo.yaml",
                "load_1m_before": load_before, "load_1m_after": load_after},
        rows=rows)
    new_database, floor, *measured_rows = rows
    cold_row, cached_row, _engine_row, _incremental_row = measured_rows
    cold, cached, engine, incremental = (reports[row["run"]] for row in measured_rows)
    result.notes += [
        f"load average (1 min) {load_before:.2f} before, {load_after:.2f} after; load_1m: at the start of each row",
        "stage seconds, structxlip run cold / engine alone: " + ", ".join(
            f"{a['stage']} {float(a['seconds']):.1f} / {float(b['seconds']):.1f}" for a, b in zip(cold, engine)),
        f"Prefect floor: {floor['wall_s']:.1f} s wall, {floor['tree_cpu_s']:.1f} CPU-s, "
        f"{floor['peak_tree_pss_mb']:.0f} MB (with a new database {new_database['wall_s']:.1f} s); cold structxlip run "
        f"beyond its stages and that floor: {cold_row['beyond_stages_s'] - floor['wall_s']:.1f} s",
        "beyond_stages_s = wall_s - stages_s; images_computed: what the first stage computed; PSS divides shared "
        "pages among every process mapping them, those outside the tree included",
    ]
    result.targets = [
        Target(f"structxlip run, cold, {n} images", cold_row["img_s"], 45.0, unit=" img/s"),
        Target("structxlip run, cold: wall beyond the stages", cold_row["beyond_stages_s"], 3.0, direction="at_most",
               unit=" s"),
        Target("structxlip run, cold: peak tree PSS", cold_row["peak_tree_pss_mb"], 1536.0, direction="at_most",
               unit=" MB"),
        Target("fully cached structxlip run wall", cached_row["wall_s"], 3.0, direction="at_most", unit=" s"),
        Target("items the cached run recomputed", float(sum(int(s["processed"]) for s in cached)), 0.0,
               direction="at_most"),
        Target(f"|items per stage computed by the +{added} run - {added}| (manifest apart)",
               float(max(abs(int(s["processed"]) - added) for s in incremental if "rows" not in s)), 0.0,
               direction="at_most"),
    ]
    return result
