"""Loss ablation: train each objective variant from the same initial weights and data order, evaluate all on the same
held-out pairs in every retrieval direction, and summarise mean +- std over seeds as JSON, markdown and a plot.

Layout under ``OUT``: ``data/`` (the pipeline's outputs, shared by every variant), ``init/seed-S/`` (the initial
weights of a random model for seed S), ``runs/VARIANT/seed-S/`` (one training run; ``result.json`` marks it done, so
a re-run skips it and an interrupted one resumes from its last checkpoint), and ``ablation.{json,md,png}``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

from storage.atomic import atomic_write_text
from storage.hashing import content_key
from structxlip.app.evaluate import DIRECTIONS
from structxlip.app.train import Objective

ZERO_SHOT = "zero-shot"
# Variant -> which structure terms it keeps (the global term is always on). Zero-shot trains nothing.
VARIANTS: dict[str, tuple[str, ...] | None] = {
    ZERO_SHOT: None,
    "global": (),
    "global+structure_centric": ("structure_centric",),
    "global+consistency": ("consistency",),
    "global+local": ("local",),
    "full": ("structure_centric", "consistency", "local"),
}
STRUCTURE_TERMS = ("structure_centric", "consistency", "local")
RESULT_FILE = "result.json"


def variant_objective(objective: Objective, variant: str) -> Objective:
    """Return ``objective`` with the structure terms that ``variant`` leaves out set to weight 0."""
    kept = VARIANTS.get(variant)
    if kept is None:
        raise ValueError(f"expected a trained variant in {[v for v in VARIANTS if v != ZERO_SHOT]}, got {variant!r}")
    return replace(objective, **{f"lambda_{term}": 0.0 for term in STRUCTURE_TERMS if term not in kept})


def parse_variants(text: str | None) -> list[str]:
    """Return the variants named in a comma-separated list (all of ``VARIANTS`` for None or ``all``)."""
    if text is None or text.strip() == "all":
        return list(VARIANTS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"unknown variant(s) {unknown or text!r}; expected a comma-separated subset of "
                         f"{', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


# ---- data ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AblationData:
    """Where the variants train (``train_manifest``'s train split) and are evaluated (``test_manifest``'s
    ``test_split``)."""

    train_manifest: Path
    test_manifest: Path
    test_split: str = "test"


def _is_manifest(path: Path) -> bool:
    if path.is_file():
        return path.suffix in (".parquet", ".json")
    return (path / "manifest").is_dir() or (path.is_dir() and any(path.glob("*.parquet")))


def _split_config(config_path: str | None, split: str, target: Path) -> Path:
    """Write ``config_path`` (or the defaults) with every image put in ``split`` to ``target``; return it."""
    data = {}
    if config_path is not None:
        path = Path(config_path).expanduser().resolve()
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if isinstance(data.get("plugins"), list):  # relative to the config's folder, not the copy's
            data["plugins"] = [str((path.parent / str(p)).resolve()) for p in data["plugins"]]
    data.setdefault("manifest", {})["split_ratios"] = {name: float(name == split) for name in ("train", "val", "test")}
    atomic_write_text(target, yaml.safe_dump(data, sort_keys=False))
    return target


def run_data_pipeline(images_dir: Path, out_dir: Path, *, config_path: str | Path | None) -> None:
    """Run the data stages (ingest ... manifest, plugins included) on ``images_dir`` into ``out_dir`` through the
    engine, in this process and the engine's workers (cached: a re-run is cheap); print the run's table and raise
    when a stage fails. The run is recorded in ``out_dir/runs`` as a ``structxlip run`` is."""
    from configs import load_config
    from pipelines.engine import workers
    from pipelines.engine.execute import format_summary, run_inline, write_report
    from pipelines.engine.plan import Pipeline, missing_inputs, preflight, record_config
    from pipelines.engine.stages import data_stage_names
    from storage.lock import output_lock

    config = load_config(config_path)
    pipeline = Pipeline(images_dir, out_dir, config)
    stages = data_stage_names(config)
    problem = missing_inputs(pipeline, stages)
    if problem:
        raise ValueError(problem)
    preflight(pipeline, stages)
    print(f"data stages: {images_dir} -> {out_dir}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        with output_lock(pipeline.layout):
            record_config(pipeline.layout, config)
            summaries = run_inline(pipeline, stages)
    finally:
        workers.shutdown()  # the workers' models are not needed for training: free their memory
    report = write_report(pipeline, summaries, seconds=time.perf_counter() - started, not_run=[])
    print(format_summary(report), file=sys.stderr, flush=True)


def prepare_data(source: str | os.PathLike, data_dir: str | os.PathLike, *, config_path: str | None,
                 run_pipeline=run_data_pipeline) -> AblationData:
    """Return the manifests to train and evaluate on for ``source``, running the pipeline once when needed.

    ``source`` is a manifest (used as is: train split to train, test split to evaluate), a folder written by
    ``make-benchmark`` (its ``train/`` and ``test/`` folders each go through the pipeline, every image of a folder in
    that folder's split), or any image folder (one pipeline run; the config's split ratios decide the held-out pairs).
    """
    from structxlip.app.shapes_benchmark import read_benchmark

    source, data_dir = Path(source).expanduser(), Path(data_dir).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"expected an image folder, a benchmark folder or a manifest, got nothing at {source}")
    if _is_manifest(source):
        return AblationData(train_manifest=source, test_manifest=source)
    benchmark = read_benchmark(source)
    if benchmark is None:
        run_pipeline(source, data_dir, config_path=config_path)
        return AblationData(train_manifest=data_dir, test_manifest=data_dir)
    for split in ("train", "test"):
        split_config = _split_config(config_path, split, data_dir / f"config-{split}.yaml")
        run_pipeline(source / benchmark["splits"][split], data_dir / split, config_path=split_config)
    return AblationData(train_manifest=data_dir / "train", test_manifest=data_dir / "test")


# ---- one run ---------------------------------------------------------------------------------------------------
def initial_model(clip_model: str, seed: int, init_dir: Path) -> str:
    """Return the initial weights of ``seed``: a random model of ``RANDOM_CLIPS`` initialised from ``seed`` (built
    once into ``init_dir``), else ``clip_model`` itself (pretrained weights are the same for every seed)."""
    from structxlip.models import RANDOM_CLIPS, build_random_clip

    if clip_model not in RANDOM_CLIPS:
        return clip_model
    target = init_dir / f"seed-{seed}"
    if not (target / "config.json").is_file():
        build_random_clip(clip_model, target, seed=seed)
    return str(target)


def _epoch_losses(history: list[dict], key: str) -> list[float]:
    by_epoch: dict[int, list[float]] = {}
    for record in history:
        if key in record and math.isfinite(record[key]):
            by_epoch.setdefault(int(record["epoch"]), []).append(float(record[key]))
    return [sum(values) / len(values) for _, values in sorted(by_epoch.items())]


def _read_history(metrics_path: Path) -> list[dict]:
    if not metrics_path.is_file():
        return []
    return [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_settings(data: AblationData, *, variant: str, seed: int, initial: str, objective: Objective,
                 train_options: dict, eval_options: dict) -> dict:
    """Return what decides a run's result (JSON-able): a finished run is reused only when these are unchanged."""
    trained = variant != ZERO_SHOT
    return json.loads(json.dumps({
        "variant": variant, "seed": seed, "initial_model": initial,
        "train_manifest": str(data.train_manifest) if trained else None, "test_manifest": str(data.test_manifest),
        "test_split": data.test_split,
        "objective": asdict(variant_objective(objective, variant)) if trained else None,
        "train_options": {k: v for k, v in train_options.items() if k not in ("progress", "config")} if trained
        else None,
        "eval_options": eval_options,
    }, default=str))


def run_variant(data: AblationData, run_dir: str | os.PathLike, *, variant: str, seed: int, initial: str,
                objective: Objective, train_options: dict, eval_options: dict) -> dict:
    """Train (unless zero-shot) and evaluate one variant for one seed; return its result, also written to
    ``run_dir/result.json``. A run whose result exists is not repeated; an unfinished one resumes.

    ``train_options`` / ``eval_options`` are keyword arguments of ``structxlip.app.train.train`` / ``evaluate`` (without
    the manifest, folders, model, objective and seed, which this function sets).
    """
    from storage.layout import OutputLayout
    from structxlip.app.evaluate import evaluate
    from structxlip.app.train import train

    run_dir = Path(run_dir)
    done = run_dir / RESULT_FILE
    settings = run_settings(data, variant=variant, seed=seed, initial=initial, objective=objective,
                            train_options=train_options, eval_options=eval_options)
    if done.is_file():
        finished = json.loads(done.read_text(encoding="utf-8"))
        if finished.get("settings") != settings:
            raise ValueError(f"{run_dir} holds a run with other settings (data, model, objective or training "
                             f"options changed); use a new --out folder or delete {run_dir}")
        return finished
    result: dict = {"variant": variant, "seed": seed, "initial_model": initial, "train_seconds": 0.0, "steps": 0,
                    "settings": settings}
    checkpoint = initial
    if variant != ZERO_SHOT:
        started = time.perf_counter()
        # A killed run resumes from its checkpoint; one written with other settings is not resumed.
        trained = train(data.train_manifest, run_dir, clip_model=initial,
                        objective=variant_objective(objective, variant), seed=seed, resume="auto",
                        run_key=content_key(settings, length=32), **train_options)
        result["train_seconds"] = time.perf_counter() - started
        if trained.model_dir is None:
            raise RuntimeError(f"{variant} seed {seed}: training stopped before its last epoch; re-run to resume")
        checkpoint = str(trained.model_dir)
        history = _read_history(OutputLayout(run_dir).train_metrics)
        result["steps"] = trained.steps
        result["seconds_per_step"] = trained.seconds_per_step
        result["epoch_loss"] = _epoch_losses(history, "loss")
        result["epoch_loss_global"] = _epoch_losses(history, "loss/global")
    started = time.perf_counter()
    result["metrics"] = evaluate(data.test_manifest, checkpoint=checkpoint, base_model=initial,
                                 out_path=run_dir / "eval" / "metrics.json", split=data.test_split, **eval_options)
    result["eval_seconds"] = time.perf_counter() - started
    atomic_write_text(done, json.dumps(result, indent=2) + "\n")
    return result


# ---- the table -------------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> dict[str, float]:
    """Return ``{"mean", "std", "n"}`` of ``values`` (sample standard deviation, 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def summarise(results: list[dict]) -> dict:
    """Return the ablation table: per variant, every metric's mean/std over seeds, seeds, timings and n_pairs."""
    table: dict[str, dict] = {}
    for variant in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == variant]
        keys = [k for k in runs[0]["metrics"] if not k.startswith("n_")]
        table[variant] = {
            "seeds": [r["seed"] for r in runs],
            "n_pairs": runs[0]["metrics"]["n_pairs"],
            "n_structure_pairs": runs[0]["metrics"].get("n_structure_pairs"),
            "metrics": {k: mean_std([float(r["metrics"][k]) for r in runs]) for k in keys},
            "train_seconds": mean_std([float(r["train_seconds"]) for r in runs]),
            "steps": runs[0]["steps"],
            "first_epoch_loss": mean_std([r["epoch_loss"][0] for r in runs]) if runs[0].get("epoch_loss") else None,
            "last_epoch_loss": mean_std([r["epoch_loss"][-1] for r in runs]) if runs[0].get("epoch_loss") else None,
        }
    return table


def _cell(stat: dict | None, digits: int = 1) -> str:
    if stat is None:
        return "-"
    if stat["n"] > 1:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def table_markdown(table: dict, *, ks: tuple[int, ...] = (1, 5)) -> str:
    """Return the table as markdown: one row per variant, R@K of every direction (mean ± std over seeds)."""
    columns = [f"{d} R@{k}" for k in ks for d in DIRECTIONS]
    lines = ["| variant | seeds | n_pairs | " + " | ".join(columns) + " | train s/run | loss epoch 1 -> last |",
             "|---|---:|---:|" + "---:|" * len(columns) + "---:|---:|"]
    for variant, row in table.items():
        cells = [_cell(row["metrics"].get(f"{d}/R@{k}")) for k in ks for d in DIRECTIONS]
        loss = "-" if row["first_epoch_loss"] is None else \
            f"{row['first_epoch_loss']['mean']:.3f} -> {row['last_epoch_loss']['mean']:.3f}"
        seconds = "-" if not row["steps"] else f"{row['train_seconds']['mean']:.0f}"
        lines.append(f"| {variant} | {len(row['seeds'])} | {row['n_pairs']} | " + " | ".join(cells)
                     + f" | {seconds} | {loss} |")
    return "\n".join(lines)


def plot_table(table: dict, path: str | os.PathLike, *, k: int = 1, title: str = "") -> Path:
    """Draw R@``k`` per direction (bars: variants, error bars: std over seeds) to a PNG at ``path``; return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(table)
    width = 0.8 / max(1, len(variants))
    figure, axis = plt.subplots(figsize=(9, 4), dpi=120)
    for index, variant in enumerate(variants):
        stats = [table[variant]["metrics"].get(f"{d}/R@{k}", {"mean": 0.0, "std": 0.0}) for d in DIRECTIONS]
        positions = [d + (index - (len(variants) - 1) / 2) * width for d in range(len(DIRECTIONS))]
        axis.bar(positions, [s["mean"] for s in stats], width, yerr=[s["std"] for s in stats], capsize=2,
                 label=variant)
    n_pairs = next(iter(table.values()))["n_pairs"] if table else 0
    axis.axhline(100.0 * k / max(1, n_pairs), color="grey", linestyle="--", linewidth=1, label=f"chance R@{k}")
    axis.set_xticks(range(len(DIRECTIONS)), DIRECTIONS)
    axis.set_ylabel(f"R@{k} (%)")
    axis.set_title(title or f"R@{k} on {n_pairs} held-out pairs (mean ± std over seeds)")
    axis.legend(fontsize=7, ncols=2)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


@dataclass
class AblationResult:
    """The ablation's per-run results, its table and the files written."""

    results: list[dict]
    table: dict
    json_path: Path
    markdown_path: Path
    plot_path: Path


def ablate(data: AblationData, out_dir: str | os.PathLike, *, clip_model: str, variants: list[str],
           seeds: list[int], objective: Objective, train_options: dict, eval_options: dict,
           command: str | None = None) -> AblationResult:
    """Run every variant for every seed (skipping finished runs) and write ``OUT/ablation.{json,md,png}``."""
    out_dir = Path(out_dir).expanduser()
    results = []
    for seed in seeds:
        initial = initial_model(clip_model, seed, out_dir / "init")
        for variant in variants:
            print(f"ablation: {variant}, seed {seed}", file=sys.stderr, flush=True)
            results.append(run_variant(data, out_dir / "runs" / variant / f"seed-{seed}", variant=variant, seed=seed,
                                       initial=initial, objective=objective, train_options=train_options,
                                       eval_options=eval_options))
    return write_ablation(data, out_dir, results, clip_model=clip_model, variants=variants, seeds=seeds,
                          command=command)


def write_ablation(data: AblationData, out_dir: str | os.PathLike, results: list[dict], *, clip_model: str,
                   variants: list[str], seeds: list[int], command: str | None = None) -> AblationResult:
    """Summarise finished runs (``run_variant`` results) into ``OUT/ablation.{json,md,png}``; return them."""
    out_dir = Path(out_dir).expanduser()
    table = summarise(results)
    payload = {"command": command, "clip_model": clip_model, "seeds": seeds, "variants": variants,
               "train_manifest": str(data.train_manifest), "test_manifest": str(data.test_manifest),
               "test_split": data.test_split, "table": table}
    json_path = out_dir / "ablation.json"
    atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
    markdown = table_markdown(table)
    if command:
        markdown = f"`{command}`\n\n{markdown}"
    markdown_path = out_dir / "ablation.md"
    atomic_write_text(markdown_path, markdown + "\n")
    plot_path = plot_table(table, out_dir / "ablation.png")
    return AblationResult(results=results, table=table, json_path=json_path, markdown_path=markdown_path,
                          plot_path=plot_path)
