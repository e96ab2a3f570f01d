"""Interrupts stop the run, through the real CLI with its own temporary API server (no PREFECT_API_URL):

- SIGINT, SIGQUIT and SIGHUP to the process group (Ctrl-C, Ctrl-\\ and a closed terminal), SIGUSR1 to it (any other
  signal that would end the run) and SIGTERM to the main process: the run exits within seconds with 128 + the signal,
  one line on stderr and no traceback; nothing it started is left alive (engine workers, the forkserver, the API
  server); the output folder's lock is released; its flow runs are Cancelled; and the same command afterwards completes
  to a manifest equal to an uninterrupted run's.
- SIGKILL to the main process: the API server and the workers end by themselves (their watchdogs).
"""

from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
import time
from pathlib import Path

import psutil
import pytest

from tests.flows.test_pipeline_cli import _manifest_rows
from tests.hardening.conftest import (N_IMAGES, alive, kill_all, kill_alone, kill_group, run_cli, stage_parts,
                                      start_cli, wait_gone, wait_until)
from tests.manifests import assert_same
from tests.prefect_server import prefect_env

pytestmark = pytest.mark.e2e
EXIT_WITHIN_S = 15.0  # measured ~2-3 s on a loaded 2-core machine; the limit only catches a run that keeps going


def _own_server_env(baseline, home: Path) -> dict:
    """An environment without PREFECT_API_URL: the CLI starts its own API server (in ``home``'s database)."""
    env = {**prefect_env("unused", home), "STRUCTXLIP_CACHE": baseline.env["STRUCTXLIP_CACHE"]}
    env.pop("PREFECT_API_URL")
    return env


def _start_own_server_run(baseline, home: Path, stages: str, *more: str):
    """Start ``structxlip run`` of ``stages`` on the baseline's images with its own API server (in the
    ``PREFECT_HOME`` ``home``), 2 workers and the options ``more``; return ``(process, output folder)``: the folder
    ``out`` beside ``home``."""
    out = home.parent / "out"
    process = start_cli(_own_server_env(baseline, home), "run", str(baseline.images), "--out", str(out), "--config",
                        str(baseline.config), "--stages", stages, "--set", "runtime.workers=2", *more)
    return process, out


def _ctrl_c(process, ready, what: str, *, settle_s: float = 0.0, again_after_s: float | None = None,
            signum: int = signal.SIGINT):
    """Once ``ready()`` holds (and ``settle_s`` later), press Ctrl-C: SIGINT (or ``signum``) to the run's process group
    (again ``again_after_s`` later); return the processes the run had started by then and its stderr."""
    try:
        wait_until(ready, process, what)
        time.sleep(settle_s)
        started = _descendants(process.pid)
        os.killpg(process.pid, signum)
        if again_after_s is not None:
            time.sleep(again_after_s)
            os.killpg(process.pid, signum)
        _stdout, stderr = process.communicate(timeout=60)
    finally:
        kill_group(process)
    return started, stderr


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _lock_is_free(out: Path) -> bool:
    path = out / ".lock"
    if not path.exists():
        return True
    with open(path, "rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
    return True


def _flow_run_states(home: Path) -> dict[str, str]:
    """Flow run name -> state type, read from the temporary server's database (the server is gone by now)."""
    with sqlite3.connect(home / "prefect.db") as db:
        return {name: state for name, state in db.execute("select name, state_type from flow_run")}


def _task_run_states(home: Path) -> list[str]:
    with sqlite3.connect(home / "prefect.db") as db:
        return [state for (state,) in db.execute("select state_type from task_run")]


@pytest.mark.parametrize("signum, to_group", [(signal.SIGINT, True), (signal.SIGTERM, False), (signal.SIGHUP, True),
                                              (signal.SIGQUIT, True), (signal.SIGUSR1, True)],
                         ids=["sigint-to-the-group", "sigterm-to-the-process", "sighup-to-the-group",
                              "sigquit-to-the-group", "sigusr1-to-the-group"])
def test_an_interrupt_stops_everything_and_the_rerun_completes(signum, to_group, baseline, tmp_path, prefect_home):
    env = _own_server_env(baseline, prefect_home)
    out = tmp_path / "out"
    args = ["run", str(baseline.images), "--out", str(out), "--config", str(baseline.config),
            "--stages", "ingest,structure,regions,captions,filter,manifest", "--set", "runtime.workers=2"]
    process = start_cli(env, *args)
    try:
        wait_until(lambda: stage_parts(out, "regions"), process, "the first regions part")
        started = _descendants(process.pid)
        assert any("flows.api_server" in " ".join(p.cmdline()) for p in started), "no own API server"
        sent = time.monotonic()
        if to_group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
        _stdout, stderr = process.communicate(timeout=60)
        elapsed = time.monotonic() - sent
    finally:
        kill_group(process)
    assert process.returncode == 128 + signum, (process.returncode, stderr[-3000:])
    assert elapsed < EXIT_WITHIN_S, elapsed
    assert "Traceback" not in stderr and "Error" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0] and "run the same command to resume" in lines[0], stderr
    assert not wait_gone(started, 5.0), alive(started)  # nothing the run started outlives it
    assert _lock_is_free(out)
    states = _flow_run_states(prefect_home)
    assert states and "CANCELLED" in states.values() and "RUNNING" not in states.values(), states
    tasks = _task_run_states(prefect_home)  # chunks whose workers the clean-up killed are Cancelled, not Failed
    assert "CANCELLED" in tasks and not {"RUNNING", "PENDING", "FAILED"} & set(tasks), tasks

    done = run_cli(baseline.env, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = _manifest_rows(out)
    assert [r["image_id"] for r in rows] == [r["image_id"] for r in baseline.rows] and len(rows) == N_IMAGES
    for got, expected in zip(rows, baseline.rows):
        assert_same(got, expected, expected["image_id"][:8])


def _assert_one_interrupted_line(process, stderr: str, signum: int = signal.SIGINT) -> None:
    """The run ended on SIGINT (130; 128 + ``signum``) with one line saying so: no traceback, not even of an
    interrupted import."""
    assert process.returncode == 128 + signum, (process.returncode, stderr[-3000:])
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0], stderr


def _forkserver(pid: int) -> bool:
    return any("forkserver" in " ".join(p.cmdline()) for p in _descendants(pid))


def test_ctrl_c_while_the_forkserver_imports_the_workers_libraries_is_one_line(baseline, prefect_home):
    # The run starts the workers' forkserver as it plans; it then imports torch, transformers and spaCy for seconds.
    # Ctrl-C reaches it too (the terminal's process group): it must leave the interrupt to the run, not print the
    # traceback of an interrupted import over the run's one line.
    process, _out = _start_own_server_run(baseline, prefect_home, "ingest,structure,regions,captions,filter")
    # 1 s: into its imports (~4 s here), past the interpreter's start
    started, stderr = _ctrl_c(process, lambda: _forkserver(process.pid), "the workers' forkserver", settle_s=1.0)
    _assert_one_interrupted_line(process, stderr)
    assert not wait_gone(started, 10.0), alive(started)


def test_a_killed_run_leaves_nothing_behind_and_the_next_run_marks_its_runs_crashed(baseline, prefect_home):
    """SIGKILL (or the out-of-memory killer) to the main process: its API server and workers end by themselves, and
    the next run on the folder marks the Prefect runs it left Running Crashed, with one warning line."""
    stages = "ingest,structure,regions,captions"
    process, out = _start_own_server_run(baseline, prefect_home, stages)
    started: list[psutil.Process] = []
    try:
        wait_until(lambda: stage_parts(out, "structure"), process, "the first structure part")
        started = _descendants(process.pid)
        assert any("flows.api_server" in " ".join(p.cmdline()) for p in started)
        left = kill_alone(process, started, 10.0)
    finally:
        kill_all(process, started)
    assert not left, left
    killed = _flow_run_states(prefect_home)
    running = sorted(name for name, state in killed.items() if state == "RUNNING")  # the parent and a stage's run
    assert len(running) == 2 and "structxlip: images -> out" in running, killed

    done = run_cli(_own_server_env(baseline, prefect_home), "run", str(baseline.images), "--out", str(out), "--config",
                   str(baseline.config), "--stages", stages, "--set", "runtime.workers=2")
    assert done.returncode == 0, done.stderr[-3000:]
    warning = [line for line in done.stderr.splitlines() if "was killed before it finished" in line]
    assert len(warning) == 1 and f"pid {process.pid}," in warning[0] and "marked Crashed" in warning[0], done.stderr
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        states = db.execute("select flow_run.name, flow_run.state_type, flow_run_state.message from flow_run "
                            "join flow_run_state on flow_run_state.id = flow_run.state_id").fetchall()
    crashed = sorted(name for name, state, message in states if state == "CRASHED")
    assert crashed == running, states
    assert all(f"pid {process.pid}" in message for _name, state, message in states if state == "CRASHED")
    assert "RUNNING" not in {state for _name, state, _message in states}, states
    assert not {"RUNNING", "PENDING"} & set(_task_run_states(prefect_home))
    assert _lock_is_free(out) and (out / ".lock").read_text() == ""  # settled: nothing left for a later run


def test_a_verbose_run_with_its_own_server_ends_at_once_with_status_0(baseline, tmp_path, prefect_home):
    # With --verbose Prefect keeps run logs to send to the API; sent by its exit hook, after the run's server had
    # stopped, they kept the process waiting until the API watch ended a successful run with "lost the run's Prefect
    # API server" and status 2.
    out = tmp_path / "out"
    done = run_cli(_own_server_env(baseline, prefect_home), "run", str(baseline.images), "--out", str(out), "--config",
                   str(baseline.config), "--stages", "ingest,structure", "--verbose")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lost the run's Prefect API" not in done.stderr and "Error logging to API" not in done.stderr
    assert "structure" in done.stdout and _lock_is_free(out)


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT],
                         ids=["sighup-under-nohup", "sigquit-in-a-background-job"])
def test_a_terminal_signal_the_run_was_started_ignoring_stays_ignored(signum):
    """nohup ignores SIGHUP; a script's background job (``cmd &``) starts ignoring SIGQUIT (and SIGINT)."""
    from flows import interrupts

    previous = signal.signal(signum, signal.SIG_IGN)
    try:
        with interrupts.handling("run"):
            assert signal.getsignal(signum) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is interrupts._on_signal
        signal.signal(signum, signal.SIG_DFL)
        with interrupts.handling("run"):
            assert signal.getsignal(signum) is interrupts._on_signal
        assert signal.getsignal(signum) is signal.SIG_DFL
    finally:
        signal.signal(signum, previous)


def test_an_interrupt_cancels_a_stage_run_that_started_before_it_was_listed(prefect_server, monkeypatch):
    """A signal can arrive after Prefect started a stage's subflow run but before the stage's function listed it in
    ACTIVE_FLOW_RUNS: the clean-up finds unfinished subflow runs of the listed runs and cancels them too."""
    import httpx

    from flows import interrupts, pipeline

    running = {"type": "RUNNING", "name": "Running"}

    def created(path: str, body: dict) -> str:
        # The session's server is shared by a whole test process: under load its database can answer 503. Prefect's
        # own client retries 429, 502 and 503; so does this. Anything else (a 500 too) fails naming status and answer.
        for attempt in range(5):
            answer = client.post(path, json=body)
            if answer.status_code not in (429, 502, 503) or attempt == 4:
                break
            time.sleep(1 + attempt)
        assert answer.is_success, f"POST {path}: {answer.status_code} {answer.text[:500]}"
        return answer.json()["id"]

    with httpx.Client(base_url=prefect_server.api_url + "/", timeout=30) as client:
        flow_id = created("flows/", {"name": "interrupt-test"})
        parent = created("flow_runs/", {"flow_id": flow_id, "state": running})
        task = created("task_runs/", {"flow_run_id": parent, "task_key": "ingest", "dynamic_key": "0",
                                      "name": "ingest", "state": running})
        stage = created("flow_runs/", {"flow_id": flow_id, "parent_task_run_id": task, "state": running})
        monkeypatch.setenv("PREFECT_API_URL", prefect_server.api_url)
        monkeypatch.setattr(pipeline, "ACTIVE_FLOW_RUNS", [parent])
        interrupts._cancel_flow_runs("interrupted by SIGINT")
        states = {run: client.get(f"flow_runs/{run}").json()["state"]["type"] for run in (parent, stage)}
        assert states == {parent: "CANCELLED", stage: "CANCELLED"}
        assert client.get(f"task_runs/{task}").json()["state"]["type"] == "CANCELLED"


@pytest.mark.parametrize("runner", ["local", "dask"])
def test_ctrl_c_twice_still_marks_the_runs_cancelled_in_one_line(runner, baseline, prefect_home):
    # An impatient user presses Ctrl-C twice. The second one used to exit at once, before the clean-up had marked
    # anything: the run's flow and task runs stayed "Running" in the Prefect UI for good. With the Dask runner (a
    # LocalCluster in the terminal's process group), its workers and scheduler logged each cancelled task and lost
    # worker, and a traceback, under the one line.
    process, out = _start_own_server_run(baseline, prefect_home,
                                               "ingest,structure,regions,captions,filter,manifest",
                                               "--set", f"runtime.runner={runner}")
    started, stderr = _ctrl_c(process, lambda: stage_parts(out, "regions"), "the first regions part", again_after_s=0.1)
    _assert_one_interrupted_line(process, stderr)
    assert not wait_gone(started, 5.0), alive(started)
    assert _lock_is_free(out)
    states = _flow_run_states(prefect_home)
    assert "CANCELLED" in states.values() and "RUNNING" not in states.values(), states
    tasks = _task_run_states(prefect_home)
    assert not {"RUNNING", "PENDING", "FAILED"} & set(tasks), tasks


@pytest.mark.parametrize("stages, runner, signum", [
    ("ingest,structure,regions,captions,filter,manifest", "dask", signal.SIGQUIT),
    ("ingest,structure,regions", "local", signal.SIGUSR2)], ids=["sigquit-dask-runner", "sigusr2-no-preloaded-stage"])
def test_a_signal_to_the_group_leaves_no_traceback_of_a_process_it_reaches(stages, runner, signum, baseline,
                                                                            prefect_home):
    # Ctrl-\ (and every signal to the group but SIGINT and SIGTERM) also killed multiprocessing's resource tracker where
    # a thread other than the main one had started it (the LocalCluster's; the engine's where no stage of the run has
    # modules to preload); the clean-up started another, which printed a KeyError traceback per semaphore under the
    # run's one line.
    process, out = _start_own_server_run(baseline, prefect_home, stages, "--set", f"runtime.runner={runner}")
    started, stderr = _ctrl_c(process, lambda: stage_parts(out, "regions"), "the first regions part", signum=signum)
    _assert_one_interrupted_line(process, stderr, signum)
    assert not wait_gone(started, 5.0), alive(started)
    assert _lock_is_free(out)
    states = _flow_run_states(prefect_home)
    assert "CANCELLED" in states.values() and "RUNNING" not in states.values(), states


def _ends_a_process_by_default(signum: int) -> bool:
    """Whether ``signum``, unhandled, ends a process: found by sending it to a child with the default disposition."""
    import resource

    pid = os.fork()
    if pid == 0:  # the child: no core file, the signal unblocked and at its default action
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
            os.kill(os.getpid(), signum)
            time.sleep(0.05)
        finally:
            os._exit(0)
    _pid, status = os.waitpid(pid, os.WUNTRACED)
    if os.WIFSTOPPED(status):  # SIGTSTP and the like stop a process, they do not end it
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return False
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signum


def test_every_signal_that_would_end_the_run_is_handled_unless_something_else_has_a_say():
    """The run handles each signal that would end it unhandled (found by sending each to a child process), except a
    fault's own (a bug in the process: faulthandler's) and those Python ignores (SIGPIPE, SIGXFSZ: the write fails
    instead); one the process started ignoring and one another library handles keep their disposition."""
    from flows import interrupts
    from pipelines.engine import preload

    faults = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT, signal.SIGTRAP,
              signal.SIGSYS}
    catchable = sorted(set(range(1, signal.NSIG)) - {signal.SIGKILL, signal.SIGSTOP, 32, 33})  # glibc's own two
    ending = {signum for signum in catchable if _ends_a_process_by_default(signum)} - faults
    assert {signal.SIGUSR1, signal.SIGALRM, signal.SIGTERM, signal.SIGRTMIN + 3} <= ending  # the probe's sanity
    expected = ending - {signal.SIGPIPE, signal.SIGXFSZ}
    assert set(preload.ENDING_SIGNALS) == expected
    assert set(preload.LEFT_TO_THE_RUN) == expected - {signal.SIGTERM}  # a pool stops its workers with SIGTERM

    def profiler(_signum, _frame):
        pass

    original = {signum: signal.getsignal(signum) for signum in (signal.SIGPROF, signal.SIGUSR2)}
    signal.signal(signal.SIGPROF, profiler)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # as a wrapper like nohup starts it
    try:
        before = {signum: signal.getsignal(signum) for signum in catchable}  # pytest-timeout may hold SIGALRM
        with interrupts.handling("run"):
            handled = {signum for signum in catchable if signal.getsignal(signum) is interrupts._on_signal}
            assert signal.getsignal(signal.SIGPROF) is profiler and signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGPIPE) is signal.SIG_IGN
        assert handled == {signal.SIGINT, signal.SIGTERM} | {
            signum for signum in expected if before[signum] == signal.SIG_DFL}
        assert {signal.SIGUSR1, signal.SIGQUIT, signal.SIGXCPU, signal.SIGRTMIN + 3} <= handled
        assert {signum: signal.getsignal(signum) for signum in catchable} == before
    finally:
        for signum, handler in original.items():
            signal.signal(signum, handler)
    assert preload.signal_name(signal.SIGRTMIN + 3) == "SIGRTMIN+3" and preload.signal_name(10) == "SIGUSR1"
