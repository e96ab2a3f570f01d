"""Run the benchmarks: ``python -m benchmarks.run [--only NAME ...] [--quick] [--results DIR]``.

Writes ``<results>/<name>.json`` (measurements + machine information) per benchmark and ``<results>/summary.md``
(every table), and prints the markdown. A registered benchmark whose subject is not written yet is reported as
"not implemented yet: needs X", never with made-up numbers.

Each benchmark that has a previous result in the folder is compared with it: every number that differs by more than
25% is listed (``unreproduced``).

``make bench`` runs exactly this (``.venv/bin/python -m benchmarks.run``, every benchmark); without make, call the
module directly. A full run takes ~25 min on 2 CPU cores, most of it ``scale`` (the data stages on 1,000 images
through ``structxlip run`` and through the engine alone: 11 min on a loaded machine) and the ViT-B/16 training steps;
``--quick`` is a ~5 min smoke test. ``STRUCTXLIP_BENCH_IMAGES=N`` sets the size of ``scale`` (default 1,000).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import (RESULTS_DIR, BenchmarkResult, NotImplementedYet, format_value, goal_text,
                               machine_info, markdown_table, result_markdown)


def _module_run(name: str) -> Callable[[bool], BenchmarkResult]:
    """``benchmarks.<name>.run(quick=...)``, imported only when the benchmark runs (some import torch)."""

    def run(quick: bool) -> BenchmarkResult:
        return importlib.import_module(f"benchmarks.{name}").run(quick=quick)

    return run


# name -> function(quick) returning a BenchmarkResult. Extension point: add a module with run(quick) and its name here.
BENCHMARKS: dict[str, Callable[[bool], BenchmarkResult]] = {
    name: _module_run(name)
    for name in ("structure", "regions", "local_loss", "scale", "catalogue", "clip_scoring", "training", "gpu")
}

# name -> function returning why the benchmark cannot run on this machine (one line), or None: a skipped benchmark
# prints that one line and records status "skipped", never an empty table.
SKIP_CHECKS: dict[str, Callable[[], str | None]] = {
    "gpu": lambda: importlib.import_module("benchmarks.gpu").skip_reason(),
}


def run_benchmark(name: str, *, quick: bool, results_dir: Path) -> dict:
    """Run one registered benchmark, write ``<results_dir>/<name>.json`` and return what was written."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r} (expected one of: {', '.join(BENCHMARKS)})")
    machine = machine_info()
    start = time.perf_counter()
    reason = SKIP_CHECKS[name]() if name in SKIP_CHECKS else None
    try:
        if reason:
            payload = {"name": name, "description": "", "status": "skipped", "error": reason, "rows": [],
                       "targets": [], "notes": []}
        else:
            payload = BENCHMARKS[name](quick).as_dict()
            payload["status"] = "ok"
    except NotImplementedYet as exc:
        payload = {"name": name, "description": "", "status": "not implemented", "error": str(exc), "rows": [],
                   "targets": [], "notes": []}
    machine["load_average_1m_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    payload.update({"quick": quick, "machine": machine, "seconds": time.perf_counter() - start})
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return payload


REPRODUCE_WITHIN = 0.25  # a published number a quiet machine cannot reproduce this closely is a bug
NOT_COMPARED = {"load_1m", "load_average_1m", "left_running"}  # the conditions of a run, not its results


def unreproduced(previous: dict, current: dict, within: float = REPRODUCE_WITHIN) -> list[dict]:
    """Return the numbers of ``current`` (a result as written to JSON) that differ from the same number of
    ``previous`` by more than ``within`` of it: row cells (rows matched by their first column) and target values.
    Each as ``{row, column, before, now, ratio}``; a number absent from either side is not compared."""

    def numbers(result: dict) -> dict[tuple[str, str], float]:
        found = {}
        for row in result.get("rows") or []:
            label = str(next(iter(row.values()), ""))
            for column, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and column not in NOT_COMPARED:
                    found[(label, column)] = float(value)
        for target in result.get("targets") or []:
            if isinstance(target.get("value"), (int, float)):
                found[(f"target: {target['name']}", "value")] = float(target["value"])
        return found

    before, now = numbers(previous), numbers(current)
    differing = []
    for key in before.keys() & now.keys():
        old, new = before[key], now[key]
        if abs(new - old) > within * abs(old) and not (old == 0 and new == 0):
            differing.append({"row": key[0], "column": key[1], "before": old, "now": new,
                              "ratio": new / old if old else None})
    return sorted(differing, key=lambda d: (d["row"], d["column"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS), metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="small inputs, few repeats (a smoke test, not numbers)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder for the JSON files and summary.md")
    parser.add_argument("--readme", type=Path, default=None,
                        help="file whose <!-- bench:NAME --> blocks get the results' tables (default: README.md when "
                             "--results is the default folder, else none)")
    args = parser.parse_args(argv)

    names = args.only or list(BENCHMARKS)
    failed = False
    for name in names:
        reason = SKIP_CHECKS[name]() if name in SKIP_CHECKS else None
        if reason:  # one line, nothing else
            run_benchmark(name, quick=args.quick, results_dir=args.results)
            print(f"{name}: skipped: {reason}", flush=True)
            continue
        print(f"running {name}{' (quick)' if args.quick else ''} ...", file=sys.stderr, flush=True)
        previous_path = args.results / f"{name}.json"
        previous = json.loads(previous_path.read_text(encoding="utf-8")) if previous_path.is_file() else None
        try:
            payload = run_benchmark(name, quick=args.quick, results_dir=args.results)
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others' tables
            failed = True
            payload = {"name": name, "description": "", "status": "error", "error": f"{type(exc).__name__}: {exc}"}
        print(result_markdown(payload), flush=True)
        if previous and previous.get("status") == payload.get("status") == "ok" and previous.get("quick") == args.quick:
            differing = unreproduced(previous, payload)
            print(f"against the previous result ({previous.get('machine', {}).get('date', '?')}): "
                  + (f"{len(differing)} number(s) differ by more than {REPRODUCE_WITHIN:.0%}:\n"
                     + markdown_table(differing) if differing else f"every number within {REPRODUCE_WITHIN:.0%}"),
                  flush=True)
    write_summary(args.results)
    readme = args.readme or (README if args.results == RESULTS_DIR else None)
    if readme is not None and readme.is_file():
        text = readme.read_text(encoding="utf-8")
        updated = readme_with_results(text, args.results)
        if updated != text:
            readme.write_text(updated, encoding="utf-8")
    return 1 if failed else 0


README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"(<!-- bench:(\w+) -->\n)(.*?)(<!-- /bench:\2 -->)", re.DOTALL)


def target_rows(results_dir: Path) -> list[dict]:
    """One row per target of every benchmark result in ``results_dir`` (registry order): what was measured against
    what goal, whether it is met, and when, under which load and on which machine it was measured."""
    rows = []
    for name in BENCHMARKS:
        path = results_dir / f"{name}.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text(encoding="utf-8"))
        machine = result.get("machine") or {}
        load = [machine.get(k) for k in ("load_average_1m", "load_average_1m_after")]
        for target in result.get("targets") or []:
            rows.append({
                "benchmark": name, "target": target["name"],
                "measured": format_value(target["value"]) + target.get("unit", ""),
                "goal": goal_text(target),
                "status": "met" if target["met"] else "**missed**",
                "load_1m": " -> ".join(f"{v:.2f}" for v in load if isinstance(v, (int, float))),
                "measured_on": f"{str(machine.get('date', ''))[:10]}, {machine.get('cpus_usable', '?')} CPUs"
                + (f", {machine['cuda_device']}" if machine.get("cuda_device") else ", no GPU"),
            })
    return rows


def readme_with_results(text: str, results_dir: Path) -> str:
    """Return ``text`` with each ``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->`` block holding the table of
    ``<results_dir>/NAME.json`` as ``make bench`` wrote it (a block without a result is left as it is); the block
    ``targets`` holds every result's targets (``target_rows``)."""

    def table(match: re.Match) -> str:
        name = match.group(2)
        path = results_dir / f"{name}.json"
        if name == "targets":
            rows = target_rows(results_dir)
        elif path.is_file():
            rows = json.loads(path.read_text(encoding="utf-8")).get("rows") or []
        else:
            return match.group(0)
        return match.group(1) + markdown_table(rows).rstrip("\n") + "\n" + match.group(4)

    return _BLOCK.sub(table, text)


def write_summary(results_dir: Path) -> Path:
    """Write ``summary.md`` from every ``<name>.json`` in ``results_dir`` (registry order), so ``--only`` runs
    update their section and keep the others."""
    sections = []
    for name in BENCHMARKS:
        path = results_dir / f"{name}.json"
        if path.exists():
            sections.append(result_markdown(json.loads(path.read_text(encoding="utf-8"))))
    results_dir.mkdir(parents=True, exist_ok=True)
    summary = results_dir / "summary.md"
    summary.write_text("# Benchmark summary\n\n" + "\n".join(sections), encoding="utf-8")
    return summary


if __name__ == "__main__":
    sys.exit(main())
