"""Paired retrieval evaluation (METHOD.md section 5): encode a split's images, captions and structure maps, report
t2i / i2t / s2t / t2s / ts2i Recall@K and ranks, write them as JSON; optionally keep the embeddings themselves
(``eval/embeddings.npz``) for the explorer's embedding map, so nothing downstream encodes the split again.

``retrieval_metrics`` and ``retrieval_report`` are re-exported from :mod:`structxlip.metrics`.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from storage.atomic import atomic_write_bytes, atomic_write_text
from structxlip.checkpoint import is_training_checkpoint, load_model_state, read_checkpoint_payload
from structxlip.data import ImagePreprocessor, StructXLIPCollator, StructXLIPDataset, load_records
from structxlip.distributed import resolve_device
from structxlip.metrics import RECALL_KS, retrieval_metrics, retrieval_report
from structxlip.retrieval_ranks import DEFAULT_TOP_K, rank_queries, rankings_document, rankings_entry
from structxlip.app.train import StructXLIPEncoder, autocast_context

__all__ = ["EncodedSplit", "encode_split", "evaluate", "load_model_for_eval", "metrics_table", "retrieval_metrics",
           "retrieval_report", "write_embeddings"]
# Bumped when the stage's outputs change (2: eval/embeddings.npz beside metrics and rankings).
VERSION = "2"
DIRECTIONS = ("t2i", "i2t", "s2t", "t2s", "ts2i")
STRUCTURE_DIRECTIONS = ("s2t", "t2s", "ts2i")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def load_model_for_eval(checkpoint: str | os.PathLike, *, base_model: str, max_text_tokens: int = 248,
                        keep_positions: int = 20):
    """Return a ``LoadedClip`` for a save_pretrained folder, a hub id, a training checkpoint (``.pt`` written by
    :mod:`structxlip.app.train`) or a released StructXLIP ``.pth`` state dict (loaded onto ``base_model``)."""
    from structxlip.models import load_clip, load_structxlip_checkpoint

    path = Path(checkpoint).expanduser()
    if path.is_dir():
        return load_clip(path, max_text_tokens=max_text_tokens, keep_positions=keep_positions)
    if path.is_file():
        if path.suffix.lower() in CHECKPOINT_SUFFIXES:
            payload = read_checkpoint_payload(path)  # weights_only: never unpickles objects
            if is_training_checkpoint(payload):
                run = (payload.get("config") or {}).get("run") or {}
                loaded = load_clip(run.get("clip_model", base_model),
                                   max_text_tokens=run.get("max_text_tokens", max_text_tokens),
                                   keep_positions=run.get("keep_positions", keep_positions))
                load_model_state(loaded.model, payload["model"], path)
                return loaded
        loaded = load_clip(base_model, max_text_tokens=max_text_tokens, keep_positions=keep_positions)
        load_structxlip_checkpoint(loaded.model, path)
        return loaded
    if str(checkpoint).endswith(CHECKPOINT_SUFFIXES + (".safetensors",)):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    return load_clip(str(checkpoint), max_text_tokens=max_text_tokens, keep_positions=keep_positions)


@dataclass
class EncodedSplit:
    """L2-unnormalised float32 embeddings of a split on CPU: ``image``, ``text``, ``structure`` (N, E) and
    ``has_structure`` (N,) bool (structure rows of samples without a map are the black dummy's embedding)."""

    image: Tensor
    text: Tensor
    structure: Tensor
    has_structure: Tensor
    # (T,) long: the image row of each text row when images have several captions (texts N.. are the extra
    # captions); None when texts and images are paired 1:1.
    text_image: Tensor | None = None


@torch.no_grad()
def encode_split(loaded: Any, dataset: StructXLIPDataset, *, batch_size: int = 64, device: torch.device | str = "cpu",
                 precision: str = "auto", max_text_tokens: int = 248, num_workers: int = 0) -> EncodedSplit:
    """Return the embeddings of every item of ``dataset`` (in order), encoded in eval mode without gradients."""
    device = torch.device(device)
    encoder = StructXLIPEncoder(loaded.model).to(device).eval()
    collator = StructXLIPCollator(loaded.tokenizer, max_text_tokens=max_text_tokens, with_negatives=False,
                                  pad_to_longest=True)  # causal text encoder: trailing pads change nothing
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator,
                                         num_workers=num_workers, pin_memory=device.type == "cuda")
    images, texts, structures, flags = [], [], [], []
    for batch in loader:
        batch = batch.to(device)
        with autocast_context(device, precision):
            images.append(encoder.encode_images(batch.pixel_values).float().cpu())
            texts.append(encoder.encode_texts(batch.input_ids, batch.attention_mask).float().cpu())
            structures.append(encoder.encode_images(batch.structure_values).float().cpu())
        flags.append(batch.has_structure.cpu())
    encoded = EncodedSplit(torch.cat(images), torch.cat(texts), torch.cat(structures), torch.cat(flags))
    records = getattr(dataset, "records", None) or []
    extras = [(index, caption) for index, record in enumerate(records)
              for caption, _filtered, _negatives in getattr(record, "extra_captions", ())]
    if extras:  # several captions per image: every caption is a text query (the standard protocol)
        extra_texts = []
        for start in range(0, len(extras), batch_size):
            ids, mask = collator.tokenize([caption for _, caption in extras[start:start + batch_size]])
            with autocast_context(device, precision):
                extra_texts.append(encoder.encode_texts(ids.to(device), mask.to(device)).float().cpu())
        encoded.text = torch.cat([encoded.text, *extra_texts])
        encoded.text_image = torch.cat([torch.arange(len(encoded.image)),
                                        torch.tensor([index for index, _ in extras], dtype=torch.long)])
    return encoded


def split_report(encoded: EncodedSplit) -> dict[str, float]:
    """Return retrieval_report's metrics; structure directions use only the samples that have a structure map.

    ``n_pairs`` counts the images, ``n_texts`` the captions (more than ``n_pairs`` when images have several: then
    t2i ranks every caption and i2t counts a hit when any of the image's captions is within K; with one caption per
    image these are the 1:1 numbers)."""
    text_image = encoded.text_image
    report: dict[str, float] = {"n_pairs": int(encoded.image.shape[0]), "n_texts": int(encoded.text.shape[0])}
    mask = encoded.has_structure
    count = int(mask.sum())
    report["n_structure_pairs"] = count
    if count == len(mask):
        report.update(retrieval_report(encoded.image, encoded.text, encoded.structure, text_image=text_image))
        return report
    report.update(retrieval_report(encoded.image, encoded.text, text_image=text_image))
    if count:
        if text_image is None:
            subset = retrieval_report(encoded.image[mask], encoded.text[mask], encoded.structure[mask])
        else:  # keep the texts of the images with a map, renumbered to the kept images
            renumber = torch.cumsum(mask.long(), 0) - 1
            kept_texts = mask[text_image]
            subset = retrieval_report(encoded.image[mask], encoded.text[kept_texts], encoded.structure[mask],
                                      text_image=renumber[text_image[kept_texts]])
        report.update({key: value for key, value in subset.items() if key.split("/")[0] in STRUCTURE_DIRECTIONS})
    return report


def metrics_table(metrics: dict) -> str:
    """Return a markdown table: one row per retrieval direction with its number of pairs ``n`` (structure
    directions count only the samples with a structure map; t2i counts the captions), R@K, mean and median rank."""
    columns = [f"R@{k}" for k in RECALL_KS] + ["mean_rank", "median_rank"]
    lines = ["| direction | n | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for direction in DIRECTIONS:
        if f"{direction}/R@1" not in metrics:
            continue
        pairs = metrics.get("n_structure_pairs" if direction in STRUCTURE_DIRECTIONS else "n_pairs", "")
        if direction == "t2i":  # one query per caption (more than the images when they have several)
            pairs = metrics.get("n_texts", pairs)
        cells = [f"{metrics[f'{direction}/{column}']:.2f}" for column in columns]
        lines.append(f"| {direction} | {pairs} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_embeddings(path: str | os.PathLike, image_ids: list[str], models: dict[str, EncodedSplit], *,
                     split: str) -> None:
    """Write the split's embeddings atomically as ``.npz``: ``image_ids (N,)`` str, ``models (M,)`` str, ``split``,
    ``has_structure (N,)`` bool and per model ``<model>/image``, ``<model>/structure``, ``<model>/text``
    ``(N, E)`` float16, L2-normalised (text: each image's first caption; float16 keeps 10,000 images x 512 dims x 3
    kinds at ~31 MB per model and is ample for a 2-D map or cosine neighbours)."""
    from structxlip.losses import normalize

    arrays = {"image_ids": np.asarray(image_ids, dtype=str), "models": np.asarray(list(models), dtype=str),
              "split": np.asarray(split)}
    for name, encoded in models.items():
        count = encoded.image.shape[0]
        arrays["has_structure"] = encoded.has_structure.numpy().astype(bool)
        for kind, tensor in (("image", encoded.image), ("structure", encoded.structure),
                             ("text", encoded.text[:count])):  # texts beyond N are extra captions
            arrays[f"{name}/{kind}"] = normalize(tensor.float()).numpy().astype(np.float16)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def encode_records(loaded: Any, records: list, *, batch_size: int, device: str, precision: str, max_text_tokens: int,
                   num_workers: int) -> EncodedSplit:
    """Encode evaluation ``records`` (images, captions, structure maps; no chunks or crops) with a loaded model."""
    dataset = StructXLIPDataset(records, preprocess=ImagePreprocessor.from_image_processor(loaded.image_processor),
                                with_chunks=False, with_crops=False)
    return encode_split(loaded, dataset, batch_size=batch_size, device=resolve_device(device), precision=precision,
                        max_text_tokens=max_text_tokens, num_workers=num_workers)


def evaluate(
    manifest: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike,
    base_model: str,
    out_path: str | os.PathLike | None = None,
    split: str = "test",
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "auto",
    max_text_tokens: int = 248,
    keep_positions: int = 20,
    structure_kind: str = "canny",
    num_workers: int = 0,
    root: str | os.PathLike | None = None,
    zero_shot: bool = False,
    rankings_path: str | os.PathLike | None = None,
    top_k: int | None = None,
    embeddings_path: str | os.PathLike | None = None,
) -> dict:
    """Evaluate ``checkpoint`` on the manifest's ``split`` (``all`` = every usable row); write the metrics JSON
    atomically to ``out_path`` when given and return them.

    ``root``: the folder that relative paths of a reference ``.json`` are relative to (default: the JSON's folder).
    ``zero_shot``: also evaluate ``base_model`` before fine-tuning, as ``metrics["zero_shot"]`` (same keys), unless
    the checkpoint is the base model itself. ``precision``: ``fp32``, ``bf16`` or ``auto`` (bf16 on CUDA).
    ``rankings_path``: also write the per-query rankings there (``structxlip.retrieval_ranks``: "fine-tuned", and
    "zero-shot" with ``zero_shot``; ``top_k`` each) from the same embeddings, so the split is encoded once per model.
    ``embeddings_path``: also write those embeddings there (:func:`write_embeddings`, same model names).
    """
    top_k = top_k or DEFAULT_TOP_K
    rankings: dict[str, dict] = {}
    embeddings: dict[str, EncodedSplit] = {}
    records = load_records(manifest, split=None if split == "all" else split, structure_kind=structure_kind, top_k=0,
                           root=root)
    if len(records) < 2:
        raise ValueError(f"{manifest}: retrieval needs at least 2 pairs in split {split!r}, found {len(records)}")

    def report(name: str, model: str | os.PathLike, loaded: Any) -> dict:
        """Return one model's metrics, keeping its rankings and embeddings where asked (the model is freed after)."""
        encoded = encode_records(loaded, records, batch_size=batch_size, device=device, precision=precision,
                                 max_text_tokens=max_text_tokens, num_workers=num_workers)
        if rankings_path is not None:
            rankings[name] = rankings_entry(rank_queries(encoded.text, encoded.image, top_k=top_k),
                                            checkpoint=str(model))
        if embeddings_path is not None:
            embeddings[name] = encoded
        return split_report(encoded)

    metrics = report("fine-tuned", checkpoint, load_model_for_eval(
        checkpoint, base_model=base_model, max_text_tokens=max_text_tokens, keep_positions=keep_positions))
    if zero_shot and str(checkpoint) != str(base_model):
        from structxlip.models import load_clip

        metrics["zero_shot"] = report("zero-shot", base_model, load_clip(
            base_model, max_text_tokens=max_text_tokens, keep_positions=keep_positions))
    if rankings_path is not None:
        document = rankings_document([r.image_id for r in records], rankings, split=split, top_k=top_k)
        atomic_write_text(rankings_path, json.dumps(document) + "\n")
    if embeddings_path is not None:
        write_embeddings(embeddings_path, [r.image_id for r in records], embeddings, split=split)
    if out_path is not None:
        atomic_write_text(out_path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics


def compute_rankings(
    manifest: str | os.PathLike,
    *,
    models: dict[str, str | os.PathLike],
    base_model: str,
    out_path: str | os.PathLike | None = None,
    split: str = "test",
    top_k: int = DEFAULT_TOP_K,
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "auto",
    max_text_tokens: int = 248,
    keep_positions: int = 20,
    structure_kind: str = "canny",
    num_workers: int = 0,
) -> dict:
    """Return (and write atomically to ``out_path`` when given) the text-to-image rankings of every model in
    ``models`` (display name -> checkpoint, as :func:`load_model_for_eval` takes) on the same
    split, queries being the images' raw captions, as evaluate's t2i direction uses them."""
    if not models:
        raise ValueError("expected at least one model to rank with, got none")
    records = load_records(manifest, split=None if split == "all" else split, structure_kind=structure_kind, top_k=0)
    if len(records) < 2:
        raise ValueError(f"{manifest}: rankings need at least 2 pairs in split {split!r}, found {len(records)}")
    entries = {}
    for name, checkpoint in models.items():
        loaded = load_model_for_eval(checkpoint, base_model=base_model, max_text_tokens=max_text_tokens,
                                     keep_positions=keep_positions)
        encoded = encode_records(loaded, records, batch_size=batch_size, device=device, precision=precision,
                                 max_text_tokens=max_text_tokens, num_workers=num_workers)
        rankings = rank_queries(encoded.text, encoded.image, top_k=top_k)
        entries[name] = rankings_entry(rankings, checkpoint=str(checkpoint))
    result = rankings_document([r.image_id for r in records], entries, split=split, top_k=top_k)
    if out_path is not None:
        atomic_write_text(out_path, json.dumps(result) + "\n")
    return result
