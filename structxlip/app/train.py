"""StructXLIP fine-tuning (METHOD.md section 4): the objective, the training loop, resumable checkpoints and DDP.

total = lambda_global * global (left out during the first ``warmup_structure_epochs``)
      + l_sc(e) * structure_centric + l_rs(e) * consistency + l_lsc(e) * local
      (+ lambda_hard_negative * hard_negative when the data has hard negatives and the weight is > 0)

Photos, structure maps and structure crops all go through the same image encoder; chunk embeddings pool the
*filtered* caption's token states (the text the chunk spans were computed on), or with ``local_pooling="reference"``
the unfiltered caption's states at the same spans, as the reference trainer does (METHOD.md section 4).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from storage.atomic import atomic_directory, atomic_write_text, storage_error_from
from storage.layout import OutputLayout
from structxlip.checkpoint import (
    TrainingCheckpoint,
    capture_rng_state,
    link_or_copy,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from structxlip.data import (
    ImagePreprocessor,
    StructXLIPBatch,
    StructXLIPCollator,
    StructXLIPDataset,
    load_records,
)
from structxlip.distributed import (
    DistributedContext,
    EpochBatchSampler,
    any_rank,
    barrier,
    gather_no_grad,
    gather_with_grad,
    init_distributed,
    shutdown_distributed,
)
from structxlip.app.faults import kill_now, kill_point, kill_requested
from structxlip.losses import (
    ChunkEmbeddings,
    global_loss,
    hard_negative_loss,
    local_structure_centric_loss,
    pool_chunk_embeddings,
    rgb_structure_consistency_loss,
    structure_centric_loss,
)
from structxlip.schedules import cosine_lr, warm_cosine_weight

# Bump when this module's results change: it enters the cache key of every stage that imports it.
VERSION = "1"

logger = logging.getLogger(__name__)
LOSS_NAMES = ("global", "structure_centric", "consistency", "local", "hard_negative")
LOCAL_POOLING = ("filtered", "reference")


# ---- objective ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Objective:
    """Base loss weights and their epoch schedule (published defaults, METHOD.md section 4)."""

    lambda_global: float = 1.0
    lambda_structure_centric: float = 0.5
    lambda_consistency: float = 0.05
    lambda_local: float = 0.1
    lambda_hard_negative: float = 0.0
    warm: int = 1
    decay_start: int = 1
    decay_end: int = 8
    floor_structure_centric: float = 0.7
    floor_consistency: float = 0.5
    floor_local: float = 0.4
    warmup_structure_epochs: int = 0
    chunk_tau: float = 0.07

    def weights(self, epoch: int) -> dict[str, float]:
        """Return the weight of every loss term in 0-based ``epoch``."""

        def scheduled(base: float, floor: float) -> float:
            return warm_cosine_weight(base, epoch, self.warm, self.decay_start, self.decay_end, floor)

        return {
            "global": 0.0 if epoch < self.warmup_structure_epochs else self.lambda_global,
            "structure_centric": scheduled(self.lambda_structure_centric, self.floor_structure_centric),
            "consistency": scheduled(self.lambda_consistency, self.floor_consistency),
            "local": scheduled(self.lambda_local, self.floor_local),
            "hard_negative": self.lambda_hard_negative,
        }


@dataclass
class Embeddings:
    """Unnormalised embeddings of one batch: ``image``, ``text``, ``structure``, ``filtered_text`` (B, E); chunks of
    the filtered captions; structure crops ``(B, K, E)`` (zeros in invalid slots); hard negatives ``(B, N, E)``."""

    image: Tensor
    text: Tensor
    structure: Tensor
    filtered_text: Tensor
    chunks: ChunkEmbeddings | None
    crops: Tensor | None
    negatives: Tensor | None
    logit_scale: Tensor


class StructXLIPEncoder(nn.Module):
    """Wraps a transformers ``CLIPModel``: one forward encodes everything a training step needs (one module, so DDP
    sees every parameter used in its forward).

    ``local_pooling``: ``"filtered"`` pools each chunk from the filtered caption's token states (the text its span
    was computed on); ``"reference"`` pools the unfiltered caption's states at the same spans, reproducing the
    reference trainer exactly, misalignment included."""

    def __init__(self, clip: nn.Module, *, local_pooling: str = "filtered"):
        super().__init__()
        if local_pooling not in LOCAL_POOLING:
            raise ValueError(f"local_pooling must be one of {LOCAL_POOLING}, got {local_pooling!r}")
        self.clip = clip
        self.local_pooling = local_pooling

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """Return image embeddings ``(N, E)`` (projected, unnormalised) of ``(N, 3, H, W)`` pixels."""
        pooled = self.clip.vision_model(pixel_values=pixel_values).pooler_output
        return self.clip.visual_projection(pooled)

    def encode_texts(self, input_ids: Tensor, attention_mask: Tensor, *, with_states: bool = False):
        """Return text embeddings ``(N, E)``; with ``with_states`` also ``last_hidden_state`` ``(N, L, D)`` (the token
        states after the final layer norm, which the chunk pooling uses)."""
        output = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
        embeds = self.clip.text_projection(output.pooler_output)
        if not with_states:
            return embeds
        return embeds, output.last_hidden_state

    def forward(self, batch: StructXLIPBatch, *, with_chunks: bool = True, with_negatives: bool = True) -> Embeddings:
        size = len(batch)
        # One vision pass over photos, structure maps and the valid structure crops (same encoder for all).
        images = [batch.pixel_values, batch.structure_values]
        crop_valid = batch.crop_valid if with_chunks and batch.crop_valid is not None else None
        if crop_valid is not None:
            images.append(batch.crop_values[crop_valid])
        vision = self.encode_images(torch.cat(images))
        image, structure = vision[:size], vision[size:2 * size]
        crops = None
        if crop_valid is not None:
            crops = vision.new_zeros(*crop_valid.shape, vision.shape[-1])
            crops[crop_valid] = vision[2 * size:]

        # One text pass over captions, filtered captions and hard negatives.
        ids = [batch.input_ids, batch.filtered_input_ids]
        masks = [batch.attention_mask, batch.filtered_attention_mask]
        use_negatives = with_negatives and batch.negative_input_ids is not None
        if use_negatives:
            ids.append(batch.negative_input_ids)
            masks.append(batch.negative_attention_mask)
        text_embeds, states = self.encode_texts(torch.cat(ids), torch.cat(masks), with_states=with_chunks)
        chunks = None
        if with_chunks:
            text_model = self.clip.text_model
            # Spans come from the filtered caption; "reference" pools them from the unfiltered caption's states.
            pooled_rows = states[:size] if self.local_pooling == "reference" else states[size:2 * size]
            chunks = pool_chunk_embeddings(pooled_rows, batch.chunk_spans, text_model.final_layer_norm,
                                           self.clip.text_projection)
        negatives = None
        if use_negatives:
            negatives = text_embeds[2 * size:].reshape(size, batch.negative_valid.shape[1], -1)
        return Embeddings(image=image, text=text_embeds[:size], structure=structure,
                          filtered_text=text_embeds[size:2 * size], chunks=chunks, crops=crops, negatives=negatives,
                          logit_scale=self.clip.logit_scale)


@dataclass
class LossTerms:
    """Scalar loss terms (float32 tensors), their weights and the weighted ``total``."""

    total: Tensor
    terms: dict[str, Tensor]
    weights: dict[str, float]

    def metrics(self) -> dict[str, float]:
        """Return ``{"loss": total, "loss/<term>": value, "weight/<term>": weight}`` as floats."""
        values = {"loss": float(self.total.detach())}
        values.update({f"loss/{name}": float(term.detach()) for name, term in self.terms.items()})
        values.update({f"weight/{name}": weight for name, weight in self.weights.items()})
        return values


def compute_objective(
    embeddings: Embeddings,
    batch: StructXLIPBatch,
    *,
    weights: dict[str, float],
    chunk_tau: float = 0.07,
    context: DistributedContext | None = None,
) -> LossTerms:
    """Return the StructXLIP loss terms of one batch; the global and structure-centric terms run over the batch
    gathered from every rank (with gradients through the local slot)."""
    context = context or DistributedContext()
    scale = embeddings.logit_scale.float().exp()
    image, text = embeddings.image.float(), embeddings.text.float()
    structure, filtered = embeddings.structure.float(), embeddings.filtered_text.float()
    has_structure = batch.has_structure.to(image.device)
    terms: dict[str, Tensor] = {
        "global": global_loss(gather_with_grad(image, context), gather_with_grad(text, context), scale),
        "structure_centric": structure_centric_loss(
            gather_with_grad(structure, context), gather_with_grad(filtered, context),
            gather_no_grad(has_structure, context), scale),
        "consistency": rgb_structure_consistency_loss(image, structure, has_structure),
    }
    zero = (image * 0).sum()
    if embeddings.chunks is not None and embeddings.crops is not None:
        terms["local"] = local_structure_centric_loss(embeddings.chunks.embeds.float(), embeddings.chunks.owner,
                                                      embeddings.crops.float(), batch.crop_valid, scale, tau=chunk_tau)
    else:
        terms["local"] = zero
    if embeddings.negatives is not None and weights.get("hard_negative", 0.0) > 0:
        terms["hard_negative"] = hard_negative_loss(image, text, embeddings.negatives.float(), batch.negative_valid,
                                                    scale)
    else:
        terms["hard_negative"] = zero
    total = sum(weights[name] * terms[name] for name in LOSS_NAMES)
    return LossTerms(total=total, terms=terms, weights={name: weights[name] for name in LOSS_NAMES})


# ---- helpers ------------------------------------------------------------------------------------------------------
def autocast_context(device: torch.device, precision: str):
    """Return the autocast context: bf16 on CUDA for ``auto``/``bf16``, bf16 on CPU only when asked, else none."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def export_model(clip: nn.Module, tokenizer: Any, image_processor: Any, model_dir: Path) -> Path:
    """Save model + tokenizer + image processor with ``save_pretrained`` into ``model_dir`` atomically; return it."""
    model_dir = Path(model_dir)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_directory(model_dir) as staging:
            clip.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            image_processor.save_pretrained(staging)
            kill_point("export")
    except Exception as exc:  # safetensors reports a full disk as SafetensorError(... StorageFull ...)
        storage_error = storage_error_from(exc, model_dir)
        if storage_error is None:
            raise
        raise storage_error from None
    return model_dir


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """Return AdamW over ``model``'s parameters, fused (one kernel for all parameters) on CPU/CUDA float weights.

    Attention key biases are frozen: adding the same ``q . b_k`` to every logit of a query leaves its softmax
    unchanged, so their true gradient is exactly 0 and they never change an output. AdamW would still divide float
    noise (~1e-12) by its own running scale and take lr-sized random steps, making two runs of the same training
    differ (e.g. a straight run and a killed + resumed one).
    """
    for name, param in model.named_parameters():
        if name.endswith("self_attn.k_proj.bias"):
            param.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    # The for-loop AdamW (the CPU default) makes ~10 passes per parameter; over CLIP's (49408, D) token table that
    # was most of a tiny model's step. The fused kernel computes the same update in one pass.
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def _append_metrics(path: Path, record: dict) -> None:
    """Append one step's metrics line to ``path`` (a kill mid-write leaves a torn last line; a resume drops it)."""
    line = json.dumps(record) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        if kill_requested("metrics_write", record["step"]):
            handle.write(line[: len(line) // 2])
            handle.flush()
            kill_now()
        handle.write(line)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the metric lines of steps 1..``last_step`` once each, in order, and drop the rest: the steps logged
    after the checkpoint being resumed are logged again, and a line torn by a kill mid-write is dropped. The file is
    replaced atomically, so a kill during the truncation leaves the old file whole."""
    if not path.is_file():
        return
    kept, seen = [], set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, int) and 0 < step <= last_step and step not in seen:
            seen.add(step)
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def _remove_leftovers(layout: OutputLayout, *, earlier_run: bool) -> None:
    """Remove what killed writes left in the train folder (temporary files and staging folders); with
    ``earlier_run`` also the checkpoints and metrics of an earlier run, so a fresh run never mixes with them."""
    leftovers = [*layout.train_dir.glob(".*.tmp"), *layout.train_dir.glob(f".{layout.model_dir.name}.old-*"),
                 *layout.checkpoints_dir.glob(".*.tmp")]
    for leftover in leftovers:
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    if earlier_run:
        shutil.rmtree(layout.checkpoints_dir, ignore_errors=True)
        layout.train_metrics.unlink(missing_ok=True)


def _checkpoint_to_resume(path: Path, *, resume: bool | str, run_key: str | None,
                          data_state: dict) -> tuple[TrainingCheckpoint | None, str]:
    """Return the checkpoint to continue from (None: start afresh) and, when one is passed over, why.

    ``resume=True`` raises instead (one line): no checkpoint, an unreadable one, another ``run_key`` or another data
    order. ``"auto"`` passes over all of these; a checkpoint without a matching ``run_key`` is another run's.
    """
    if not resume:
        return None, ""
    explicit = resume != "auto"
    if not path.is_file():
        if explicit:
            raise FileNotFoundError(f"nothing to resume: no checkpoint at {path} (train without --resume to start)")
        return None, ""
    try:
        state = load_checkpoint(path)
        if state.run_key != run_key and (run_key is not None or not explicit):
            raise ValueError(f"cannot resume from {path}: it belongs to run {state.run_key!r}, not {run_key!r}")
        _check_resumable(state, data_state, path)
    except ValueError as error:  # CheckpointError included
        if explicit:
            raise
        return None, str(error)
    return state, ""


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    """What a training run did: optimiser steps taken overall, skipped (non-finite) steps, finished epochs, the
    last checkpoint, the exported model folder (None until the last epoch ends), mean seconds per step."""

    steps: int
    skipped_steps: int
    epochs_completed: int
    checkpoint: Path | None
    model_dir: Path | None
    seconds_per_step: float
    history: list[dict] = field(default_factory=list)


# ---- the training loop --------------------------------------------------------------------------------------------
def _check_one_batch(pairs: int, batch_size: int, world_size: int) -> None:
    """Raise ValueError (one line) when the training split does not fill one batch on every process: the contrastive
    losses of a smaller batch are computed against fewer negatives than configured (none for one pair)."""
    per_process = -(-pairs // world_size)
    if per_process >= batch_size:
        return
    processes = f" on each of {world_size} processes" if world_size > 1 else ""
    more = "add images or give train a larger share of manifest.split_ratios"
    fix = f"lower train.batch_size to at most {per_process}, or {more}" if per_process >= 2 else \
        f"contrastive training needs at least 2 pairs per batch: {more}"
    raise ValueError(f"the training split has {pairs} pair(s), fewer than one batch (train.batch_size={batch_size})"
                     f"{processes}: {fix}")


def train(
    manifest: str | Path,
    out_dir: str | Path,
    *,
    clip_model: str,
    objective: Objective = Objective(),
    epochs: int = 10,
    batch_size: int = 16,
    lr: float = 5e-6,
    min_lr: float = 0.0,
    weight_decay: float = 0.05,
    logit_scale_min: float = 0.0,
    logit_scale_max: float = 3.5,
    max_text_tokens: int = 248,
    keep_positions: int = 20,
    structure_kind: str = "canny",
    chunk_top_k: int = 3,
    chunk_base_window: int = 3,
    chunk_stride: int = 1,
    max_chunks: int = 64,
    local_pooling: str = "filtered",
    drop_last: bool = True,
    precision: str = "auto",
    device: str = "auto",
    num_workers: int = 0,
    checkpoint_every_steps: int = 0,
    seed: int = 0,
    resume: bool | str = False,
    run_key: str | None = None,
    max_steps: int | None = None,
    config: dict | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune ``clip_model`` on the manifest's train split; write checkpoints, metrics and the final model under
    ``out_dir/train``. ``max_steps`` stops this run after that many batches (checkpointing first), for smoke runs.

    ``resume``: False starts afresh (an earlier run's checkpoints and metrics in the folder are removed); True
    continues exactly from ``train/checkpoints/last.pt`` and raises (one line) when there is none, or it is another
    ``run_key``'s or another data order's; ``"auto"`` continues from a compatible ``last.pt`` and otherwise starts
    afresh, so a pipeline can always pass it. ``run_key`` (what identifies the run's inputs and parameters) is stored
    in every checkpoint. A resumed CPU run uses the interrupted run's thread count: float sums depend on it.
    """
    if resume not in (False, True, "auto"):
        raise ValueError(f"resume must be False, True or 'auto', got {resume!r}")
    from tqdm import tqdm

    from structxlip.models import load_clip

    layout = OutputLayout(out_dir)
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    context = init_distributed(device)
    cpu_threads = torch.get_num_threads()
    try:
        _seed_everything(seed)
        loaded = load_clip(clip_model, max_text_tokens=max_text_tokens, keep_positions=keep_positions)
        clip = loaded.model.to(context.device).train()
        records = load_records(manifest, split="train", structure_kind=structure_kind, top_k=chunk_top_k)
        dataset = StructXLIPDataset(
            records, preprocess=ImagePreprocessor.from_image_processor(loaded.image_processor),
            tokenizer=loaded.tokenizer, max_text_tokens=max_text_tokens, chunk_base_window=chunk_base_window,
            chunk_stride=chunk_stride, max_chunks=max_chunks, local_pooling=local_pooling,
        )
        _check_one_batch(len(dataset), batch_size, context.world_size)
        use_negatives = objective.lambda_hard_negative > 0
        # Pad text to the batch's longest, not max_text_tokens: same embeddings (causal encoder, EOS pooling), and
        # attention over ~30 instead of 248 positions.
        collator = StructXLIPCollator(loaded.tokenizer, max_text_tokens=max_text_tokens, with_negatives=use_negatives,
                                      pad_to_longest=True)
        # drop_last: like the reference's DataLoader(drop_last=True), a last partial batch is not trained on, so
        # steps per epoch and the LR schedule match it (a dataset smaller than one batch still gives one batch).
        sampler = EpochBatchSampler(len(dataset), batch_size, seed=seed, rank=context.rank,
                                    world_size=context.world_size, min_batch=batch_size if drop_last else 2)
        steps_per_epoch = len(sampler.batch_sizes())
        total_steps = steps_per_epoch * epochs
        optimizer = make_optimizer(clip, lr=lr, weight_decay=weight_decay)
        # What evaluate needs to rebuild the model from a checkpoint file alone.
        run_state = {"clip_model": clip_model, "max_text_tokens": max_text_tokens, "keep_positions": keep_positions}
        data_state = {"dataset_size": len(dataset), "batch_size": batch_size, "world_size": context.world_size,
                      "seed": seed, "steps_per_epoch": steps_per_epoch}

        step, start_epoch, start_batch, skipped = 0, 0, 0, 0
        last_checkpoint = layout.checkpoint("last")
        state, passed_over = _checkpoint_to_resume(last_checkpoint, resume=resume, run_key=run_key,
                                                   data_state=data_state)
        barrier(context)  # every rank has decided before the main rank clears or truncates anything
        if state is not None:
            clip.load_state_dict(state.model)
            optimizer.load_state_dict(state.optimizer)
            step, start_epoch, start_batch, skipped = state.step, state.epoch, state.batch_in_epoch, state.skipped_steps
            restore_rng_state(state.rng)
            recorded_threads = (state.config.get("run") or {}).get("cpu_threads")
            if context.device.type == "cpu" and recorded_threads and recorded_threads != cpu_threads:
                torch.set_num_threads(recorded_threads)
        if context.is_main:
            _remove_leftovers(layout, earlier_run=state is None)
            if state is not None:
                _truncate_metrics(layout.train_metrics, step)
                threads = torch.get_num_threads()
                note = f" ({threads} CPU threads, as the interrupted run)" if threads != cpu_threads else ""
                print(f"resuming from {last_checkpoint}: epoch {start_epoch + 1}, batch {start_batch}, step {step}"
                      f"{note}", file=sys.stderr)
            elif passed_over:
                print(f"not resuming ({passed_over}); starting afresh", file=sys.stderr)
        barrier(context)
        run_state["cpu_threads"] = torch.get_num_threads()

        encoder: nn.Module = StructXLIPEncoder(clip, local_pooling=local_pooling)
        if context.enabled:
            encoder = torch.nn.parallel.DistributedDataParallel(
                encoder, device_ids=[context.device.index] if context.device.type == "cuda" else None)
        layout.train_dir.mkdir(parents=True, exist_ok=True)

        def checkpoint(epoch: int, batch_in_epoch: int, name: str = "last") -> Path:
            path = layout.checkpoint(name)
            if context.is_main:
                save_checkpoint(path, model_state=clip.state_dict(), optimizer_state=optimizer.state_dict(),
                                step=step, epoch=epoch, batch_in_epoch=batch_in_epoch, skipped_steps=skipped,
                                config={"config": config or {}, "run": run_state, "data": data_state},
                                rng=capture_rng_state(), run_key=run_key,
                                before_replace=lambda: kill_point("checkpoint_write", step))
                if name != "last":
                    link_or_copy(path, last_checkpoint)
                kill_point("after_checkpoint", step)
            barrier(context)
            return path

        history: list[dict] = []
        step_seconds: list[float] = []
        steps_this_run = 0
        saved: Path | None = last_checkpoint if state is not None else None
        stopped = False
        completed = start_epoch
        for epoch in range(start_epoch, epochs):
            weights = objective.weights(epoch)
            sampler.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
            dataset.set_epoch(epoch, seed)  # multi-caption images: the epoch's caption (data.caption_choice)
            batch_in_epoch = sampler.start_batch
            # A private generator: creating the loader iterator must not consume the global RNG (exact resume).
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers,
                pin_memory=context.device.type == "cuda", generator=torch.Generator().manual_seed(seed + epoch))
            bar = tqdm(total=steps_per_epoch, initial=batch_in_epoch, desc=f"epoch {epoch + 1}/{epochs}",
                       file=sys.stderr, disable=not (progress and context.is_main), dynamic_ncols=True)
            for batch in loader:
                started = time.perf_counter()
                batch = batch.to(context.device)
                current_lr = cosine_lr(step, total_steps, lr, min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = current_lr
                with autocast_context(context.device, precision):
                    embeddings = encoder(batch, with_negatives=use_negatives)
                losses = compute_objective(embeddings, batch, weights=weights, chunk_tau=objective.chunk_tau,
                                           context=context)
                # Every rank must take the same branch, or DDP's gradient all-reduce would wait forever.
                if any_rank(not bool(torch.isfinite(losses.total.detach())), context):
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    message = f"step {step}: non-finite loss ({float(losses.total.detach())}); step skipped"
                    logger.warning(message)
                    if context.is_main:
                        tqdm.write(message, file=sys.stderr)
                else:
                    losses.total.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        clip.logit_scale.clamp_(logit_scale_min, logit_scale_max)
                step += 1
                batch_in_epoch += 1
                steps_this_run += 1
                kill_point("step", step)
                seconds = time.perf_counter() - started
                step_seconds.append(seconds)
                record = {"step": step, "epoch": epoch, "batch": batch_in_epoch, "lr": current_lr,
                          "logit_scale": float(clip.logit_scale.detach()), "skipped_steps": skipped,
                          "seconds": seconds, **losses.metrics()}
                history.append(record)
                if context.is_main:
                    _append_metrics(layout.train_metrics, record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{current_lr:.2e}")
                bar.update(1)
                end_of_epoch = batch_in_epoch == steps_per_epoch
                if max_steps is not None and steps_this_run >= max_steps and not end_of_epoch:
                    saved = checkpoint(epoch, batch_in_epoch)
                    stopped = True
                    break
                if checkpoint_every_steps and step % checkpoint_every_steps == 0 and not end_of_epoch:
                    saved = checkpoint(epoch, batch_in_epoch)
            bar.close()
            if stopped:
                break
            saved = checkpoint(epoch + 1, 0, name=f"epoch-{epoch + 1:04d}")
            completed = epoch + 1
            if max_steps is not None and steps_this_run >= max_steps:
                stopped = epoch + 1 < epochs
                break

        finished = not stopped
        model_dir = None
        if finished and context.is_main:
            model_dir = export_model(clip, loaded.tokenizer, loaded.image_processor, layout.model_dir)
        barrier(context)
        return TrainResult(
            steps=step, skipped_steps=skipped, epochs_completed=completed, checkpoint=saved, model_dir=model_dir,
            seconds_per_step=float(np.mean(step_seconds)) if step_seconds else math.nan, history=history,
        )
    finally:
        if torch.get_num_threads() != cpu_threads:
            torch.set_num_threads(cpu_threads)
        if owns_group:
            shutdown_distributed()


def _check_resumable(state: TrainingCheckpoint, data_state: dict, path: Path) -> None:
    """Refuse to resume when the data order would differ from the interrupted run's (results would not match)."""
    previous = state.config.get("data") or {}
    changed = [f"{key} {previous[key]} -> {value}" for key, value in data_state.items()
               if key in previous and previous[key] != value]
    if changed:
        raise ValueError(f"cannot resume from {path}: the run changed ({', '.join(changed)}); "
                         "restore the original settings or train without --resume into a new folder")


def train_arguments(clip_model: str, section: dict, runtime: dict) -> dict:
    """Return the keyword arguments of :func:`train` for a ``train`` config ``section`` (plus runtime settings):
    objective fields become an ``Objective``; a config key the trainer does not take is an error, so the config and
    the trainer cannot drift apart silently."""
    import inspect

    objective_names = {f.name for f in fields(Objective)}
    accepted = set(inspect.signature(train).parameters)
    # nproc is how many processes run the trainer (the stage launches them), not an argument of one of them.
    values = {k: v for k, v in {**section, **runtime}.items() if k != "nproc"}
    unknown = sorted(k for k in values if k not in objective_names and k not in accepted)
    if unknown:
        raise TypeError(f"train config keys {unknown} are not arguments of structxlip.app.train.train")
    kwargs = {k: v for k, v in values.items() if k in accepted and k not in objective_names}
    return {"clip_model": clip_model, "objective": Objective(**{k: v for k, v in values.items() if k in objective_names}),
            **kwargs}
