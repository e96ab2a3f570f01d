"""Local structure-centric loss: the project's vectorised loss vs a straightforward per-sample loop.

Same inputs for both (B=16 samples, K=3 crop slots, 64 chunks per caption, D=512; a few invalid crop slots and one
sample without any valid crop, as real batches have); values must agree to 1e-5 and gradients to 1e-5.
"""

from __future__ import annotations

import torch
from torch import Tensor

from benchmarks.common import BenchmarkResult, Target, time_repeats

SPEEDUP_GOAL = 5.0
VALUE_TOLERANCE = 1e-5


def loop_local_loss(chunk_embeds: Tensor, chunk_owner: Tensor, crop_embeds: Tensor, crop_valid: Tensor,
                    scale: Tensor, tau: float = 0.07) -> Tensor:
    """Return the local structure-centric loss computed one sample at a time (METHOD.md section 4), a scalar."""
    eps = 1e-8
    g = torch.clamp(scale / tau, max=100.0)
    batch, slots, dim = crop_embeds.shape
    crops = crop_embeds / (crop_embeds.norm(dim=-1, keepdim=True) + eps)
    all_valid = crops[crop_valid]  # (V, D) every valid crop of the batch
    per_sample = []
    for b in range(batch):
        mine = chunk_owner == b
        if not bool(mine.any()) or not bool(crop_valid[b].any()):
            continue
        chunks = chunk_embeds[mine]
        chunks = chunks / (chunks.norm(dim=-1, keepdim=True) + eps)
        own_logits = g * chunks @ crops[b][crop_valid[b]].T  # (n_b, k_b)
        all_logits = g * chunks @ all_valid.T  # (n_b, V)
        losses = -(torch.logsumexp(own_logits, dim=1) - torch.logsumexp(all_logits, dim=1))
        per_sample.append(losses.mean())
    if not per_sample:
        return (chunk_embeds * 0).sum() + (crop_embeds * 0).sum()
    return torch.stack(per_sample).mean()


def make_inputs(batch: int = 16, slots: int = 3, chunks_per_caption: int = 64, dim: int = 512,
                seed: int = 0) -> dict[str, Tensor]:
    """Return one batch of loss inputs: chunks (C, D), owners (C,), crops (B, K, D), validity (B, K), scale ()."""
    generator = torch.Generator().manual_seed(seed)
    crop_valid = torch.rand(batch, slots, generator=generator) > 0.15
    crop_valid[:, 0] = True  # every sample has its best crop ...
    crop_valid[batch - 1] = False  # ... except one, which the loss must skip
    return {
        "chunk_embeds": torch.randn(batch * chunks_per_caption, dim, generator=generator),
        "chunk_owner": torch.arange(batch).repeat_interleave(chunks_per_caption),
        "crop_embeds": torch.randn(batch, slots, dim, generator=generator),
        "crop_valid": crop_valid,
        "scale": torch.tensor(100.0),  # exp(4.6), a trained CLIP's temperature: g is capped at 100
    }


def _with_grad(inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    fresh = dict(inputs)
    fresh["chunk_embeds"] = inputs["chunk_embeds"].clone().requires_grad_(True)
    fresh["crop_embeds"] = inputs["crop_embeds"].clone().requires_grad_(True)
    return fresh


def run(*, quick: bool = False) -> BenchmarkResult:
    """Return the local-loss benchmark (forward and forward+backward, best of many calls)."""
    from structxlip.losses import local_structure_centric_loss

    inputs = make_inputs()
    repeats = 20 if quick else 200
    result = BenchmarkResult(
        name="local_loss",
        description="Local structure-centric loss, B=16, K=3, 64 chunks per caption, D=512, float32 on CPU: "
                    "vectorised project loss vs a per-sample loop.",
        params={"batch": 16, "slots": 3, "chunks_per_caption": 64, "dim": 512, "repeats": repeats,
                "torch_threads": torch.get_num_threads()},
    )

    project_in, loop_in = _with_grad(inputs), _with_grad(inputs)
    project_value = local_structure_centric_loss(**project_in)
    loop_value = loop_local_loss(**loop_in)
    project_value.backward()
    loop_value.backward()
    value_error = abs(project_value.item() - loop_value.item())
    grad_error = max(float((project_in[k].grad - loop_in[k].grad).abs().max()) for k in ("chunk_embeds", "crop_embeds"))

    def forward(fn):
        def call():
            with torch.no_grad():
                fn(**inputs)
        return call

    def forward_backward(fn):
        def call():
            fn(**_with_grad(inputs)).backward()
        return call

    rows = {}
    for label, fn in (("loop", loop_local_loss), ("project", local_structure_centric_loss)):
        forward(fn)()  # warm-up
        rows[label] = {"forward_ms": 1e3 * time_repeats(forward(fn), repeats)["best_s"],
                       "forward_backward_ms": 1e3 * time_repeats(forward_backward(fn), repeats)["best_s"]}
    speedup_fwd = rows["loop"]["forward_ms"] / rows["project"]["forward_ms"]
    speedup_fb = rows["loop"]["forward_backward_ms"] / rows["project"]["forward_backward_ms"]
    result.rows = [
        {"method": "per-sample loop (benchmark's reference)", **rows["loop"], "loss": loop_value.item(),
         "speedup_forward": 1.0, "speedup_forward_backward": 1.0},
        {"method": "structxlip.losses.local_structure_centric_loss", **rows["project"],
         "loss": project_value.item(), "speedup_forward": speedup_fwd, "speedup_forward_backward": speedup_fb},
    ]
    result.targets = [
        Target("|loss difference|", value_error, VALUE_TOLERANCE, direction="at_most"),
        Target("max |gradient difference|", grad_error, VALUE_TOLERANCE, direction="at_most"),
        Target("speed-up, forward", speedup_fwd, SPEEDUP_GOAL, unit="x"),
        Target("speed-up, forward + backward", speedup_fb, SPEEDUP_GOAL, unit="x"),
    ]
    result.notes.append("times are the best of the repeats (a shared machine adds noise to medians)")
    return result
