"""Fixed cost of a fully cached run: ``structxlip run`` (the real CLI, no Prefect server configured) on a folder whose
every stage is already done, at 12 and 2,000 images. Target: <= 3 s wall, nothing processed.

The folder is prepared once with the same stage engine the flows use (``pipelines.engine.execute.run_inline``: identical store,
no orchestrator), then the CLI is timed three times in fresh processes. The floor beside it is the bare Python start
plus the imports the CLI cannot avoid (``configs``, ``pyarrow``), measured in the same run.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import BenchmarkResult, Target

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
SIZES = (12, 2000)
REPEATS = 3


def _prepare(images: Path, out: Path, n: int) -> None:
    from configs import load_config
    from pipelines.engine.execute import run_inline
    from pipelines.engine.plan import Pipeline, record_config
    from tests.corpus import make_generated_images

    make_generated_images(images, n, size=(320, 240), seed=3)
    config = load_config(CONFIG, {"train.epochs": 1})
    pipeline = Pipeline(images, out, config)
    record_config(pipeline.layout, config)
    run_inline(pipeline, list(pipeline.keys))


def _timed(command: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    return time.perf_counter() - started, done


def run(*, quick: bool = False) -> BenchmarkResult:
    sizes = (12, 40) if quick else SIZES
    result = BenchmarkResult(
        name="pipeline_noop",
        description="Fully cached `structxlip run` (all 8 stages, demo config, no Prefect server) vs the floor.",
        params={"sizes": list(sizes), "repeats": REPEATS, "config": "configs/demo.yaml"},
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    floor_command = [sys.executable, "-c", "import configs.schema, pyarrow.parquet, yaml"]
    floor = min(_timed(floor_command, env)[0] for _ in range(REPEATS))
    for n in sizes:
        root = Path(tempfile.mkdtemp(prefix=f"bench-noop-{n}-"))
        try:
            images, out = root / "images", root / "out"
            prepare_started = time.perf_counter()
            _prepare(images, out, n)
            prepare_s = time.perf_counter() - prepare_started
            env["PREFECT_HOME"] = str(root / "prefect-home")
            command = [sys.executable, "-m", "flows.cli", "run", str(images), "--out", str(out)]
            walls, processed = [], 0
            for _ in range(REPEATS):
                wall, done = _timed(command, env)
                if done.returncode != 0:
                    raise RuntimeError(f"cached run failed: {done.stderr[-2000:]}")
                walls.append(wall)
                for line in done.stdout.splitlines()[1:9]:
                    processed += int(line.split()[1])
            result.rows.append({"images": n, "wall_s_median": statistics.median(walls), "wall_s_best": min(walls),
                                "floor_s": floor, "ratio_to_floor": min(walls) / floor, "items_processed": processed,
                                "prefect_started": Path(env["PREFECT_HOME"]).exists(),
                                "prepare_s": prepare_s})
        finally:
            shutil.rmtree(root, ignore_errors=True)
    large = result.rows[-1]
    result.targets = [
        Target(f"cached run wall time at {large['images']} images (s)", large["wall_s_median"], 3.0,
               direction="at_most"),
        Target("items recomputed by cached runs", float(sum(r["items_processed"] for r in result.rows)), 0.0,
               direction="at_most"),
    ]
    result.notes.append("floor: a fresh Python process importing configs.schema, pyarrow.parquet and yaml")
    return result
