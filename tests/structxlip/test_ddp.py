"""DDP on CPU (gloo, 2 processes): the gathered losses and the averaged gradients equal the single-process ones on
the same full batch, and the trainer runs under torchrun-style env vars with only rank 0 writing."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from storage.layout import OutputLayout
from structxlip.data import ImagePreprocessor, StructXLIPCollator, StructXLIPDataset, load_records
from structxlip.app.synthetic import make_synthetic_manifest
from structxlip.app.train import StructXLIPEncoder, compute_objective

WORLD = 2
WEIGHTS = {"global": 1.0, "structure_centric": 1.0, "consistency": 0.0, "local": 0.0, "hard_negative": 0.0}
CHECKED = ("clip.visual_projection.weight", "clip.text_projection.weight", "clip.logit_scale",
           "clip.text_model.embeddings.token_embedding.weight")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _losses_and_grads(encoder, batch, context=None):
    terms = compute_objective(encoder(batch), batch, weights=WEIGHTS, context=context)
    terms.total.backward()
    params = dict(encoder.named_parameters())
    grads = {name: params.get(name, params.get(f"module.{name}")).grad.clone() for name in CHECKED}
    return {k: float(v.detach()) for k, v in terms.terms.items()}, grads


def _worker(rank: int, port: int, model_dir: str, manifest: str, batch, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from structxlip.distributed import init_distributed, shutdown_distributed
    from structxlip.models import load_clip
    from structxlip.app.train import train

    context = init_distributed("cpu")
    try:
        model = load_clip(model_dir, max_text_tokens=77).model
        encoder = torch.nn.parallel.DistributedDataParallel(StructXLIPEncoder(model))
        shard = batch.subset(slice(rank * 2, rank * 2 + 2))
        values, grads = _losses_and_grads(encoder, shard, context)
        torch.save({"values": values, "grads": grads}, os.path.join(out, f"rank{rank}.pt"))
        # The real trainer under the same process group: 8 samples / 2 ranks / batch 2 = 2 steps.
        train(manifest, os.path.join(out, "run"), clip_model=model_dir, epochs=1, batch_size=2, max_text_tokens=77,
              device="cpu", progress=False)
    finally:
        shutdown_distributed()


def test_gathered_losses_and_gradients_match_single_process(tmp_path, tiny_clip_dir):
    from structxlip.models import load_clip

    manifest = make_synthetic_manifest(tmp_path / "data", n_images=12, image_size=48, seed=2)
    loaded = load_clip(tiny_clip_dir, max_text_tokens=77)
    records = load_records(manifest, split="train")
    dataset = StructXLIPDataset(records, preprocess=ImagePreprocessor.from_image_processor(loaded.image_processor),
                                tokenizer=loaded.tokenizer, max_text_tokens=77)
    batch = StructXLIPCollator(loaded.tokenizer, max_text_tokens=77)([dataset[i] for i in range(4)])
    batch.has_structure[3] = False  # the structure-centric loss must mask it out after gathering too

    mp.spawn(_worker, args=(_free_port(), str(tiny_clip_dir), str(manifest), batch, str(tmp_path)), nprocs=WORLD,
             join=True)

    single_values, single_grads = _losses_and_grads(StructXLIPEncoder(loaded.model), batch)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name in ("global", "structure_centric"):
            assert result["values"][name] == pytest.approx(single_values[name], abs=1e-5), (rank, name)
        for name in CHECKED:
            torch.testing.assert_close(result["grads"][name], single_grads[name], atol=1e-5, rtol=1e-4,
                                       msg=f"rank {rank} {name}")

    layout = OutputLayout(tmp_path / "run")
    lines = [json.loads(line) for line in layout.train_metrics.read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]  # written once (rank 0), not once per rank
    assert layout.checkpoint("last").is_file() and (layout.model_dir / "config.json").is_file()
