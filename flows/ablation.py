"""The ``structxlip-ablation`` flow: the loss ablation of ``structxlip.app.ablate`` as Prefect tasks, with its table and
plot as artifacts. Data preparation runs the pipeline flow once (cached in its stage store, shared by every variant);
each (variant, seed) is one task around ``run_variant``, itself resumable and skipped when finished with the same
settings. Thin: what a variant is and how it is trained live in ``structxlip.app.ablate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from storage import lock
from storage.layout import OutputLayout

Variant = Literal["zero-shot", "global", "global+structure_centric", "global+consistency", "global+local", "full"]


@task(name="train_variant", cache_policy=NO_CACHE)
def train_variant(data, run_dir: str, *, variant: str, seed: int, initial: str, objective, train_options: dict,
                  eval_options: dict) -> dict:
    """Train (unless zero-shot) and evaluate one variant for one seed; return its result."""
    from structxlip.app.ablate import run_variant

    return run_variant(data, run_dir, variant=variant, seed=seed, initial=initial, objective=objective,
                       train_options=train_options, eval_options=eval_options)


def _run_pipeline(images_dir, out_dir, *, config_path) -> None:
    """Data preparation through the pipeline flow itself (a subflow here: visible in the UI, cached by the store)."""
    from configs import load_config
    from flows.pipeline import structxlip_pipeline
    from pipelines.engine.stages import data_stage_names

    structxlip_pipeline(images_dir=str(images_dir), out_dir=str(out_dir),
                        config_path=None if config_path is None else str(config_path),
                        stages=data_stage_names(load_config(config_path)))


def _run_name() -> str:
    from prefect.runtime import flow_run

    parameters = flow_run.parameters or {}
    return f"ablation: {Path(str(parameters.get('source') or '?')).name} -> {Path(str(parameters.get('out_dir'))).name}"


@flow(name="structxlip-ablation", description="Train and evaluate the StructXLIP loss variants over seeds.",
      flow_run_name=_run_name)
def structxlip_ablation(source: str, out_dir: str, config_path: str | None = None,
                        variants: list[Variant] | None = None, seeds: int = 3, seed_start: int = 0,
                        epochs: int | None = None) -> dict:
    """Run the ablation; return the table (mean and std over seeds per variant and metric).

    Args:
        source: A `structxlip make-benchmark` folder, an image folder or a manifest.
        out_dir: Output folder: data/ (the pipeline's outputs), runs/VARIANT/seed-S/, ablation.json/md/png.
        config_path: YAML config (e.g. configs/ablation-small.yaml); empty = the built-in defaults.
        variants: Loss variants to train; empty = all six (zero-shot ... full).
        seeds: How many seeds (each: its own initial weights for a random model, its own data order).
        seed_start: The first seed.
        epochs: Override train.epochs.
    """
    from configs import load_config
    from pipelines.engine.stages import ablation_arguments
    from structxlip.app.ablate import initial_model, parse_variants, prepare_data, write_ablation

    if seeds < 1:
        raise ValueError(f"expected seeds >= 1, got {seeds}")
    config = load_config(config_path, {"train.epochs": epochs} if epochs else None)
    chosen = parse_variants(",".join(variants) if variants else None)
    objective, train_options, eval_options = ablation_arguments(config)
    train_options["progress"] = False
    out = Path(out_dir).expanduser().resolve()
    with lock.output_lock(OutputLayout(out)):
        data = prepare_data(source, out / "data", config_path=config_path, run_pipeline=_run_pipeline)
        results = []
        for seed in range(seed_start, seed_start + seeds):
            initial = initial_model(config.model.clip_model, seed, out / "init")
            for variant in chosen:  # one at a time: each training uses every core
                results.append(train_variant(data, str(out / "runs" / variant / f"seed-{seed}"), variant=variant,
                                             seed=seed, initial=initial, objective=objective,
                                             train_options=train_options, eval_options=eval_options))
        written = write_ablation(data, out, results, clip_model=config.model.clip_model, variants=chosen,
                                 seeds=list(range(seed_start, seed_start + seeds)))
    _publish(out, written)
    return written.table


def _publish(out: Path, written) -> None:
    """The table and the R@1 plot as one markdown artifact (a report: never fails the run)."""
    import contextlib

    with contextlib.suppress(Exception):
        from prefect.artifacts import create_markdown_artifact

        from pipelines.reporting.render import artifact_key, png_data_uri
        from storage.hashing import content_key

        markdown = written.markdown_path.read_text(encoding="utf-8")
        markdown += f"\n\n![R@1 per variant]({png_data_uri(written.plot_path.read_bytes())})\n"
        create_markdown_artifact(markdown=f"# Loss ablation: `{out}`\n\n{markdown}",
                                 key=artifact_key("ablation", out.name[:20], content_key(str(out), length=6)),
                                 description=f"Ablation in `{out}`: mean ± std over seeds per variant, n_pairs.")
