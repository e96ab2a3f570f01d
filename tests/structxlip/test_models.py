import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from structxlip.models import (
    TINY_CLIP,
    build_tiny_clip,
    clip_bpe_vocabulary,
    load_clip,
    load_structxlip_checkpoint,
    resolve_model_source,
)
from structxlip.text import extend_position_embeddings, text_position_count

TEXTS = [
    "A photo of a cat sitting on a striped mat, next to 2 dogs!",
    "Café déjà vu: naïve façade in Zürich, São Paulo.",
    "I love 🍕 and 🐱 emoji 😀😀 — really.",
    "  Mixed   CASE\ttext\nwith newlines and don't-stop hyphens  ",
]


def test_tiny_clip_tokenizer_matches_open_clip(tiny_clip_dir):
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    reference = SimpleTokenizer()
    vocab, merges = clip_bpe_vocabulary()
    assert len(vocab) == 49408 and len(merges) == 48894
    for text in TEXTS:
        expected = [reference.sot_token_id] + reference.encode(text) + [reference.eot_token_id]
        assert tokenizer(text)["input_ids"] == expected, text
    assert len(tokenizer) == 49408


def test_tiny_clip_loads_with_auto_classes(tiny_clip_dir):
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_clip_dir)
    assert model.config.text_config.hidden_size == 32 and model.config.text_config.num_hidden_layers == 2
    assert model.config.vision_config.image_size == 32 and model.config.projection_dim == 32
    inputs = processor(text=["a dog", "two red cats"], images=[Image.new("RGB", (50, 40), "red")] * 2,
                       return_tensors="pt", padding=True)
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    with torch.no_grad():
        output = model(**inputs)
    assert output.logits_per_image.shape == (2, 2)
    assert torch.isfinite(output.logits_per_image).all()


def _state(path):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(path).state_dict()


def test_build_is_deterministic_and_atomic(tmp_path):
    first = build_tiny_clip(tmp_path / "a", seed=3)
    second = build_tiny_clip(tmp_path / "b", seed=3)
    other = build_tiny_clip(tmp_path / "c", seed=4)
    a, b, c = _state(first), _state(second), _state(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    rebuilt = build_tiny_clip(first, seed=4)  # replacing an existing folder
    replaced = _state(rebuilt)
    assert all(torch.equal(replaced[k], c[k]) for k in c)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no staging folders left behind


def test_build_does_not_disturb_global_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_clip(tmp_path / "m")
    assert torch.equal(torch.rand(3), expected)


def test_resolve_model_source(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTXLIP_CACHE", str(tmp_path / "cache"))
    assert resolve_model_source("openai/clip-vit-base-patch16") == "openai/clip-vit-base-patch16"
    assert resolve_model_source(str(tmp_path)) == str(tmp_path)
    path = resolve_model_source(TINY_CLIP)
    assert path == str(tmp_path / "cache" / "tiny-clip")
    stamp = os.stat(os.path.join(path, "model.safetensors")).st_mtime_ns
    assert resolve_model_source(TINY_CLIP) == path  # reused, not rebuilt
    assert os.stat(os.path.join(path, "model.safetensors")).st_mtime_ns == stamp


def test_resolve_model_source_survives_a_race(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTXLIP_CACHE", str(tmp_path))
    barrier = threading.Barrier(3)

    def resolve(_):
        barrier.wait()
        return resolve_model_source(TINY_CLIP)

    with ThreadPoolExecutor(3) as pool:
        paths = set(pool.map(resolve, range(3)))
    assert paths == {str(tmp_path / "tiny-clip")}
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-clip"]
    assert _state(tmp_path / "tiny-clip")["logit_scale"].numel() == 1


def test_load_clip_stretches_positions(tiny_clip_dir):
    loaded = load_clip(tiny_clip_dir, max_text_tokens=248)
    assert text_position_count(loaded.model) == 248
    assert loaded.model.config.text_config.max_position_embeddings == 248
    assert loaded.tokenizer.model_max_length == 248
    batch = loaded.tokenizer(["word " * 400, "short"], truncation=True, padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[1] == 248
    with torch.no_grad():
        features = loaded.model.get_text_features(**batch)
    assert torch.isfinite(features.pooler_output).all()
    pixels = loaded.image_processor(images=[Image.new("RGB", (64, 48))], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)


def test_load_clip_tiny_name_and_no_stretch_needed(tiny_clip_dir):
    loaded = load_clip(TINY_CLIP, max_text_tokens=77)
    assert text_position_count(loaded.model) == 77 and loaded.tokenizer.model_max_length == 77


def test_load_clip_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found") as missing:
        load_clip(tmp_path / "nowhere")
    assert "\n" not in str(missing.value)
    with pytest.raises(RuntimeError, match="could not load CLIP model") as unknown:
        load_clip("nobody-here/not-a-real-model-xyz")  # offline in tests (HF_HUB_OFFLINE=1)
    assert "\n" not in str(unknown.value) and unknown.value.__cause__ is None


def _long_model(tiny_clip_dir):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip_dir)
    extend_position_embeddings(model, 248)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)  # differ from the freshly built weights
    return model


@pytest.mark.parametrize(("prefix", "suffix"), [("clip_model.", ".pth"), ("module.", ".pt"), ("", ".safetensors")])
def test_load_structxlip_checkpoint_round_trip(tiny_clip_dir, tmp_path, prefix, suffix):
    from safetensors.torch import save_file
    from transformers import CLIPModel

    trained = _long_model(tiny_clip_dir)
    state = {prefix + k: v.clone().contiguous() for k, v in trained.state_dict().items()}
    path = tmp_path / f"structxlip{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    fresh = CLIPModel.from_pretrained(tiny_clip_dir)
    assert text_position_count(fresh) == 77
    loaded = load_structxlip_checkpoint(fresh, path)
    assert text_position_count(loaded) == 248
    expected = trained.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert loaded.text_model.embeddings.position_ids.shape == (1, 248)


def test_load_structxlip_checkpoint_accepts_wrapped_state_dict(tiny_clip_dir, tmp_path):
    from transformers import CLIPModel

    trained = _long_model(tiny_clip_dir)
    torch.save({"state_dict": {"module.clip_model." + k: v for k, v in trained.state_dict().items()}, "epoch": 3},
               tmp_path / "wrapped.pth")
    loaded = load_structxlip_checkpoint(CLIPModel.from_pretrained(tiny_clip_dir), tmp_path / "wrapped.pth")
    assert torch.equal(loaded.logit_scale, trained.logit_scale)
    # The reference trainer's layout: {"model_state_dict": ...} plus entries that are not CLIP weights.
    state = dict(trained.state_dict(), **{"loss_head.weight": torch.zeros(3)})
    torch.save({"model_state_dict": state}, tmp_path / "extra.pth")
    # An entry that is not a CLIP weight means a format we do not know: one error, never a partial load.
    with pytest.raises(ValueError, match="0 missing keys .*1 unexpected keys .*loss_head.weight"):
        load_structxlip_checkpoint(CLIPModel.from_pretrained(tiny_clip_dir), tmp_path / "extra.pth")


class _NotAStateDict:
    pass


def test_load_structxlip_checkpoint_refuses_other_files(tiny_clip_dir, tmp_path):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip_dir)
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        load_structxlip_checkpoint(model, tmp_path / "list.pth")
    torch.save(_NotAStateDict(), tmp_path / "object.pth")  # weights_only refuses arbitrary pickles
    with pytest.raises(ValueError, match="refused by the safe loader: .* needs unrestricted unpickling"):
        load_structxlip_checkpoint(model, tmp_path / "object.pth")
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pth")
    expected = len(model.state_dict())
    with pytest.raises(ValueError, match=rf"weights do not match the model: {expected} missing keys .* 1 unexpected"):
        load_structxlip_checkpoint(model, tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError):
        load_structxlip_checkpoint(model, tmp_path / "missing.pth")


def test_small_clip_is_built_like_the_tiny_one_at_its_own_size(tmp_path, monkeypatch):
    from transformers import CLIPConfig

    from structxlip.models import SMALL_CLIP, build_random_clip

    monkeypatch.setenv("STRUCTXLIP_CACHE", str(tmp_path / "cache"))
    path = resolve_model_source(SMALL_CLIP)
    assert path == str(tmp_path / "cache" / "small-clip-64")
    config = CLIPConfig.from_pretrained(path)
    assert (config.vision_config.hidden_size, config.vision_config.image_size, config.text_config.hidden_size,
            config.projection_dim, config.text_config.num_hidden_layers) == (64, 64, 64, 64, 2)
    seed0 = _state(build_random_clip(SMALL_CLIP, tmp_path / "s0", seed=0))
    seed1 = _state(build_random_clip(SMALL_CLIP, tmp_path / "s1", seed=1))
    assert all(torch.equal(seed0[k], v) for k, v in _state(path).items())  # the cached model is seed 0
    assert not torch.equal(seed0["text_projection.weight"], seed1["text_projection.weight"])
    with pytest.raises(ValueError, match="random model id"):
        build_random_clip("openai/clip-vit-base-patch16", tmp_path / "x")
