"""The train stage on N processes: ``train.nproc: N`` launches ``torchrun --standalone --nproc_per_node N`` (one
process per GPU, gloo on CPU) from the stage, inside ``structxlip run`` and the deployments alike.

Every rank runs ``structxlip.app.train.train`` with the stage's own arguments
(``structxlip.app.train.train_arguments``); rank 0 writes the checkpoints, the metrics, the exported model (the same layout as one process) and the result this
module hands back to the stage. A killed run resumes from its last checkpoint like a single-process one. A rank that
fails fails the stage with one line (the last error line of the ranks' output); nothing is recorded.

torchrun runs in the stage's process tree as ``python -m pipelines.engine.distributed_train --torchrun ARGS`` (the
launcher here), and each rank as ``python -m pipelines.engine.distributed_train SPEC.json``. Both end as soon as the
process that started them is gone, so nothing trains on after a run killed outright (SIGKILL, the out-of-memory
killer), and both leave the signals that reach the run's process group to the run (``preload.LEFT_TO_THE_RUN``),
which ends them itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

MAX_ERROR_CHARS = 300
TORCHRUN = "--torchrun"  # the launcher's first argument: run torchrun with the arguments after it


def train_distributed(nproc: int, manifest: str | os.PathLike, out_dir: str | os.PathLike, *, clip_model: str,
                      train: dict, runtime: dict, resume: bool | str, run_key: str) -> SimpleNamespace:
    """Train on ``nproc`` processes; return what ``structxlip.app.train.train`` returned on rank 0 (its fields)."""
    from pipelines.engine.workers import usable_cpus

    with tempfile.TemporaryDirectory(prefix="structxlip-ddp-") as folder:
        spec_path, result_path = Path(folder) / "spec.json", Path(folder) / "result.json"
        spec_path.write_text(json.dumps({
            "manifest": str(manifest), "out_dir": str(out_dir), "clip_model": clip_model, "train": train,
            "runtime": runtime, "resume": resume, "run_key": run_key, "result": str(result_path)}))
        environment = {**os.environ, "OMP_NUM_THREADS": str(max(1, usable_cpus() // nproc))}
        done = subprocess.run(
            [sys.executable, "-m", __spec__.name, TORCHRUN, "--standalone", "--nproc_per_node", str(nproc),
             "-m", __spec__.name, str(spec_path)],
            env=environment, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if done.returncode != 0 or not result_path.is_file():
            raise RuntimeError(f"training on {nproc} processes failed (exit {done.returncode}): "
                               f"{_last_error(done.stderr + done.stdout)}")
        result = json.loads(result_path.read_text())
    return SimpleNamespace(**{**result, "model_dir": result["model_dir"] and Path(result["model_dir"])})


def _last_error(output: str) -> str:
    """The most telling line of the ranks' output: the last exception line, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0] or line.startswith("structxlip")]
    return ((errors or lines or ["no output"])[-1])[:MAX_ERROR_CHARS]


def _started_by_the_run() -> None:
    """End with the process that started this one; leave the signals that reach the run's group to the run."""
    from pipelines.engine.preload import exit_with_parent, leave_signals_to_the_run

    leave_signals_to_the_run()  # torchrun then handles SIGTERM, SIGINT, SIGHUP and SIGQUIT itself (stopping its ranks)
    exit_with_parent()


def launch(arguments: list[str]) -> int:
    """torchrun with ``arguments``, in this process."""
    from torch.distributed.run import main as torchrun

    _started_by_the_run()
    torchrun(arguments)
    return 0


def main(spec_path: str) -> int:
    """One rank: train with the stage's arguments; rank 0 writes the result file."""
    _started_by_the_run()
    from structxlip.app.train import train, train_arguments

    spec = json.loads(Path(spec_path).read_text())
    arguments = train_arguments(spec["clip_model"], spec["train"], spec["runtime"])
    result = train(spec["manifest"], spec["out_dir"], **arguments, resume=spec["resume"], run_key=spec["run_key"],
                   progress=False)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(spec["result"]).write_text(json.dumps({
            "steps": result.steps, "skipped_steps": result.skipped_steps, "epochs_completed": result.epochs_completed,
            "seconds_per_step": result.seconds_per_step, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "model_dir": str(result.model_dir) if result.model_dir is not None else None}))
    return 0


if __name__ == "__main__":
    sys.exit(launch(sys.argv[2:]) if sys.argv[1] == TORCHRUN else main(sys.argv[1]))
