"""Exact resume after a SIGKILL at every boundary of a training step, and the resume modes a pipeline relies on.

Each kill is driven deterministically: the training subprocess gets ``STRUCTXLIP_KILL_AT=<point>@<step>`` and
SIGKILLs itself exactly there (structxlip/app/faults.py), so the result does not depend on the machine's load. The
resumed run must end with the same bits (weights and optimiser state) as an uninterrupted run, and metrics.jsonl
must hold every step exactly once.

The reference runs in this process and the killed runs in subprocesses: all use the same CPU thread count
(OMP_NUM_THREADS), because float sums, and so the trained weights, depend on it.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from storage.layout import OutputLayout
from structxlip.checkpoint import load_checkpoint, save_checkpoint
from structxlip.app.faults import ENV
from structxlip.app.synthetic import make_synthetic_manifest
from structxlip.app.train import _remove_leftovers, _truncate_metrics, train
from tests.zygote import run_python

REPO = Path(__file__).resolve().parents[2]
RUN_KEY = "run-a"
# 16 images -> 10 in the train split -> batches of 4, 4, 2 (the partial batch kept: drop_last=False, so a resume
# must also get the epoch's last, short batch right): 3 steps per epoch, 6 in all; a checkpoint every step.
TRAIN = dict(epochs=2, batch_size=4, lr=1e-3, max_text_tokens=77, progress=False, device="cpu", seed=5,
             logit_scale_max=2.0, checkpoint_every_steps=1, drop_last=False)
STEPS = 6
RUNNER = "import json, sys; from structxlip.app.train import train; a = json.loads(sys.argv[1]); " \
         "train(a.pop('manifest'), a.pop('out'), **a)"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_synthetic_manifest(tmp_path_factory.mktemp("data"), n_images=16, image_size=48, seed=1)


@pytest.fixture(scope="module")
def reference(manifest, tiny_clip_dir, tmp_path_factory):
    """The uninterrupted run's output folder, trained in this process (compared with runs in this process)."""
    out = tmp_path_factory.mktemp("straight")
    result = train(manifest, out, clip_model=str(tiny_clip_dir), run_key=RUN_KEY, **TRAIN)
    assert result.steps == STEPS and result.model_dir is not None
    return out


@pytest.fixture(scope="module")
def process_reference(manifest, tiny_clip_dir, tmp_path_factory):
    """The uninterrupted run's output folder, trained in a fresh process like the killed and resumed runs: bit
    equality is only promised between processes in the same state (a long test session changes this one's)."""
    out = tmp_path_factory.mktemp("straight-process")
    done = _train_process(manifest, tiny_clip_dir, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _train_process(manifest, tiny_clip_dir, out: Path, kill_at: str | None = None, resume: bool | str = False):
    """Train in a fresh process with one CPU thread (float sums depend on the count); SIGKILL it at ``kill_at``."""
    arguments = dict(manifest=str(manifest), out=str(out), clip_model=str(tiny_clip_dir), run_key=RUN_KEY,
                     resume=resume, **TRAIN)
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env.update(OMP_NUM_THREADS="1", **({ENV: kill_at} if kill_at else {}))
    return run_python(["-c", RUNNER, json.dumps(arguments)], cwd=REPO, env=env, timeout=600)


def _killed_run(manifest, tiny_clip_dir, out: Path, kill_at: str, resume: bool | str = False) -> None:
    """Train in a subprocess that SIGKILLs itself at ``kill_at``; assert it died by that signal."""
    done = _train_process(manifest, tiny_clip_dir, out, kill_at, resume)
    assert done.returncode == -signal.SIGKILL, f"exit {done.returncode}, expected SIGKILL:\n{done.stderr[-3000:]}"


def _last(out: Path):
    return load_checkpoint(OutputLayout(out).checkpoint("last"))


def _metric_lines(out: Path) -> list[str]:
    return OutputLayout(out).train_metrics.read_text(encoding="utf-8").splitlines()


def _logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in _metric_lines(out)]


def _leftovers(out: Path) -> list[Path]:
    layout = OutputLayout(out)
    return sorted([*layout.train_dir.glob(".*.tmp"), *layout.checkpoints_dir.glob(".*.tmp")])


def _assert_bit_equal(out: Path, reference: Path) -> None:
    """Final model and optimiser state of ``out`` equal the reference's bit for bit, and so does the exported model."""
    from safetensors.torch import load_file

    got, expected = _last(out), _last(reference)
    assert (got.step, got.epoch, got.batch_in_epoch) == (expected.step, expected.epoch, expected.batch_in_epoch)
    assert sorted(got.model) == sorted(expected.model)
    for name, tensor in expected.model.items():
        assert torch.equal(got.model[name], tensor), name
    got_state, expected_state = got.optimizer["state"], expected.optimizer["state"]
    assert sorted(got_state) == sorted(expected_state)
    for index, moments in expected_state.items():
        for key, value in moments.items():
            assert torch.equal(got_state[index][key], value), (index, key)
    (exported,) = OutputLayout(out).model_dir.glob("*.safetensors")
    (expected_export,) = OutputLayout(reference).model_dir.glob("*.safetensors")
    got_weights, expected_weights = load_file(exported), load_file(expected_export)
    assert sorted(got_weights) == sorted(expected_weights)
    for name, tensor in expected_weights.items():
        assert torch.equal(got_weights[name], tensor), name


# ---- a kill at each boundary of a step --------------------------------------------------------------------------
def _check_after_checkpoint_mid_epoch(out: Path) -> None:
    assert (_last(out).step, _last(out).batch_in_epoch) == (2, 2)
    assert _logged_steps(out) == [1, 2]


def _check_after_epoch_checkpoint(out: Path) -> None:
    assert (_last(out).step, _last(out).epoch, _last(out).batch_in_epoch) == (3, 1, 0)
    assert OutputLayout(out).checkpoint("epoch-0001").is_file()
    assert _logged_steps(out) == [1, 2, 3]


def _check_during_step(out: Path) -> None:
    # Step 4's optimiser step was taken in memory only: nothing of it is logged or saved.
    assert _last(out).step == 3 and _logged_steps(out) == [1, 2, 3]


def _check_torn_metrics_line(out: Path) -> None:
    lines = _metric_lines(out)
    assert _last(out).step == 4 and [json.loads(line)["step"] for line in lines[:-1]] == [1, 2, 3, 4]
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[-1])
    assert lines[-1].startswith('{"step": 5')


def _check_checkpoint_not_renamed(out: Path) -> None:
    assert _last(out).step == 4 and _logged_steps(out) == [1, 2, 3, 4, 5]
    (temporary,) = _leftovers(out)
    assert temporary.name.startswith(".last.pt.") and load_checkpoint(temporary).step == 5


def _check_export_not_swapped(out: Path) -> None:
    assert (_last(out).step, _last(out).epoch) == (STEPS, 2) and _logged_steps(out) == list(range(1, STEPS + 1))
    assert not OutputLayout(out).model_dir.exists()
    (staging,) = _leftovers(out)
    assert staging.name.startswith(".model.") and any(staging.glob("*.safetensors"))


KILL_POINTS = {
    "after_checkpoint@2": _check_after_checkpoint_mid_epoch,
    "after_checkpoint@3": _check_after_epoch_checkpoint,
    "step@4": _check_during_step,
    "metrics_write@5": _check_torn_metrics_line,
    "checkpoint_write@5": _check_checkpoint_not_renamed,
    "export": _check_export_not_swapped,
}


@pytest.mark.parametrize("kill_at", list(KILL_POINTS))
def test_a_kill_at_each_boundary_of_a_step_resumes_bit_exactly(kill_at, manifest, tiny_clip_dir, process_reference,
                                                                 tmp_path):
    out = tmp_path / "out"
    _killed_run(manifest, tiny_clip_dir, out, kill_at)
    KILL_POINTS[kill_at](out)  # the kill left exactly the state of that boundary

    resumed = _train_process(manifest, tiny_clip_dir, out, resume="auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {OutputLayout(out).checkpoint('last')}" in resumed.stderr
    _assert_bit_equal(out, process_reference)
    assert _logged_steps(out) == list(range(1, STEPS + 1))
    assert _leftovers(out) == []


def test_any_number_of_kills_and_resumes_log_each_step_once(manifest, tiny_clip_dir, process_reference, tmp_path):
    out = tmp_path / "out"
    # Each run resumes the previous killed one ("auto", as the pipeline calls it) and is killed further on.
    for kill_at, last_step in (("metrics_write@2", 1), ("step@4", 3), ("checkpoint_write@5", 4)):
        _killed_run(manifest, tiny_clip_dir, out, kill_at, resume="auto")
        assert _last(out).step == last_step, kill_at
    assert _train_process(manifest, tiny_clip_dir, out, resume="auto").returncode == 0
    _assert_bit_equal(out, process_reference)
    assert _logged_steps(out) == list(range(1, STEPS + 1))


# ---- resume modes ------------------------------------------------------------------------------------------------
def _stopped_run(manifest, tiny_clip_dir, out: Path, steps: int, run_key: str | None = RUN_KEY, **overrides):
    return train(manifest, out, clip_model=str(tiny_clip_dir), run_key=run_key, max_steps=steps,
                 **{**TRAIN, **overrides})


def test_auto_without_a_checkpoint_starts_afresh(manifest, tiny_clip_dir, reference, tmp_path, capsys):
    out = tmp_path / "out"
    train(manifest, out, clip_model=str(tiny_clip_dir), run_key=RUN_KEY, resume="auto", **TRAIN)
    assert "resuming" not in capsys.readouterr().err
    _assert_bit_equal(out, reference)
    assert _last(out).run_key == RUN_KEY


def test_auto_does_not_resume_another_runs_checkpoint_and_clears_its_files(manifest, tiny_clip_dir, tmp_path,
                                                                           capsys):
    out = tmp_path / "out"
    train(manifest, out, clip_model=str(tiny_clip_dir), run_key="run-b", **TRAIN)  # 2 epochs, finished
    assert OutputLayout(out).checkpoint("epoch-0002").is_file()
    capsys.readouterr()

    train(manifest, out, clip_model=str(tiny_clip_dir), run_key=RUN_KEY, resume="auto", **{**TRAIN, "epochs": 1})
    err = capsys.readouterr().err
    assert "not resuming" in err and "'run-b'" in err and "starting afresh" in err
    assert _logged_steps(out) == [1, 2, 3]  # only the new run's steps
    assert not OutputLayout(out).checkpoint("epoch-0002").exists()
    assert (_last(out).run_key, _last(out).step) == (RUN_KEY, 3)


def test_auto_starts_afresh_when_the_data_order_changed(manifest, tiny_clip_dir, tmp_path, capsys):
    out = tmp_path / "out"
    _stopped_run(manifest, tiny_clip_dir, out, 2)
    capsys.readouterr()
    train(manifest, out, clip_model=str(tiny_clip_dir), run_key=RUN_KEY, resume="auto", **{**TRAIN, "batch_size": 2})
    assert "batch_size 4 -> 2" in capsys.readouterr().err
    assert _logged_steps(out) == list(range(1, 11))  # 5 batches of 2 per epoch, from step 1


def test_auto_starts_afresh_over_an_unreadable_checkpoint(manifest, tiny_clip_dir, reference, tmp_path, capsys):
    out = tmp_path / "out"
    _stopped_run(manifest, tiny_clip_dir, out, 2)
    OutputLayout(out).checkpoint("last").write_bytes(b"\x00not a checkpoint")
    train(manifest, out, clip_model=str(tiny_clip_dir), run_key=RUN_KEY, resume="auto", **TRAIN)
    assert "not a readable checkpoint" in capsys.readouterr().err
    _assert_bit_equal(out, reference)
    assert _logged_steps(out) == list(range(1, STEPS + 1))


def test_explicit_resume_fails_in_one_line_when_there_is_nothing_or_another_run(manifest, tiny_clip_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume: no checkpoint at .*last.pt"):
        train(manifest, tmp_path / "empty", clip_model=str(tiny_clip_dir), resume=True, **TRAIN)
    out = tmp_path / "out"
    _stopped_run(manifest, tiny_clip_dir, out, 2, run_key="run-b")
    with pytest.raises(ValueError, match="belongs to run 'run-b', not 'run-a'"):
        train(manifest, out, clip_model=str(tiny_clip_dir), run_key=RUN_KEY, resume=True, **TRAIN)
    with pytest.raises(ValueError, match="resume must be False, True or 'auto'"):
        train(manifest, out, clip_model=str(tiny_clip_dir), resume="yes", **TRAIN)
    assert _last(out).step == 2  # refused before anything was touched


def test_explicit_resume_without_a_run_key_continues_any_checkpoint(manifest, tiny_clip_dir, reference, tmp_path):
    # `structxlip train --resume` passes no run key: the user asked for this folder's checkpoint.
    out = tmp_path / "out"
    _stopped_run(manifest, tiny_clip_dir, out, 4)
    train(manifest, out, clip_model=str(tiny_clip_dir), resume=True, **TRAIN)
    _assert_bit_equal(out, reference)


def test_a_fresh_run_replaces_an_earlier_runs_metrics_and_checkpoints(manifest, tiny_clip_dir, tmp_path):
    out = tmp_path / "out"
    train(manifest, out, clip_model=str(tiny_clip_dir), **TRAIN)
    train(manifest, out, clip_model=str(tiny_clip_dir), **{**TRAIN, "epochs": 1})
    assert _logged_steps(out) == [1, 2, 3]
    assert not OutputLayout(out).checkpoint("epoch-0002").exists()


def test_a_resumed_cpu_run_uses_the_interrupted_runs_thread_count(manifest, tiny_clip_dir, tmp_path, capsys):
    threads = torch.get_num_threads()
    other = 1 if threads != 1 else 2
    torch.set_num_threads(other)
    try:
        straight = tmp_path / "straight"
        train(manifest, straight, clip_model=str(tiny_clip_dir), **TRAIN)
        out = tmp_path / "out"
        _stopped_run(manifest, tiny_clip_dir, out, 2)
    finally:
        torch.set_num_threads(threads)
    assert _last(out).config["run"]["cpu_threads"] == other
    capsys.readouterr()
    train(manifest, out, clip_model=str(tiny_clip_dir), resume=True, **TRAIN)
    assert f"({other} CPU threads, as the interrupted run)" in capsys.readouterr().err
    assert torch.get_num_threads() == threads  # put back afterwards
    assert _last(out).config["run"]["cpu_threads"] == other
    _assert_bit_equal(out, straight)


def test_truncating_metrics_keeps_each_step_up_to_the_checkpoint_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 9.0}, [3], "text",
             {"step": 3, "loss": 3.0}, {"loss": 4.0}, {"step": 4, "loss": 4.0}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 5, "lo')
    _truncate_metrics(path, 3)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 3.0}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # replaced via a temp file + rename


def test_leftovers_of_killed_writes_are_removed_and_a_fresh_run_clears_the_earlier_one(tmp_path):
    layout = OutputLayout(tmp_path)
    layout.checkpoints_dir.mkdir(parents=True)
    kept = [layout.checkpoint("last"), layout.checkpoint("epoch-0001"), layout.train_metrics,
            layout.model_dir / "model.safetensors"]
    leftovers = [layout.checkpoints_dir / ".last.pt.k2j4.tmp", layout.train_dir / ".metrics.jsonl.x1.tmp",
                 layout.train_dir / ".model.a7.tmp" / "model.safetensors",  # export staging, not swapped in
                 layout.train_dir / ".model.old-1f2e3d4c" / "model.safetensors"]  # killed between the two renames
    for path in kept + leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    _remove_leftovers(layout, earlier_run=False)
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(kept)
    _remove_leftovers(layout, earlier_run=True)
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == [layout.model_dir / "model.safetensors"]


def test_checkpoints_record_the_run_key(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", model_state={"w": torch.zeros(2)}, optimizer_state={}, step=1,
                           epoch=0, batch_in_epoch=1, run_key="abc")
    assert load_checkpoint(path).run_key == "abc"
    old = save_checkpoint(tmp_path / "old.pt", model_state={"w": torch.zeros(2)}, optimizer_state={}, step=1,
                          epoch=0, batch_in_epoch=1)
    assert load_checkpoint(old).run_key is None


def test_cli_resume_with_nothing_to_resume_is_one_line(manifest, tiny_clip_dir, tmp_path, capsys):
    import yaml

    from flows.cli import main

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"model": {"clip_model": str(tiny_clip_dir)},
                                      "train": {"epochs": 1, "batch_size": 4, "max_text_tokens": 77,
                                                "device": "cpu"}}))
    assert main(["train", str(manifest), "--out", str(tmp_path / "out"), "--config", str(config), "--resume",
                 "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("structxlip train: error: nothing to resume: no checkpoint at ")
