"""Orchestration subcommands of the ``structxlip`` CLI: ``run`` (the cached Prefect pipeline) and ``demo``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_IMAGES = REPO_ROOT / "sample" / "images"
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the orchestration subcommands to the top-level parser."""
    run = subparsers.add_parser(
        "run",
        help="run the cached, resumable pipeline on an image folder",
        description="Run the pipeline stages (ingest, structure, regions, captions, filter, manifest, train, evaluate) "
        "on IMAGES_DIR, writing into OUT_DIR. Finished work is reused: a re-run computes only new or changed items.",
    )
    run.add_argument("images_dir", metavar="IMAGES_DIR", help="folder of images (+ captions.jsonl or NAME.txt captions)")
    run.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder (one run at a time)")
    run.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults)")
    run.add_argument("--stages", metavar="A,B,..", help="stages to run, comma-separated (default: all)")
    run.add_argument("--refresh", action="append", default=[], metavar="STAGE",
                     help="recompute STAGE even where its results are cached (repeatable, or comma-separated)")
    run.add_argument("--runner", choices=["local", "dask"], help="task runner (default: runtime.runner of the config)")
    run.add_argument("--dask-address", metavar="ADDR", help="Dask scheduler to use (default: a local cluster)")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                     help="override one config value, e.g. --set structure.canny_low=50 (repeatable; VALUE is YAML)")
    run.add_argument("--retry-failed", action="store_true",
                     help="recompute items whose failure is cached (e.g. after a library upgrade); nothing else")
    run.add_argument("--verbose", action="store_true", help="show Prefect's own logs")
    run.set_defaults(handler=run_command)

    demo = subparsers.add_parser(
        "demo",
        help="run all 8 stages on the bundled sample images with a tiny offline CLIP",
        description=f"Run the whole pipeline on {SAMPLE_IMAGES.relative_to(REPO_ROOT)} with "
        f"{DEMO_CONFIG.relative_to(REPO_ROOT)} (no network, no GPU needed).",
    )
    demo.add_argument("--out", default="demo-out", metavar="DIR", help="output folder (default: demo-out)")
    demo.add_argument("--images", default=str(SAMPLE_IMAGES), metavar="DIR", help=argparse.SUPPRESS)
    demo.add_argument("--verbose", action="store_true", help="show Prefect's own logs")
    demo.set_defaults(handler=demo_command)

    serve = subparsers.add_parser(
        "serve",
        help="serve the pipeline and each stage as Prefect deployments (needs PREFECT_API_URL)",
        description="Register `structxlip-pipeline/all-stages` and `<stage>/<stage>-stage` deployments with the Prefect server "
        "at PREFECT_API_URL and run their flow runs in this process until interrupted.",
    )
    serve.add_argument("--config", metavar="FILE", help="YAML config used by runs that do not pass config_path")
    serve.add_argument("--limit", type=int, default=None, metavar="N", help="at most N flow runs at once")
    serve.add_argument("--verbose", action="store_true", help="log every Prefect API call (httpx) too")
    serve.set_defaults(handler=serve_command)


def prepare_environment(verbose: bool) -> None:
    """Quiet Prefect unless ``verbose`` (must run before prefect is imported); never phone home."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The ephemeral API server takes 15-20 s to start on 2 busy cores; Prefect gives up after 20 s by default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not sys.stderr.isatty():
        # Progress bars (transformers' weight loading, hub downloads) only on a terminal, never inside Prefect logs.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        # Our own one-line warnings and the summary report failures; Prefect would add a traceback per failed task.
        os.environ["PREFECT_LOGGING_LEVEL"] = "CRITICAL"
        os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "false")
        # Dask's scheduler and nannies log every worker start and stop at INFO.
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
        for name in ("httpx", "prefect"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # Closing a LocalCluster warns about killing busy worker processes; that is the intended shutdown.
        logging.getLogger("distributed").setLevel(logging.ERROR)


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def parse_overrides(values: list[str] | None) -> dict:
    """Return ``{"section.key": value}`` from ``--set section.key=VALUE`` options (VALUE is read as YAML)."""
    import yaml

    overrides = {}
    for text in values or []:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected --set SECTION.KEY=VALUE, got {text!r}")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
            raise ValueError(f"--set {key.strip()}: {value!r} is not a YAML value ({problem})") from None
    return overrides


def execute(
    images_dir: str,
    out_dir: str,
    *,
    config_path: str | None,
    stages: list[str] | None,
    refresh: list[str],
    runner: str | None,
    dask_address: str | None,
    verbose: bool,
    overrides: dict | None = None,
    retry_failed: bool = False,
    command: str = "run",
) -> dict:
    """Load the config once, take the output folder's lock once, plan; when nothing is pending (and no Prefect server
    is configured) report the cached run without starting Prefect, else preflight and run the parent flow.
    Prints the stage table in every case; raises ``PipelineFailed`` (carrying the report) when a stage failed.

    Without ``PREFECT_API_URL`` the run starts its own API server (``flows.api_server``), while it plans when the
    first stage has work. A signal that would end it (Ctrl-C, SIGTERM, ...) stops the run cleanly (``interrupts``)."""
    from flows import interrupts

    started = time.perf_counter()
    prepare_environment(verbose)
    with interrupts.handling(command):
        return _execute(started, images_dir, out_dir, config_path=config_path, stages=stages, refresh=refresh,
                        runner=runner, dask_address=dask_address, overrides=overrides, retry_failed=retry_failed,
                        command=command)


def _execute(started, images_dir, out_dir, *, config_path, stages, refresh, runner, dask_address, overrides,
             retry_failed, command) -> dict:
    from pipelines.engine.execute import format_summary, prestart_workers, summarize, write_report
    from pipelines.engine.plan import Pipeline, missing_inputs, preflight, resolve_config, stale_stages, stages_with_work
    from pipelines.engine.stages import parse_stages
    from storage import lock
    from storage.layout import OutputLayout

    from flows import interrupts
    from flows.api_server import ApiServer

    layout = OutputLayout(out_dir)
    config, source = resolve_config(layout.root, config_path, overrides)  # one line on a bad config, before any work
    if config_path is None and source != "<defaults>":
        print(f"using the config recorded in {source}", file=sys.stderr)
    pipeline = Pipeline(images_dir, layout.root, config, retry_failed=retry_failed)  # a missing folder: one line
    pipeline.config_source = source
    selected = parse_stages(stages, list(pipeline.stages))
    refreshed = parse_stages(refresh, list(pipeline.stages)) if refresh else []
    problem = missing_inputs(pipeline, selected)  # no images, --stages train without a manifest: nothing created
    if problem:
        raise ValueError(problem)
    api_url = os.environ.get("PREFECT_API_URL")
    server = None
    # Taken once, before Prefect starts: a second writer of this folder fails at once (the flows re-enter it).
    with lock.output_lock(layout):
        try:
            if not api_url and (refreshed or retry_failed or pipeline.pending_count(selected[0])):
                server = interrupts.own(ApiServer())  # starts now: its start-up overlaps the planning below
            with_work = stages_with_work(pipeline, selected, set(refreshed))
            prestart_workers(pipeline, with_work, runner)  # the workers' imports also overlap the server's start-up
            if not with_work and not api_url:
                summaries = [summarize(pipeline.plan(stage), [], [], 0.0) for stage in selected]
                report = write_report(pipeline, summaries, seconds=time.perf_counter() - started, not_run=[],
                                      stale=stale_stages(pipeline, selected))
                from pipelines.reporting.report import refresh_explorer  # no Prefect import: a cached run never starts it

                report["explorer"] = refresh_explorer(layout, summaries, vocab_dir=config.filter.vocab_dir)
            else:
                _check_parameter_paths(pipeline)
                preflight(pipeline, with_work)
                if not api_url:
                    server = server or interrupts.own(ApiServer())
                report = _run_flow(pipeline, config_path=None if config_path is None else str(
                    Path(config_path).expanduser().resolve()), selected=selected, refreshed=refreshed, runner=runner,
                    dask_address=dask_address, retry_failed=retry_failed, server=server, command=command)
        finally:
            if server is not None:
                server.stop()
    print(format_summary(report) + _report_notes(report), flush=True)
    return report


def _check_parameter_paths(pipeline) -> None:
    """Refuse, in one line, a folder whose path Prefect cannot take as a flow parameter (JSON): bytes that are not
    UTF-8 (Python holds them as surrogates). Files with such names inside the folders are fine."""
    from storage.filenames import display_path, has_undecodable_bytes

    for what, path in (("images folder", pipeline.images_dir), ("output folder", pipeline.layout.root)):
        if has_undecodable_bytes(path):
            raise ValueError(f"the {what} path {display_path(path)} is not valid UTF-8, which Prefect's flow "
                             "parameters need: rename the folder (or link to it under a UTF-8 name)")


def _report_notes(report: dict) -> str:
    """Lines after the stage table: stale later stages, a run record that could not be written."""
    lines = []
    if report.get("stale"):
        lines.append(f"computed from older inputs now: {', '.join(report['stale'])} (run them, or all stages, to "
                     "bring them up to date)")
    if report.get("record_error"):
        lines.append(f"the run record was not written: {report['record_error']}")
    return "".join("\n" + line for line in lines)


def _run_flow(pipeline, *, config_path, selected, refreshed, runner, dask_address, retry_failed, server,
              command) -> dict:
    from prefect.settings import temporary_settings

    from flows.pipeline import NO_HEARTBEATS, PipelineFailed, current_pipeline, structxlip_pipeline
    from pipelines.engine.execute import format_summary

    api_url = server.wait_ready() if server is not None else os.environ["PREFECT_API_URL"]
    watching = _watch_api(api_url, command=command, own=server is not None)
    with current_pipeline(pipeline), contextlib.ExitStack() as own_server:
        if server is not None:
            own_server.enter_context(api_environment(api_url))
            own_server.enter_context(temporary_settings(NO_HEARTBEATS))  # no one watches this server for crashed runs
        try:
            return structxlip_pipeline(images_dir=str(pipeline.images_dir), out_dir=str(pipeline.layout.root),
                                       config_path=config_path, stages=selected, refresh=refreshed,
                                       retry_failed=retry_failed, runner=runner, dask_address=dask_address)
        except PipelineFailed as exc:
            print(format_summary(exc.report) + _report_notes(exc.report), flush=True)
            raise
        finally:
            _send_pending_to_api()
            watching.set()  # the run's own server stops next: that is no lost API


def _send_pending_to_api(timeout_s: float = 5.0) -> None:
    """Send the run logs and events Prefect still holds while the API is up. Left to Prefect's exit hook, they went to
    the run's server after it had stopped: with ``--verbose`` (run logs at INFO) the process then waited until the
    API watch ended it with "lost the run's Prefect API server" and exit status 2, after a run that had succeeded."""
    with contextlib.suppress(Exception):
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for service in (APILogWorker, EventsWorker):
            service.drain_all(timeout=timeout_s)


@contextlib.contextmanager
def api_environment(api_url: str):
    """Point this process's Prefect client (and the processes it starts: Dask workers) at ``api_url``."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = api_url
    try:
        with temporary_settings({PREFECT_API_URL: api_url}):
            yield
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous


API_LOSS_GRACE_S = 15.0


def _watch_api(api_url: str, *, command: str, own: bool = False, grace_s: float = API_LOSS_GRACE_S):
    """Watch the Prefect API from a daemon thread; when it stays unreachable for ``grace_s``, end the run with one
    line (reported once). Return the event that ends the watch (set it once the run no longer needs the API).

    Without this, a run whose server stops retries every API call with back-off for minutes and then hangs at exit
    flushing events. Every output is written atomically and every finished chunk is cached, so ending the process
    at once is safe: a re-run against the restarted server resumes where this one stopped.
    """
    import threading

    import httpx

    health = api_url.rstrip("/") + "/health"
    done = threading.Event()

    def watch() -> None:
        down_since = None
        # One client for the whole watch: a new one per check (httpx.get) builds an SSL context each time, ~30 ms of
        # CPU every 2 s, about 0.6 CPU-s of a 40 s run.
        with httpx.Client(timeout=3.0) as client:
            while not done.is_set():
                down_since = check(client, down_since)
                done.wait(2.0)

    def check(client, down_since):
        try:
            ok = client.get(health).status_code == 200
        except httpx.HTTPError:
            ok = False
        now = time.monotonic()
        down_since = None if ok else (down_since or now)
        if down_since is not None and now - down_since >= grace_s and not done.is_set():
            what = "the run's Prefect API server" if own else f"the Prefect API at {api_url}"
            from flows import interrupts

            interrupts.abort_run(f"structxlip {command}: error: lost {what} for {grace_s:.0f} s; finished "
                                 "chunks are cached, re-run the same command once the server is back", code=2)
        return down_since

    threading.Thread(target=watch, name="prefect-api-watch", daemon=True).start()
    return done


def run_command(args: argparse.Namespace) -> int:
    """``structxlip run``: exit status 0; a failed stage raises ``PipelineFailed`` (one line, exit status 2)."""
    report = execute(
        args.images_dir, args.out, config_path=args.config, stages=_split([args.stages]) if args.stages else None,
        refresh=_split(args.refresh), runner=args.runner, dask_address=args.dask_address, verbose=args.verbose,
        overrides=parse_overrides(args.overrides), retry_failed=args.retry_failed,
    )
    return 0 if report else 1


def demo_command(args: argparse.Namespace) -> int:
    """``structxlip demo``: all stages on the bundled sample, then where to find every output."""
    from configs import load_config
    from pipelines.engine.stages import stage_keys
    from storage.layout import OutputLayout

    report = execute(args.images, args.out, config_path=str(DEMO_CONFIG), stages=None, refresh=[], runner="local",
                     dask_address=None, verbose=args.verbose)
    layout = OutputLayout(args.out)
    keys = stage_keys(load_config(str(DEMO_CONFIG)))
    print(
        "\nOutputs:\n"
        f"  manifest     {layout.manifest_dir}   (python -c \"import duckdb; duckdb.sql(\\\"select * from "
        f"'{layout.manifest_dir}/*.parquet'\\\").show()\")\n"
        f"  maps         {layout.root / 'maps' / keys['structure']}\n"
        f"  crops        {layout.root / 'crops' / keys['regions']}\n"
        f"  checkpoint   {layout.checkpoints_dir}  (model: {layout.model_dir})\n"
        f"  metrics      {layout.eval_metrics}\n"
        f"  run summary  {layout.runs_dir}\n"
        f"  explorer     {report.get('explorer')}   (open it in a browser: manifest, maps, regions, quality, "
        "retrieval)\n"
        "Open the Prefect UI with `make ui` (http://127.0.0.1:4200), then run the demo again with\n"
        "PREFECT_API_URL=http://127.0.0.1:4200/api to see its flow runs, stage summaries and galleries.",
        file=sys.stdout,
        flush=True,
    )
    return 0 if report else 1


def serve_command(args: argparse.Namespace) -> int:
    """``structxlip serve``: validate the config, then serve the deployments until interrupted."""
    from configs import load_config
    from flows.serve import serve_flows

    prepare_environment(verbose=True)
    if not args.verbose:
        # The runner polls the API every few seconds; one INFO line per HTTP request drowns the flow runs' logs.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.config is not None:
        load_config(args.config)  # fail now in one line rather than in every triggered run
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be a positive number of runs, got {args.limit}")
    serve_flows(config_path=args.config, limit=args.limit)
    return 0
