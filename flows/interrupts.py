"""Ending a CLI run on a signal (or a lost API): stop everything the run started, then exit.

The signals are every one that would end the process unhandled (``preload.ENDING_SIGNALS``): Ctrl-C (SIGINT), SIGTERM,
Ctrl-\\ (SIGQUIT), a closed terminal (SIGHUP), SIGUSR1, SIGALRM, SIGXCPU (the CPU-time limit), ... One the process
started ignoring stays ignored (SIGHUP under ``nohup``), and one another library handles keeps its handler.

On such a signal the run prints one line, marks its Prefect flow runs (and their unfinished task runs) Cancelled while
the run's own API server is still up, kills the engine's worker processes and every other process the run started
(Dask workers, the forkserver, torchrun), stops the API server, releases the output folder's lock and exits with 128 +
the signal (130 for SIGINT, 143 for SIGTERM, 131 for SIGQUIT, 129 for SIGHUP, 138 for SIGUSR1). No traceback, no core
dump, no retries against a dead API. Every output is written atomically and every finished chunk is recorded in the
stage store, so the same command resumes where this one stopped.

A second signal during the clean-up (Ctrl-C pressed twice) ends it sooner: the run exits as soon as its flow and task
runs are marked Cancelled and the processes it started are killed (the clean-up's first steps; at most
``SECOND_SIGNAL_WAIT_S`` more), so an impatient double Ctrl-C leaves no run "Running" in the UI for ever; the API server
and the lock end with the process by themselves. A third signal exits at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading

CLEANUP_TIMEOUT_S = 8.0
SECOND_SIGNAL_WAIT_S = 2.0  # how long a second signal still waits for the runs to be settled
_state = {"command": "run", "signals": 0}
_settled = threading.Event()  # the clean-up marked the runs Cancelled and killed what the run started (or tried)
_servers: list = []  # the run's own API servers (flows.api_server.ApiServer)


@contextlib.contextmanager
def handling(command: str):
    """Handle the signals that end the run (see the module docstring) for the duration of the block (main thread
    only), then restore the handlers."""
    _state.update(command=command, signals=0)
    _settled.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from pipelines.engine.preload import ENDING_SIGNALS

    # SIGINT and SIGTERM always; the others where nothing else has a say: ignored where the run was started ignoring
    # them (nohup; a background job of a script), left to a handler another library installed (a profiler's SIGPROF).
    handled = [signal.SIGINT, signal.SIGTERM] + [
        signum for signum in ENDING_SIGNALS
        if signum not in (signal.SIGINT, signal.SIGTERM) and signal.getsignal(signum) == signal.SIG_DFL]
    previous = {signum: signal.signal(signum, _on_signal) for signum in handled}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _servers.clear()


def runs_own_server() -> bool:
    """Whether this process runs its own temporary API server (``own``)."""
    return bool(_servers)


def own(server):
    """Register the run's API server: stopped last by a clean-up (after the runs are marked Cancelled through it)."""
    _servers.append(server)
    return server


def _on_signal(signum: int, _frame) -> None:
    from pipelines.engine.preload import signal_name

    name = signal_name(signum)
    abort_run(f"structxlip {_state['command']}: interrupted ({name}): finished chunks are kept; run the same command "
              "to resume", code=128 + signum, reason=f"interrupted by {name}")


def abort_run(message: str, *, code: int, reason: str | None = None) -> None:
    """Print ``message``, stop everything the run started (see the module docstring) and exit with ``code``."""
    _state["signals"] += 1
    if _state["signals"] > 1:  # again during the clean-up: exit once it has settled the runs (a third time: now)
        if _state["signals"] == 2:
            _settled.wait(SECOND_SIGNAL_WAIT_S)
        os._exit(code)
    with contextlib.suppress(Exception):
        print(message, file=sys.stderr, flush=True)
    cleaner = threading.Thread(target=_clean_up, args=(reason or message,), name="run-clean-up", daemon=True)
    cleaner.start()
    cleaner.join(CLEANUP_TIMEOUT_S)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _clean_up(reason: str) -> None:
    from pipelines.engine import workers

    workers.stop_starting()  # a chunk whose workers die below fails; it does not start new ones
    try:
        marked = False
        with contextlib.suppress(Exception):
            marked = _cancel_flow_runs(reason)
        with contextlib.suppress(Exception):
            workers.abort()
        # From here on the run's libraries would log what it kills (a LocalCluster's scheduler and nannies: each lost
        # worker) under the one line that says what happened.
        logging.disable(logging.CRITICAL)
        with contextlib.suppress(Exception):
            # The resource tracker ends by itself when this process exits, unlinking what the killed pool left behind.
            from multiprocessing import resource_tracker

            tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
            _kill_children(keep={server.process.pid for server in _servers} | ({tracker} if tracker else set()))
        if marked:  # again for task runs that started since, in processes now gone (an API that failed the first pass
            with contextlib.suppress(Exception):  # is not waited on twice)
                _cancel_flow_runs(reason)
    finally:
        _settled.set()  # what a second signal waits for: the API server and the lock end with this process anyway

    for server in _servers:
        with contextlib.suppress(Exception):
            server.stop(timeout_s=3.0)
    with contextlib.suppress(Exception):
        from storage import lock

        lock.release_all()


def _cancel_flow_runs(reason: str) -> bool:
    """Mark this process's flow runs in progress, and their unfinished task runs, Cancelled (API still up only);
    return whether there were runs to mark (an unreachable API raises).

    Plain REST calls on a client of their own: the interrupted main thread may hold the Prefect client's locks."""
    pipeline = sys.modules.get("flows.pipeline")
    run_ids = list(getattr(pipeline, "ACTIVE_FLOW_RUNS", []) or [])
    api_url = os.environ.get("PREFECT_API_URL")
    if not run_ids or not api_url:
        return False
    # Whatever their state: Prefect's own SIGTERM handling may have marked them Crashed meanwhile.
    settle_flow_runs(api_url, run_ids, {"type": "CANCELLED", "name": "Cancelled", "message": reason}, listed_too=True)
    return True


UNFINISHED = ["RUNNING", "PENDING", "SCHEDULED", "CANCELLING"]


def settle_flow_runs(api_url: str, run_ids: list[str], state: dict, *, listed_too: bool = False) -> int:
    """Set ``state`` (a REST state: type, name, message) on the flow runs ``run_ids`` still unfinished (all of them
    with ``listed_too``), their unfinished subflow runs and the unfinished task runs of all of them; return how many
    flow runs it set.

    Plain REST calls on a client of their own (an interrupted main thread may hold the Prefect client's locks); an
    unreachable API raises."""
    import httpx

    unfinished = {"type": {"any_": UNFINISHED}}
    with httpx.Client(base_url=api_url.rstrip("/") + "/", timeout=3.0) as client:
        # A stage's subflow run starts before its function lists it in ACTIVE_FLOW_RUNS: find those of the runs listed.
        found = client.post("flow_runs/filter", json={
            "flow_runs": {"parent_flow_run_id": {"any_": run_ids}, "state": unfinished}})
        listed = len(run_ids)
        run_ids = list(run_ids) + [run["id"] for run in _found(found) if run["id"] not in run_ids]
        found = client.post("flow_runs/filter", json={"flow_runs": {"id": {"any_": run_ids}, "state": unfinished}})
        if not listed_too:  # which runs to set depends on this answer: an API error raises
            found.raise_for_status()
        open_runs = {run["id"] for run in _found(found)}
        open_runs |= set(run_ids[:listed]) if listed_too else set()
        found = client.post("task_runs/filter", json={
            "flow_runs": {"id": {"any_": run_ids}},
            "task_runs": {"state": unfinished}})
        for task_run in _found(found):
            client.post(f"task_runs/{task_run['id']}/set_state", json={"state": state, "force": True})
        # The stage runs first, the parent last
        settled = [run_id for run_id in reversed(run_ids) if run_id in open_runs]
        for run_id in settled:
            client.post(f"flow_runs/{run_id}/set_state", json={"state": state, "force": True})
    return len(settled)


def _found(response) -> list[dict]:
    """The runs a filter call found; none when the API failed it."""
    return response.json() if response.status_code == 200 else []


def _kill_children(keep: set[int]) -> None:
    """Kill every process this one started (recursively), except ``keep`` and their children."""
    import psutil

    me = psutil.Process()
    kept = set(keep)
    for pid in keep:
        with contextlib.suppress(psutil.Error):
            kept |= {child.pid for child in psutil.Process(pid).children(recursive=True)}
    children = [child for child in me.children(recursive=True) if child.pid not in kept]
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(children, timeout=3.0)
