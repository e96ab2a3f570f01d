"""Library subcommands of the ``structxlip`` CLI (train, evaluate, export-json, import-json, build-tiny-clip,
make-benchmark, ablate).

Each handler validates the config once and passes explicit keyword arguments to the library.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _load_config(args: argparse.Namespace, overrides: dict | None = None):
    from configs import load_config

    return load_config(args.config, {k: v for k, v in (overrides or {}).items() if v is not None})


def _train(args: argparse.Namespace) -> int:
    from structxlip.train import Objective, train

    config = _load_config(args, {"train.epochs": args.epochs, "train.device": args.device,
                                 "train.batch_size": args.batch_size})
    t = config.train
    objective = Objective(
        lambda_global=t.lambda_global, lambda_structure_centric=t.lambda_structure_centric,
        lambda_consistency=t.lambda_consistency, lambda_local=t.lambda_local,
        lambda_hard_negative=t.lambda_hard_negative, warm=t.warm, decay_start=t.decay_start, decay_end=t.decay_end,
        floor_structure_centric=t.floor_structure_centric, floor_consistency=t.floor_consistency,
        floor_local=t.floor_local, warmup_structure_epochs=t.warmup_structure_epochs, chunk_tau=t.chunk_tau,
    )
    result = train(
        args.manifest, args.out, clip_model=config.model.clip_model, objective=objective, epochs=t.epochs,
        batch_size=t.batch_size, lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        logit_scale_min=t.logit_scale_min, logit_scale_max=t.logit_scale_max, max_text_tokens=t.max_text_tokens,
        keep_positions=t.keep_positions, structure_kind=t.structure_kind, chunk_top_k=t.chunk_top_k,
        chunk_base_window=t.chunk_base_window, chunk_stride=t.chunk_stride, max_chunks=t.max_chunks,
        precision=t.precision, device=t.device, num_workers=t.num_workers,
        checkpoint_every_steps=t.checkpoint_every_steps, seed=t.seed, resume=args.resume, max_steps=args.max_steps,
        config=config.model_dump(mode="json"), progress=not args.no_progress,
    )
    skipped = f", {result.skipped_steps} skipped (non-finite loss)" if result.skipped_steps else ""
    print(f"trained {result.epochs_completed}/{t.epochs} epochs, {result.steps} steps{skipped}; "
          f"checkpoint {result.checkpoint}")
    if result.model_dir is not None:
        print(f"model: {result.model_dir}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from storage.manifest import manifest_root
    from structxlip.evaluate import evaluate, metrics_table

    config = _load_config(args, {"evaluate.split": args.split, "evaluate.device": args.device})
    out_path = Path(args.out) if args.out else manifest_root(args.manifest).eval_metrics
    metrics = evaluate(
        args.manifest, checkpoint=args.checkpoint or config.model.clip_model, base_model=config.model.clip_model,
        out_path=out_path, split=config.evaluate.split, batch_size=config.evaluate.batch_size,
        device=config.evaluate.device, precision=config.train.precision, max_text_tokens=config.train.max_text_tokens,
        keep_positions=config.train.keep_positions, structure_kind=config.train.structure_kind,
        num_workers=config.train.num_workers,
    )
    print(metrics_table(metrics))
    print(f"\n{metrics['n_pairs']} pairs ({metrics['n_structure_pairs']} with a structure map); metrics: {out_path}")
    return 0


def _export_json(args: argparse.Namespace) -> int:
    from storage.reference_json import export_reference_json

    count = export_reference_json(args.manifest, args.output, split=args.split)
    print(f"wrote {count} records to {args.output}")
    return 0


def _import_json(args: argparse.Namespace) -> int:
    from storage.reference_json import import_reference_json

    result = import_reference_json(args.input, args.out, root=args.root, split=args.split, overwrite=args.overwrite)
    for index, reason in result.rejected[:20]:
        print(f"rejected item {index}: {reason}", file=sys.stderr)
    if len(result.rejected) > 20:
        print(f"... and {len(result.rejected) - 20} more rejected items", file=sys.stderr)
    print(f"imported {len(result.rows)} records ({len(result.rejected)} rejected) into {result.manifest_path}")
    return 0


def _build_tiny_clip(args: argparse.Namespace) -> int:
    from structxlip.models import build_tiny_clip

    path = build_tiny_clip(args.out_dir, seed=args.seed)
    print(f"tiny CLIP written to {path}")
    return 0


def _make_benchmark(args: argparse.Namespace) -> int:
    from structxlip.shapes_benchmark import make_benchmark

    benchmark = make_benchmark(args.out, images=args.images, seed=args.seed, test_fraction=args.test_fraction,
                               image_size=args.image_size)
    counts = ", ".join(f"{split} {count} in {benchmark.split_dirs[split]}" for split, count in benchmark.counts.items())
    print(f"benchmark written to {benchmark.root}: {counts}")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from structxlip.ablate import ablate, parse_variants, prepare_data
    from structxlip.train import Objective

    config = _load_config(args, {"train.epochs": args.epochs, "train.device": args.device,
                                 "evaluate.device": args.device})
    variants = parse_variants(args.variants)
    if args.seeds < 1:
        raise ValueError(f"expected --seeds >= 1, got {args.seeds}")
    t = config.train
    objective = Objective(
        lambda_global=t.lambda_global, lambda_structure_centric=t.lambda_structure_centric,
        lambda_consistency=t.lambda_consistency, lambda_local=t.lambda_local,
        lambda_hard_negative=t.lambda_hard_negative, warm=t.warm, decay_start=t.decay_start, decay_end=t.decay_end,
        floor_structure_centric=t.floor_structure_centric, floor_consistency=t.floor_consistency,
        floor_local=t.floor_local, warmup_structure_epochs=t.warmup_structure_epochs, chunk_tau=t.chunk_tau,
    )
    train_options = dict(
        epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        logit_scale_min=t.logit_scale_min, logit_scale_max=t.logit_scale_max, max_text_tokens=t.max_text_tokens,
        keep_positions=t.keep_positions, structure_kind=t.structure_kind, chunk_top_k=t.chunk_top_k,
        chunk_base_window=t.chunk_base_window, chunk_stride=t.chunk_stride, max_chunks=t.max_chunks,
        precision=t.precision, device=t.device, num_workers=t.num_workers,
        checkpoint_every_steps=t.checkpoint_every_steps, config=config.model_dump(mode="json"),
        progress=not args.no_progress,
    )
    eval_options = dict(
        batch_size=config.evaluate.batch_size, device=config.evaluate.device,
        precision=t.precision, max_text_tokens=t.max_text_tokens, keep_positions=t.keep_positions,
        structure_kind=t.structure_kind, num_workers=t.num_workers,
    )
    out = Path(args.out).expanduser()
    data = prepare_data(args.source, out / "data", config_path=args.config)
    command = "structxlip ablate " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else None
    result = ablate(data, out, clip_model=config.model.clip_model, variants=variants,
                    seeds=list(range(args.seed_start, args.seed_start + args.seeds)), objective=objective,
                    train_options=train_options, eval_options=eval_options, command=command)
    print(result.markdown_path.read_text(encoding="utf-8"))
    print(f"table: {result.json_path}, {result.markdown_path}; plot: {result.plot_path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the library's subcommands to the top-level parser."""
    train = subparsers.add_parser("train", help="fine-tune CLIP with the StructXLIP objective on a manifest",
                                  description="Fine-tune on the manifest's train split (torchrun for multi-GPU).")
    train.add_argument("manifest", help="OUT folder, OUT/manifest, a manifest Parquet file, or a reference .json")
    train.add_argument("--out", required=True, help="output folder (checkpoints, metrics, model under OUT/train)")
    train.add_argument("--config", help="YAML config (defaults: the published settings)")
    train.add_argument("--resume", action="store_true", help="continue exactly from OUT/train/checkpoints/last.pt")
    train.add_argument("--epochs", type=int, help="override train.epochs")
    train.add_argument("--batch-size", type=int, help="override train.batch_size (per process)")
    train.add_argument("--device", help="override train.device (auto, cpu, cuda, cuda:1)")
    train.add_argument("--max-steps", type=int, help="stop after this many steps in this run (checkpointed)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(handler=_train)

    evaluate = subparsers.add_parser("evaluate", help="paired retrieval metrics of a model on a manifest split")
    evaluate.add_argument("manifest", help="OUT folder, OUT/manifest, a manifest Parquet file, or a reference .json")
    evaluate.add_argument("--checkpoint", help="save_pretrained folder, hub id, training checkpoint .pt, or released "
                                               "StructXLIP .pth (default: model.clip_model, i.e. zero-shot)")
    evaluate.add_argument("--split", choices=["train", "val", "test", "all"], help="override evaluate.split")
    evaluate.add_argument("--out", help="metrics JSON path (default: OUT/eval/metrics.json of the manifest)")
    evaluate.add_argument("--config", help="YAML config")
    evaluate.add_argument("--device", help="override evaluate.device")
    evaluate.set_defaults(handler=_evaluate)

    export = subparsers.add_parser("export-json", help="write a manifest as the reference trainer's JSON")
    export.add_argument("manifest", help="OUT folder, OUT/manifest or a manifest Parquet file")
    export.add_argument("output", help="JSON file to write")
    export.add_argument("--split", help="only this split (default: all usable rows)")
    export.set_defaults(handler=_export_json)

    imported = subparsers.add_parser("import-json", help="read a reference-trainer JSON into OUT/manifest/")
    imported.add_argument("input", help="reference JSON file")
    imported.add_argument("--out", required=True, help="output folder; the manifest goes to OUT/manifest/")
    imported.add_argument("--root", help="folder that relative paths in the JSON are relative to (default: its folder)")
    imported.add_argument("--split", default="train", help="split for records without one (default: train)")
    imported.add_argument("--overwrite", action="store_true", help="replace an existing manifest in OUT")
    imported.set_defaults(handler=_import_json)

    tiny = subparsers.add_parser("build-tiny-clip", help="write a tiny random CLIP (real tokenizer) for tests/demos")
    tiny.add_argument("out_dir", help="folder to write (replaced if it exists)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(handler=_build_tiny_clip)

    benchmark = subparsers.add_parser(
        "make-benchmark", help="write the generated shapes benchmark (structure decides, colour/texture mislead)",
        description="Write OUT/train and OUT/test image folders (PNG + captions.jsonl) of 1-3 shapes over textured "
                    "backgrounds; the test split's colour and texture statistics differ from training.")
    benchmark.add_argument("out", help="folder to write")
    benchmark.add_argument("--images", type=int, required=True, help="number of images (train + test)")
    benchmark.add_argument("--seed", type=int, default=0)
    benchmark.add_argument("--test-fraction", type=float, default=0.2, help="share held out for testing (0.2)")
    benchmark.add_argument("--image-size", type=int, default=128, help="image side in pixels (128)")
    benchmark.set_defaults(handler=_make_benchmark)

    ablation = subparsers.add_parser(
        "ablate", help="train and evaluate the loss variants (zero-shot ... full) over seeds; write a table + plot",
        description="From the same initial weights and data order, train every variant and evaluate all on the same "
                    "held-out pairs (t2i, i2t, s2t, t2s, ts2i). Finished runs are skipped, unfinished ones resume.")
    ablation.add_argument("source", metavar="IMAGES_OR_MANIFEST",
                          help="a make-benchmark folder, an image folder (the data stages run once) or a manifest")
    ablation.add_argument("--out", required=True, help="output folder (data/, runs/VARIANT/seed-S/, ablation.*)")
    ablation.add_argument("--config", help="YAML config (e.g. configs/ablation-small.yaml)")
    ablation.add_argument("--variants", help="comma-separated subset of zero-shot, global, global+structure_centric, "
                                             "global+consistency, global+local, full (default: all)")
    ablation.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    ablation.add_argument("--seed-start", type=int, default=0, help="first seed (default 0)")
    ablation.add_argument("--epochs", type=int, help="override train.epochs")
    ablation.add_argument("--device", help="override train.device and evaluate.device")
    ablation.add_argument("--no-progress", action="store_true", help="no progress bars")
    ablation.set_defaults(handler=_ablate)
