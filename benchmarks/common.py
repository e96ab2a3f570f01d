"""Shared benchmark helpers: results and targets, timing, edge-map agreement, a process tree's PSS and worker CPU,
machine information and markdown tables."""

from __future__ import annotations

import datetime as _dt
import importlib
import importlib.metadata
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class NotImplementedYet(RuntimeError):
    """A registered benchmark whose subject does not exist yet; the message says what it needs."""


@dataclass
class Target:
    """One goal: ``value`` compared with ``goal`` (``at_least`` or ``at_most``)."""

    name: str
    value: float | None
    goal: float
    direction: str = "at_least"  # "at_least" | "at_most"
    unit: str = ""

    @property
    def met(self) -> bool:
        if self.value is None or (isinstance(self.value, float) and math.isnan(self.value)):
            return False
        return self.value >= self.goal if self.direction == "at_least" else self.value <= self.goal

    def as_dict(self) -> dict:
        return {**asdict(self), "met": self.met}


@dataclass
class BenchmarkResult:
    """What one benchmark measured: table rows (one per method), targets, parameters and notes."""

    name: str
    description: str
    params: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "params": self.params,
            "rows": self.rows,
            "targets": [t.as_dict() for t in self.targets],
            "notes": self.notes,
        }


# ---- timing -------------------------------------------------------------------------------------------------------
def time_repeats(fn: Callable[[], Any], repeats: int, setup: Callable[[], Any] | None = None) -> dict[str, float]:
    """Return {best_s, median_s, runs} of ``repeats`` calls of ``fn`` (``setup`` runs untimed before each)."""
    if repeats < 1:
        raise ValueError(f"expected repeats >= 1, got {repeats}")
    seconds = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return {"best_s": min(seconds), "median_s": statistics.median(seconds), "runs": repeats}


# ---- edge-map agreement -------------------------------------------------------------------------------------------
def tolerant_edge_iou(edges: np.ndarray, reference: np.ndarray, tolerance: int = 1) -> float:
    """Return the IoU of two (H, W) edge maps where an edge pixel within ``tolerance`` px (8-neighbourhood) of an
    edge pixel of the other map counts as shared.

    matched = min(|A within tol of B|, |B within tol of A|); IoU = matched / (|A| + |B| - matched). Identical maps
    give 1, a line moved by one pixel gives 1 at tolerance 1, disjoint maps give 0; two empty maps give 1.
    """
    import cv2

    if edges.shape != reference.shape or edges.ndim != 2:
        raise ValueError(f"expected two (H, W) edge maps of one size, got {edges.shape} and {reference.shape}")
    a, b = edges > 0, reference > 0
    count_a, count_b = int(a.sum()), int(b.sum())
    if count_a + count_b == 0:
        return 1.0
    kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
    near_b = cv2.dilate(b.astype(np.uint8), kernel) > 0
    near_a = cv2.dilate(a.astype(np.uint8), kernel) > 0
    matched = min(int((a & near_b).sum()), int((b & near_a).sum()))
    return matched / (count_a + count_b - matched)


# ---- process tree: descendants, PSS, worker CPU -----------------------------------------------------------------
def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as handle:
                    fields = handle.read().rsplit(b")", 1)[1].split()
                parents[int(entry)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid]
        found += children
        frontier += children
    return found


def process_pss_mb(pid: int) -> float:
    """Proportional set size (MiB) of one live process from /proc/<pid>/smaps_rollup (shared pages divided among
    the processes that map them, so a tree's PSS adds up without counting shared libraries twice); 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def tree_pss_mb(root: int | None = None) -> float:
    """PSS (MiB) of ``root`` (default: this process) and all its live descendants (workers, servers)."""
    root = os.getpid() if root is None else root
    return sum(process_pss_mb(pid) for pid in [root, *(_descendants(root) if os.path.isdir("/proc") else [])])


class PeakTreePss:
    """Samples, every ``interval`` s, the PSS of this process's whole tree; ``peak_mb`` is the largest seen."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while True:
            self.peak_mb = max(self.peak_mb, tree_pss_mb())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "PeakTreePss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, tree_pss_mb())


def _process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far, from /proc; 0 if it is gone."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    except (OSError, IndexError, ValueError):
        return 0.0


def worker_cpu_seconds() -> float:
    """CPU seconds of this process's live engine worker processes (``pipelines.engine.workers``: forked from the
    multiprocessing forkserver, whose command line they share)."""
    return sum(_process_cpu_seconds(pid) for pid in _forkserver_descendants())


def _forkserver_descendants() -> list[int]:
    found = []
    for pid in _descendants(os.getpid()) if os.path.isdir("/proc") else []:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if b"forkserver" in handle.read():
                    found.append(pid)
        except OSError:
            continue
    return found


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---- machine information ------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """Return what the numbers depend on: CPUs, load, memory, library versions, CUDA device, date."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        info["memory_gib"] = None
    for module in ("numpy", "cv2", "PIL", "torch", "kornia", "transformers", "pyarrow"):
        try:
            info[f"{module}_version"] = importlib.import_module(module).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is simply not reported
            info[f"{module}_version"] = None
    try:  # read from its metadata: importing Prefect takes seconds and sets up its logging in this process
        info["prefect_version"] = importlib.metadata.version("prefect")
    except importlib.metadata.PackageNotFoundError:
        info["prefect_version"] = None
    try:
        import torch

        info["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        info["torch_threads"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        info["cuda_device"] = None
    return info


# ---- markdown -----------------------------------------------------------------------------------------------------
def format_value(value: Any) -> str:
    """A table cell: '-' for None, 3 significant-ish digits, thousands separators from 100 up."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        magnitude = abs(value)
        if magnitude >= 100:
            return f"{value:,.0f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}" if magnitude else "0"
    return str(value).replace("|", "\\|")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Return a GitHub markdown table of ``rows`` (columns: union of keys in first-seen order)."""
    if not rows:
        return "_no rows_\n"
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def goal_text(target: dict) -> str:
    """``≥ 150 img/s`` for a target as written to JSON."""
    sign = "≥ " if target["direction"] == "at_least" else "≤ "
    return sign + format_value(target["goal"]) + target.get("unit", "")


def result_markdown(result: dict) -> str:
    """Return the markdown section of one benchmark result (as written to JSON): rows, targets, notes."""
    parts = [f"## {result['name']}\n", f"{result['description']}\n"]
    if result.get("status", "ok") != "ok":
        parts.append(f"**{result['status']}**: {result.get('error', '')}\n")
        return "\n".join(parts)
    parts.append(markdown_table(result["rows"]))
    if result["targets"]:
        parts.append(markdown_table([
            {"target": t["name"], "value": t["value"],
             "goal": goal_text(t),
             "status": "met" if t["met"] else "MISSED"}
            for t in result["targets"]
        ]))
    for note in result.get("notes", []):
        parts.append(f"- {note}")
    machine = result.get("machine", {})
    if machine:
        load = format_value(machine.get("load_average_1m"))
        if machine.get("load_average_1m_after") is not None:
            load += f" before, {format_value(machine['load_average_1m_after'])} after"
        # Versions a result did not record (older results) are left out, not shown as "None".
        versions = "".join(f"{label} {machine[key]}, " for label, key in (
            ("Python", "python"), ("torch", "torch_version"), ("Prefect", "prefect_version"),
            ("OpenCV", "cv2_version"), ("NumPy", "numpy_version"), ("pyarrow", "pyarrow_version")) if machine.get(key))
        parts.append(f"\n_{machine.get('cpus_usable')} CPUs (load {load}), {versions}"
                     f"GPU {machine.get('cuda_device') or 'none'}, "
                     f"{machine.get('date')}{', quick mode' if result.get('quick') else ''}_\n")
    return "\n".join(parts) + "\n"
