"""Library subcommands of the ``structxlip`` CLI (train, evaluate, rankings, report, select, export-json, import-json,
export-checkpoint, build-tiny-clip, make-benchmark, ablate).

Each handler validates the config once and passes explicit keyword arguments to the library.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


# The command-line flags that override config keys, so that a bad value is blamed on the flag the user typed.
_FLAGS = {"train.epochs": "--epochs", "train.device": "--device", "train.batch_size": "--batch-size",
          "evaluate.split": "--split", "evaluate.device": "--device", "train.precision": "--precision",
          "evaluate.zero_shot": "--no-zero-shot"}


def _load_config(args: argparse.Namespace, overrides: dict | None = None, *, out_dir: Path | None = None):
    """Return the command's config: ``--config``, else (for a command reading a pipeline output folder ``out_dir``)
    the config that folder's run recorded in OUT/config.yaml, as ``structxlip run`` uses it, else the defaults;
    the command's flags applied on top (their errors name the flag)."""
    from configs import load_config

    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if args.config is None and out_dir is not None and (out_dir / "manifest").is_dir():
        from pipelines.engine.plan import resolve_config

        return resolve_config(out_dir, None, overrides, overrides_source=_FLAGS)[0]
    return load_config(args.config, overrides, overrides_source=_FLAGS)


def _train(args: argparse.Namespace) -> int:
    from pipelines.engine.stages import STAGE_DEFINITIONS
    from storage import lock
    from storage.layout import OutputLayout
    from structxlip.app.train import train, train_arguments

    config = _load_config(args, {"train.epochs": args.epochs, "train.device": args.device,
                                 "train.batch_size": args.batch_size})
    stage = STAGE_DEFINITIONS["train"]  # the same parameters the pipeline's train stage passes
    arguments = train_arguments(config.model.clip_model, stage.params(config).train, stage.runtime(config))
    with lock.output_lock(OutputLayout(args.out)):
        result = train(args.manifest, args.out, **arguments, resume=args.resume, max_steps=args.max_steps,
                       config=config.model_dump(mode="json"), progress=not args.no_progress)
    skipped = f", {result.skipped_steps} skipped (non-finite loss)" if result.skipped_steps else ""
    print(f"trained {result.epochs_completed}/{config.train.epochs} epochs, {result.steps} steps{skipped}; "
          f"checkpoint {result.checkpoint}")
    if result.model_dir is not None:
        print(f"model: {result.model_dir}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import contextlib

    from pipelines.engine.stages import STAGE_DEFINITIONS
    from storage import lock
    from storage.manifest import manifest_root
    from structxlip.app.evaluate import evaluate, metrics_table

    root = manifest_root(args.manifest)
    config = _load_config(args, {"evaluate.split": args.split, "evaluate.device": args.device,
                                 "train.precision": args.precision,
                                 "evaluate.zero_shot": False if args.no_zero_shot else None}, out_dir=root.root)
    out_path = Path(args.out).resolve() if args.out else root.eval_metrics
    stage = STAGE_DEFINITIONS["evaluate"]  # the same parameters the pipeline's evaluate stage passes
    # Writing into a pipeline's output folder takes its lock, like every other writer of that folder.
    with lock.output_lock(root) if root.root in out_path.parents else contextlib.nullcontext():
        metrics = evaluate(args.manifest, checkpoint=args.checkpoint or config.model.clip_model, out_path=out_path,
                           root=args.root, **stage.params(config).model_dump(), **stage.runtime(config))
    print(metrics_table(metrics))
    if "zero_shot" in metrics:
        print(f"\nzero-shot ({config.model.clip_model}, before fine-tuning):")
        print(metrics_table(metrics["zero_shot"]))
    print(f"\n{metrics['n_pairs']} pairs ({metrics['n_structure_pairs']} with a structure map); metrics: {out_path}")
    return 0


def _rankings(args: argparse.Namespace) -> int:
    from storage.manifest import manifest_root
    from structxlip.app.evaluate import compute_rankings

    layout = manifest_root(args.manifest)
    config = _load_config(args, {"evaluate.split": args.split, "evaluate.device": args.device}, out_dir=layout.root)
    models = dict(_model_choice(text) for text in args.model or [])
    if not models:
        models = {"zero-shot": config.model.clip_model}
        if layout.model_dir.is_dir():
            models["fine-tuned"] = str(layout.model_dir)
    out_path = Path(args.out) if args.out else layout.eval_rankings
    result = compute_rankings(
        args.manifest, models=models, base_model=config.model.clip_model, out_path=out_path,
        split=config.evaluate.split, top_k=args.top_k, batch_size=config.evaluate.batch_size,
        device=config.evaluate.device, precision=config.train.precision, max_text_tokens=config.train.max_text_tokens,
        keep_positions=config.train.keep_positions, structure_kind=config.train.structure_kind,
        num_workers=config.train.num_workers,
    )
    for name, entry in result["models"].items():
        hits = sum(1 for rank in entry["ranks"] if rank == 1)
        print(f"{name}: {hits}/{len(entry['ranks'])} queries find their own image first ({entry['checkpoint']})")
    print(f"rankings: {out_path}")
    return 0


def _model_choice(text: str) -> tuple[str, str]:
    name, sep, checkpoint = text.partition("=")
    if not sep or not name.strip() or not checkpoint.strip():
        raise SystemExit(f"structxlip rankings: error: expected --model NAME=CHECKPOINT, got {text!r}")
    return name.strip(), checkpoint.strip()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _report(args: argparse.Namespace) -> int:
    from pipelines.reporting.report import write_report

    config = _load_config(args)
    result = write_report(args.out, vocab_dir=config.filter.vocab_dir, thumbnail_px=args.thumbnail_px,
                          max_edge_maps=args.max_edge_maps, page_size=args.page_size, max_rows=args.max_rows,
                          compare=args.compare or ())
    shown = f"{result.rows} images" if result.rows >= result.total else f"{result.rows} of {result.total} images"
    print(f"report of {shown} ({result.html_bytes / 1e6:.1f} MB, {result.thumbnails_written} new "
          f"thumbnails, {result.thumbnails_reused} reused, {result.seconds:.1f} s): {result.path}")
    return 0


def _select(args: argparse.Namespace) -> int:
    from collections import Counter

    from storage.selection import read_ids, select_manifest

    if not args.parquet and not args.json:
        raise SystemExit("structxlip select: error: expected --parquet FILE and/or --json FILE to write")
    selection = select_manifest(args.manifest, read_ids(args.ids), parquet_path=args.parquet, json_path=args.json,
                                split=args.split)
    splits = ", ".join(f"{n} {s}" for s, n in sorted(Counter(r.get("split") or "none" for r in selection.rows).items()))
    print(f"selected {len(selection.rows)} images ({splits})")
    if selection.parquet_path:
        print(f"manifest subset: {selection.parquet_path}  (structxlip train {selection.parquet_path} --out RUN)")
    if selection.json_path:
        print(f"reference JSON: {selection.json_path} ({selection.json_records} records)")
    return 0


def _export_json(args: argparse.Namespace) -> int:
    from storage.reference_json import export_reference_json

    print(f"wrote {export_reference_json(args.manifest, args.output, split=args.split)} records to {args.output}")
    return 0


def _import_json(args: argparse.Namespace) -> int:
    from storage import lock
    from storage.layout import OutputLayout
    from storage.reference_json import import_reference_json

    with lock.output_lock(OutputLayout(args.out)):
        result = import_reference_json(args.input, args.out, root=args.root, split=args.split,
                                       overwrite=args.overwrite)
    for index, reason in result.rejected[:20]:
        print(f"rejected item {index}: {reason}", file=sys.stderr)
    if len(result.rejected) > 20:
        print(f"... and {len(result.rejected) - 20} more rejected items", file=sys.stderr)
    print(f"imported {len(result.rows)} records ({len(result.rejected)} rejected) into {result.manifest_path}")
    return 0


def _export_checkpoint(args: argparse.Namespace) -> int:
    from structxlip.models import export_reference_checkpoint

    exported = export_reference_checkpoint(args.source, args.output, max_text_tokens=args.max_text_tokens)
    print(f"wrote {exported.keys} tensors ({exported.text_positions} text positions) to {exported.path}")
    return 0


def _build_tiny_clip(args: argparse.Namespace) -> int:
    from structxlip.models import build_tiny_clip

    print(f"tiny CLIP written to {build_tiny_clip(args.out_dir, seed=args.seed)}")
    return 0


def _make_benchmark(args: argparse.Namespace) -> int:
    from structxlip.app.shapes_benchmark import make_benchmark

    benchmark = make_benchmark(args.out, images=args.images, seed=args.seed, test_fraction=args.test_fraction,
                               image_size=args.image_size)
    counts = ", ".join(f"{split} {count} in {benchmark.split_dirs[split]}" for split, count in benchmark.counts.items())
    print(f"benchmark written to {benchmark.root}: {counts}")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from pipelines.engine.stages import ablation_arguments
    from storage import lock
    from storage.layout import OutputLayout
    from structxlip.app.ablate import ablate, parse_variants, prepare_data

    config = _load_config(args, {"train.epochs": args.epochs, "train.device": args.device,
                                 "evaluate.device": args.device})
    variants = parse_variants(args.variants)
    if args.seeds < 1:
        raise ValueError(f"expected --seeds >= 1, got {args.seeds}")
    objective, train_options, eval_options = ablation_arguments(config)
    train_options["progress"] = not args.no_progress
    out = Path(args.out).expanduser()
    command = "structxlip ablate " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else None
    with lock.output_lock(OutputLayout(out)):  # one writer per output folder, like every other command
        data = prepare_data(args.source, out / "data", config_path=args.config)
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
    train.add_argument("--resume", action="store_true",
                       help="continue exactly from OUT/train/checkpoints/last.pt (an error if there is none)")
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
    evaluate.add_argument("--config", help="YAML config (default: the config the pipeline run that made the manifest's "
                                           "output folder recorded in OUT/config.yaml, else the defaults)")
    evaluate.add_argument("--device", help="override evaluate.device")
    evaluate.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                          help="override train.precision for encoding (auto: bf16 on CUDA, fp32 on CPU)")
    evaluate.add_argument("--root", help="folder that relative paths in a reference .json are relative to "
                                         "(default: the JSON's folder)")
    evaluate.add_argument("--no-zero-shot", action="store_true",
                          help="skip the zero-shot row (model.clip_model before fine-tuning) in the metrics")
    evaluate.set_defaults(handler=_evaluate)

    rankings = subparsers.add_parser(
        "rankings", help="each text query's top-k images per model (zero-shot and fine-tuned) for the report",
        description="Rank the split's images for every caption with each model and write OUT/eval/rankings.json, "
                    "which `structxlip report` shows as the retrieval explorer. Default models: zero-shot "
                    "(model.clip_model) and fine-tuned (OUT/train/model, when it exists).")
    rankings.add_argument("manifest", help="OUT folder, OUT/manifest or a manifest Parquet file")
    rankings.add_argument("--model", action="append", metavar="NAME=CHECKPOINT",
                          help="a model to rank with (repeatable), e.g. zero-shot=openai/clip-vit-base-patch16")
    rankings.add_argument("--top-k", type=int, default=10, help="images listed per query (default: 10)")
    rankings.add_argument("--split", choices=["train", "val", "test", "all"], help="override evaluate.split")
    rankings.add_argument("--out", help="JSON path (default: OUT/eval/rankings.json)")
    rankings.add_argument("--config", help="YAML config (default: OUT/config.yaml of the manifest's pipeline run, else "
                                           "the defaults)")
    rankings.add_argument("--device", help="override evaluate.device")
    rankings.set_defaults(handler=_rankings)

    report = subparsers.add_parser(
        "report", help="write OUT/report/index.html: manifest browser, quality report, training, retrieval",
        description="Write a static explorer of an output folder to OUT/report/index.html (opens from disk, no "
                    "server): a paged, filterable manifest browser with structure maps, region boxes, crops, "
                    "removed words and hard negatives; the dataset quality report; training curves; and, given "
                    "OUT/eval/rankings.json (`structxlip rankings`), each query's top images per model.")
    report.add_argument("out", help="output folder of a pipeline run (holds manifest/)")
    report.add_argument("--config", help="YAML config (its filter.vocab_dir groups removed words by category)")
    report.add_argument("--thumbnail-px", type=int, default=256, help="long side of image thumbnails (default: 256)")
    report.add_argument("--max-edge-maps", type=int, default=2000,
                        help="structure maps read for the edge-density statistics (default: 2000, spread evenly)")
    report.add_argument("--page-size", type=int, default=24, help="images per page in the browser (default: 24)")
    report.add_argument("--max-rows", type=_positive_int, default=10_000,
                        help="the most images the page carries (default: 10000); a larger manifest is shown as a "
                             "sample: the evaluated and failed images first, then those with the smallest image ids. "
                             "The quality report always counts every image")
    report.add_argument("--compare", action="append", metavar="OTHER_OUT",
                        help="another run's output folder of the same images, shown side by side with metric "
                             "deltas and the config keys that differ (repeatable)")
    report.set_defaults(handler=_report)

    select = subparsers.add_parser(
        "select", help="write the images of an ids file (an explorer export) as a manifest subset or reference JSON",
        description="Keep the manifest rows whose image id is listed in IDS (one per line: the explorer's "
                    "\"export ids\"), as a Parquet manifest with absolute paths that `structxlip train` and "
                    "`structxlip evaluate` read directly, and/or as the reference trainer's JSON.")
    select.add_argument("manifest", help="OUT folder, OUT/manifest or a manifest Parquet file")
    select.add_argument("--ids", required=True, help="text file of image ids, one per line (# comments allowed)")
    select.add_argument("--parquet", help="manifest subset to write (.parquet)")
    select.add_argument("--json", help="reference-format JSON to write")
    select.add_argument("--split", choices=["train", "val", "test"],
                        help="put every selected image in this split (train: train on the whole selection); "
                             "default: keep each image's split")
    select.set_defaults(handler=_select)

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

    exported = subparsers.add_parser(
        "export-checkpoint", help="write a model as the plain CLIP state dict the reference trainer's tools load",
        description="Write MODEL_DIR (save_pretrained folder) or a training checkpoint (last.pt) as a plain "
                    "CLIPModel state dict (.pth, no key prefix, 248 text positions) for the reference trainer's "
                    "retrieval.py --ckpt and train.py.")
    exported.add_argument("source", help="model folder (OUT/train/model) or training checkpoint (.pt)")
    exported.add_argument("output", help=".pth file to write")
    exported.add_argument("--max-text-tokens", type=int, default=248, help="text positions (default: 248)")
    exported.set_defaults(handler=_export_checkpoint)

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
