"""StructXLIP training losses (METHOD.md section 4) and the caption chunker of the local loss.

Every loss is a pure function of tensors. Embeddings come in *unnormalised* and are L2-normalised here with
``eps = 1e-8`` added to the norm. ``scale`` is the CLIP logit multiplier ``exp(logit_scale)`` (a tensor or a float).
Losses over a possibly empty subset (no sample with a structure map, no valid crop) return an exact zero that is
still connected to the inputs' graph, so ``backward()`` works and gives zero gradients instead of NaN.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Bump when this module's results change: it enters the cache key of every stage that imports it.
VERSION = "1"

EPS = 1e-8
LOCAL_LOGIT_CAP = 100.0  # g = min(s / tau, 100) in the reference trainer

_SENTENCE = re.compile(r"[^.,;!?]+")  # text between runs of .,;!?
_WORD = re.compile(r"\w+")


def normalize(embeds: Tensor) -> Tensor:
    """Return ``embeds`` divided by (L2 norm over the last dim + 1e-8); same shape and dtype."""
    return embeds / (embeds.norm(dim=-1, keepdim=True) + EPS)


@dataclass
class ChunkEmbeddings:
    """Chunk embeddings ``embeds`` (C, E), L2-normalised, and the batch row each belongs to, ``owner`` (C,) long."""

    embeds: Tensor
    owner: Tensor


def pool_chunk_embeddings(token_states: Tensor, spans: Sequence[Sequence[tuple[int, int]]],
                          final_layer_norm: nn.Module, text_projection: nn.Module) -> ChunkEmbeddings:
    """Return one embedding per token span: norm-softmax-weighted mean of the span's token states, then the final
    layer norm, the text projection and L2 normalisation.

    ``token_states`` (B, L, D) are the text model's ``last_hidden_state``, i.e. *after* the final layer norm, which
    is then applied a second time to the pooled vector (the reference trainer's convention, METHOD.md section 4:
    released checkpoints were trained with it). ``spans[b]`` lists ``(start, end)`` token indices (end exclusive) of
    sample b. The weights are ``softmax(||h_t||)`` over the span, computed without gradient.
    """
    batch, length, _ = token_states.shape
    if len(spans) != batch:
        raise ValueError(f"expected spans for {batch} samples, got {len(spans)}")
    owners, starts, ends = [], [], []
    for row, sample_spans in enumerate(spans):
        for start, end in sample_spans:
            if not 0 <= start < end <= length:
                raise ValueError(f"span ({start}, {end}) of sample {row} is empty or outside [0, {length})")
            owners.append(row)
            starts.append(start)
            ends.append(end)
    device = token_states.device
    owner = torch.tensor(owners, dtype=torch.long, device=device)
    if not owners:
        out_dim = getattr(text_projection, "out_features", token_states.shape[-1])
        return ChunkEmbeddings(token_states.new_zeros(0, out_dim), owner)
    start = torch.tensor(starts, device=device)[:, None]
    end = torch.tensor(ends, device=device)[:, None]
    positions = torch.arange(length, device=device)[None, :]
    in_span = (positions >= start) & (positions < end)  # (C, L)

    with torch.no_grad():
        # At least float32 for the softmax (bf16 norms would round the weights), float64 stays float64.
        work_dtype = torch.promote_types(token_states.dtype, torch.float32)
        norms = token_states.detach().to(work_dtype).norm(dim=-1)  # (B, L)
        scores = norms[owner].masked_fill(~in_span, float("-inf"))
        weights = torch.softmax(scores, dim=-1)  # (C, L), zero outside the span
        # Scatter each chunk's weights into its own sample's block so one matmul pools every chunk.
        full = torch.zeros(owner.shape[0], batch, length, device=device, dtype=token_states.dtype)
        full[torch.arange(owner.shape[0], device=device), owner] = weights.to(token_states.dtype)
    pooled = full.reshape(owner.shape[0], batch * length) @ token_states.reshape(batch * length, -1)  # (C, D)
    return ChunkEmbeddings(normalize(text_projection(final_layer_norm(pooled))), owner)


def _as_tensor(scale: Tensor | float, like: Tensor) -> Tensor:
    if isinstance(scale, Tensor):
        return scale.to(device=like.device, dtype=like.dtype)
    return torch.tensor(float(scale), device=like.device, dtype=like.dtype)


def _zero(*tensors: Tensor) -> Tensor:
    """A scalar exact 0 connected to every input's graph (backward gives zero gradients, never NaN)."""
    total = None
    for tensor in tensors:
        term = (tensor * 0).sum()
        total = term if total is None else total + term
    return total


def _check_rows(name: str, tensor: Tensor, rows: int, ndim: int) -> None:
    if tensor.ndim != ndim or tensor.shape[0] != rows:
        raise ValueError(f"expected {name} with {ndim} dims and {rows} rows, got shape {tuple(tensor.shape)}")


def clip_loss(logits: Tensor) -> Tensor:
    """Return the symmetric CLIP cross-entropy of a square ``(B, B)`` logit matrix whose matches are on the diagonal."""
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"expected square logits (B, B), got shape {tuple(logits.shape)}")
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def global_loss(image_embeds: Tensor, text_embeds: Tensor, scale: Tensor | float) -> Tensor:
    """Return the symmetric CLIP loss on ``scale * I @ T^T`` for ``(B, D)`` embeddings; gradients reach ``scale``."""
    _check_rows("text_embeds", text_embeds, image_embeds.shape[0], 2)
    logits = _as_tensor(scale, image_embeds) * normalize(image_embeds) @ normalize(text_embeds).T
    return clip_loss(logits)


def structure_centric_loss(structure_embeds: Tensor, filtered_text_embeds: Tensor, has_structure: Tensor,
                           scale: Tensor | float) -> Tensor:
    """Return the symmetric CLIP loss of structure maps vs filtered captions over rows with ``has_structure`` (B,).

    Uses ``scale.detach()``: this auxiliary term does not move the temperature. Exactly 0 when no row has structure.
    """
    batch = structure_embeds.shape[0]
    _check_rows("filtered_text_embeds", filtered_text_embeds, batch, 2)
    _check_rows("has_structure", has_structure, batch, 1)
    keep = has_structure.to(device=structure_embeds.device, dtype=torch.bool)
    if not bool(keep.any()):
        return _zero(structure_embeds, filtered_text_embeds)
    scale = _as_tensor(scale, structure_embeds).detach()
    logits = scale * normalize(structure_embeds[keep]) @ normalize(filtered_text_embeds[keep]).T
    return clip_loss(logits)


def rgb_structure_consistency_loss(image_embeds: Tensor, structure_embeds: Tensor, has_structure: Tensor) -> Tensor:
    """Return the mean of ``1 - cos(I_b, S_b)`` over samples with ``has_structure`` (B,); exactly 0 if none."""
    batch = image_embeds.shape[0]
    _check_rows("structure_embeds", structure_embeds, batch, 2)
    _check_rows("has_structure", has_structure, batch, 1)
    keep = has_structure.to(device=image_embeds.device, dtype=torch.bool)
    if not bool(keep.any()):
        return _zero(image_embeds, structure_embeds)
    cosine = (normalize(image_embeds[keep]) * normalize(structure_embeds[keep])).sum(dim=-1)
    return (1.0 - cosine).mean()


def local_structure_centric_loss(chunk_embeds: Tensor, chunk_owner: Tensor, crop_embeds: Tensor, crop_valid: Tensor,
                                 scale: Tensor | float, tau: float = 0.07) -> Tensor:
    """Return the local structure-centric loss: chunks ``(C, D)`` of sample ``chunk_owner`` (C,) long vs structure
    crops ``(B, K, D)`` with validity ``crop_valid`` (B, K) bool.

    With g = min(scale / tau, 100), each chunk c of sample b scores
    ``-(logsumexp_{b's valid crops} g*cos - logsumexp_{all valid crops in the batch} g*cos)``; the loss averages over
    each sample's chunks, then over samples with at least one chunk and one valid crop (exactly 0 if there are none).
    ``scale`` is used as given (pass ``scale.detach()`` to keep this term off the temperature); the cap at 100 already
    blocks its gradient whenever s / tau > 100, i.e. for any s above 7 (CLIP's trained s is ~100).
    """
    batch, slots, dim = crop_embeds.shape
    _check_rows("crop_valid", crop_valid, batch, 2)
    _check_rows("chunk_owner", chunk_owner, chunk_embeds.shape[0], 1)
    if chunk_embeds.ndim != 2 or chunk_embeds.shape[1] != dim:
        raise ValueError(f"expected chunk_embeds (C, {dim}), got shape {tuple(chunk_embeds.shape)}")
    device = crop_embeds.device
    valid = crop_valid.to(device=device, dtype=torch.bool)
    owner = chunk_owner.to(device=device, dtype=torch.long)
    if owner.numel() and (int(owner.min()) < 0 or int(owner.max()) >= batch):
        raise ValueError(f"chunk_owner values must lie in [0, {batch}), got {owner.min().item()}..{owner.max().item()}")
    counted = valid.any(dim=1)[owner] if owner.numel() else owner.bool()  # (C,) chunk's sample has a crop
    if not bool(counted.any()):
        return _zero(chunk_embeds, crop_embeds)

    g = torch.clamp(_as_tensor(scale, crop_embeds) / tau, max=LOCAL_LOGIT_CAP)
    # Normalise the chunks and apply g on the (C, B*K) product rather than on the much larger (C, D) chunk matrix.
    chunk_norms = chunk_embeds.norm(dim=-1, keepdim=True) + EPS  # (C, 1)
    crops = normalize(crop_embeds.reshape(batch * slots, dim))  # (B*K, D)
    logits = (chunk_embeds @ crops.T) * (g / chunk_norms)  # (C, B*K)
    valid_flat = valid.reshape(-1)
    # Each chunk's own K crops, gathered instead of masking the whole matrix; invalid slots get the dtype's minimum
    # (not -inf, which would turn the backward of a crop-less sample into NaN).
    own_logits = logits.view(-1, batch, slots)[torch.arange(owner.numel(), device=device), owner]  # (C, K)
    lse_own = torch.logsumexp(own_logits.masked_fill(~valid[owner], torch.finfo(logits.dtype).min), dim=1)
    lse_all = torch.logsumexp(logits[:, valid_flat], dim=1)
    per_chunk = -(lse_own - lse_all)
    per_chunk = torch.where(counted, per_chunk, torch.zeros_like(per_chunk))  # drops -inf/NaN of crop-less samples

    # Mean over each sample's chunks, then over samples that have chunks and a valid crop.
    sums = torch.zeros(batch, device=device, dtype=per_chunk.dtype).index_add(0, owner, per_chunk)
    counts = torch.zeros(batch, device=device, dtype=per_chunk.dtype).index_add(0, owner, counted.to(per_chunk.dtype))
    has = counts > 0
    return (sums[has] / counts[has]).mean()


def hard_negative_loss(image_embeds: Tensor, text_embeds: Tensor, negative_embeds: Tensor, negative_valid: Tensor,
                       scale: Tensor | float) -> Tensor:
    """Return the image->text cross-entropy where image b ranks all B captions ``(B, D)`` plus its own valid hard
    negatives ``(B, N, D)`` (``negative_valid`` (B, N) bool; invalid slots are masked out), target = caption b."""
    batch, dim = image_embeds.shape
    _check_rows("text_embeds", text_embeds, batch, 2)
    _check_rows("negative_embeds", negative_embeds, batch, 3)
    _check_rows("negative_valid", negative_valid, batch, 2)
    scale = _as_tensor(scale, image_embeds)
    images = normalize(image_embeds)
    caption_logits = scale * images @ normalize(text_embeds).T  # (B, B)
    negative_logits = scale * torch.einsum("bd,bnd->bn", images, normalize(negative_embeds))  # (B, N)
    valid = negative_valid.to(device=image_embeds.device, dtype=torch.bool)
    negative_logits = negative_logits.masked_fill(~valid, torch.finfo(negative_logits.dtype).min)
    logits = torch.cat([caption_logits, negative_logits], dim=1)
    return F.cross_entropy(logits, torch.arange(batch, device=image_embeds.device))


def chunk_window(num_words: int, base_window: int = 3) -> int:
    """Return the chunk window (in words) for a sentence of ``num_words`` words (METHOD.md section 4)."""
    if num_words <= 4:
        return 2
    if num_words <= 10:
        return base_window
    if num_words <= 20:
        return base_window + 1
    if num_words <= 40:
        return base_window + 2
    return base_window + 3


def chunk_word_windows(text: str, base_window: int = 3, stride: int = 1,
                       max_spans: int = 64) -> list[tuple[int, int]]:
    """Return the character spans ``(start, end)`` (end exclusive) of the word-window chunks of ``text``.

    Sentences are the text between runs of ``.,;!?``; words are ``\\w+`` runs. The window slides over start words
    ``i = 0 .. n - w`` (as in the reference trainer), so a sentence with fewer words than its window (a one-word
    clause such as "Dog." or "...; ok") gives no chunk. At most ``max_spans`` spans.
    """
    if base_window <= 0 or stride <= 0:
        raise ValueError(f"base_window and stride must be positive, got {base_window} and {stride}")
    spans: list[tuple[int, int]] = []
    for sentence in _SENTENCE.finditer(text):
        words = [(m.start() + sentence.start(), m.end() + sentence.start()) for m in _WORD.finditer(sentence.group())]
        if not words:
            continue
        window = chunk_window(len(words), base_window)
        for first in range(0, len(words) - window + 1, stride):
            spans.append((words[first][0], words[first + window - 1][1]))
            if len(spans) >= max_spans:
                return spans
    return spans


def chunk_spans(text: str, tokenizer: Any, base_window: int = 3, stride: int = 1, max_spans: int = 64, *,
                max_length: int | None = None, allow_last_position: bool = False) -> list[tuple[int, int]]:
    """Return the token spans ``(start, end)`` (end exclusive) of the word-window chunks of ``text``.

    Indices refer to the tokenised text *with* special tokens (index 0 is ``<|startoftext|>``), i.e. the sequence
    the text encoder sees: start = the token of the chunk's first character, end - 1 = the token of its last
    character. ``max_length`` (default ``tokenizer.model_max_length``) is the encoder's length: a chunk whose words
    are cut off by truncation is dropped (``end <= max_length - 1``; the last position holds ``<|endoftext|>``).
    ``allow_last_position`` keeps chunks with ``end == max_length`` too, which is the reference trainer's check
    (``end <= max_length``), for the reference pooling mode. Needs a fast tokenizer (character offsets).
    """
    char_spans = chunk_word_windows(text, base_window, stride, max_spans)
    if not char_spans:
        return []
    limit = (max_length or tokenizer.model_max_length) - (0 if allow_last_position else 1)
    # Untruncated, so that char_to_token finds every word; the length check below does the truncation.
    encoding = tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)
    spans: list[tuple[int, int]] = []
    for char_start, char_end in char_spans:
        first, last = encoding.char_to_token(char_start), encoding.char_to_token(char_end - 1)
        if first is None or last is None or last < first or last + 1 > limit:
            continue
        spans.append((first, last + 1))
    return spans


# ---- plug-and-play modules ----------------------------------------------------------------------------------------
# Thin nn.Module wrappers of the functions above, for use in another trainer without the rest of this project.
# ``scale`` is always the CLIP logit multiplier s = clip.logit_scale.exp() (as in the reference's plug_and_play_loss).
def _all_rows(embeds: Tensor) -> Tensor:
    return torch.ones(embeds.shape[0], dtype=torch.bool, device=embeds.device)


class GlobalLoss(nn.Module):
    """Symmetric CLIP loss of images ``(B, D)`` vs captions ``(B, D)``; gradients reach ``scale``."""

    def forward(self, image_embeds: Tensor, text_embeds: Tensor, scale: Tensor | float) -> Tensor:
        return global_loss(image_embeds, text_embeds, scale)


class StructureCentricLoss(nn.Module):
    """Symmetric CLIP loss of structure-map embeddings ``(B, D)`` vs filtered-caption embeddings ``(B, D)`` over the
    samples with a structure map (``has_structure`` (B,) bool, default all); ``scale`` is detached."""

    def forward(self, structure_embeds: Tensor, filtered_text_embeds: Tensor, scale: Tensor | float,
                has_structure: Tensor | None = None) -> Tensor:
        keep = _all_rows(structure_embeds) if has_structure is None else has_structure
        return structure_centric_loss(structure_embeds, filtered_text_embeds, keep, scale)


class RGBStructureConsistencyLoss(nn.Module):
    """Mean ``1 - cos(I_b, S_b)`` of image ``(B, D)`` and structure ``(B, D)`` embeddings over the samples with a
    structure map (``has_structure`` (B,) bool, default all)."""

    def forward(self, image_embeds: Tensor, structure_embeds: Tensor, has_structure: Tensor | None = None) -> Tensor:
        keep = _all_rows(image_embeds) if has_structure is None else has_structure
        return rgb_structure_consistency_loss(image_embeds, structure_embeds, keep)


class LocalStructureCentricLoss(nn.Module):
    """Local structure-centric loss of caption chunks vs the top-k structure crops of each sample.

    ``forward(chunk_embeds (C, D), chunk_owner (C,), crop_embeds (B, K, D), crop_valid (B, K), scale)`` takes chunk
    embeddings already pooled; :meth:`chunk_spans` and :meth:`chunk_embeddings` compute them from captions and a
    transformers ``CLIPModel``'s ``last_hidden_state`` (METHOD.md section 4).
    """

    def __init__(self, tau: float = 0.07, base_window: int = 3, stride: int = 1, max_chunks: int = 64):
        super().__init__()
        self.tau, self.base_window, self.stride, self.max_chunks = tau, base_window, stride, max_chunks

    def chunk_spans(self, captions: list[str], tokenizer: Any, max_length: int | None = None) -> list[list[tuple]]:
        """Return each caption's chunk token spans (indices into ``tokenizer(caption)`` with special tokens)."""
        return [chunk_spans(caption, tokenizer, self.base_window, self.stride, self.max_chunks, max_length=max_length)
                for caption in captions]

    def chunk_embeddings(self, clip_model: nn.Module, last_hidden_state: Tensor, spans: list[list[tuple]]):
        """Return the :class:`ChunkEmbeddings` (``embeds`` (C, E), ``owner`` (C,)) pooled from
        ``last_hidden_state`` (B, L, D) of the captions the spans were computed on."""
        return pool_chunk_embeddings(last_hidden_state, spans, clip_model.text_model.final_layer_norm,
                                     clip_model.text_projection)

    def forward(self, chunk_embeds: Tensor, chunk_owner: Tensor, crop_embeds: Tensor, crop_valid: Tensor,
                scale: Tensor | float) -> Tensor:
        return local_structure_centric_loss(chunk_embeds, chunk_owner, crop_embeds, crop_valid, scale, tau=self.tau)
