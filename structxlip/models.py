"""CLIP loading for the whole project: hub ids, local folders, a tiny random CLIP for tests and demos, and released
StructXLIP checkpoints.

Everything loads models via ``from_pretrained(resolve_model_source(name))`` so that hub ids keep working for users,
while ``"structxlip/tiny-clip"`` builds a small random CLIP (with the *real* CLIP BPE tokenizer) locally, offline.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from storage.atomic import atomic_directory, atomic_path
from structxlip.checkpoint import load_model_state
from structxlip.model_files import ModelLoadError, reading_model_file
from structxlip.text import extend_position_embeddings, stretch_positions, text_position_count

# Bump when this module's results change: it enters the cache key of every stage that imports it.
VERSION = "1"

TINY_CLIP = "structxlip/tiny-clip"  # same string as configs.schema.TINY_CLIP
# A small random CLIP that learns from scratch on CPU in minutes (configs/ablation-small.yaml, the learning test).
SMALL_CLIP = "structxlip/small-clip-64"
# Model ids built locally at random initialisation: id -> build_tiny_clip keyword arguments.
RANDOM_CLIPS: dict[str, dict[str, int]] = {
    TINY_CLIP: {},
    SMALL_CLIP: {"hidden_size": 64, "num_layers": 2, "image_size": 64, "patch_size": 8, "projection_dim": 64},
}
CACHE_ENV = "STRUCTXLIP_CACHE"
_STRIP_PREFIXES = ("module.", "clip_model.", "model.")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


# ---------------------------------------------------------------------------------------------------------------
# Tiny CLIP
# ---------------------------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode character table (as in OpenAI's and open_clip's tokenizer)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes), strict=True))


@functools.lru_cache(maxsize=1)
def clip_bpe_vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Return CLIP's BPE ``(vocab token -> id (49,408 entries), merges (48,894 pairs))`` from open_clip's file."""
    try:
        from open_clip.tokenizer import default_bpe
    except ImportError as error:  # pragma: no cover - open-clip-torch is a declared dependency
        raise RuntimeError("building the tiny CLIP tokenizer needs open-clip-torch (pip install open-clip-torch)") \
            from error
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    # First line is a header; CLIP uses the next 49152 - 256 - 2 = 48,894 merges.
    merges = tuple(tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1])
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def build_clip_tokenizer(model_max_length: int = 77):
    """Return a real CLIP ``CLIPTokenizer`` (fast) built offline from open_clip's bundled BPE vocabulary."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_vocabulary()
    # transformers 5: vocab/merges must be a dict and a list of tuples; file names give a silently broken tokenizer.
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length,
                         unk_token="<|endoftext|>", bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                         pad_token="<|endoftext|>")


def build_tiny_clip(out_dir: str | os.PathLike, *, hidden_size: int = 32, num_layers: int = 2, image_size: int = 32,
                    patch_size: int = 8, projection_dim: int = 32, max_position_embeddings: int = 77,
                    seed: int = 0) -> Path:
    """Write a randomly initialised tiny ``CLIPModel`` + real CLIP tokenizer + image processor to ``out_dir``.

    Deterministic for ``seed``. Built in a temporary sibling folder and renamed into place, so a reader never sees a
    half-written model; an existing ``out_dir`` is replaced. Returns ``out_dir`` as a Path.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    out_dir = Path(out_dir).expanduser()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    vocab, _ = clip_bpe_vocabulary()
    heads = 4 if hidden_size % 4 == 0 else 1
    common = dict(hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=heads, projection_dim=projection_dim)
    config = CLIPConfig(
        text_config=dict(common, vocab_size=len(vocab), max_position_embeddings=max_position_embeddings,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(common, image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    tokenizer = build_clip_tokenizer(model_max_length=max_position_embeddings)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})

    with atomic_directory(out_dir) as staging:
        model.save_pretrained(staging)
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return out_dir


def cache_dir() -> Path:
    """Return the project's model cache folder (``$STRUCTXLIP_CACHE``, default ``~/.cache/structxlip``)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "structxlip").expanduser()


def resolve_model_source(name: str) -> str:
    """Return what to pass to ``from_pretrained`` for ``name``: the name itself for hub ids and local folders; for a
    random model id of ``RANDOM_CLIPS`` (``"structxlip/tiny-clip"``, ``"structxlip/small-clip-64"``) the path of
    that model in the cache, built (seed 0) on first use."""
    if name not in RANDOM_CLIPS:
        return name
    folder = name.split("/", 1)[1]
    target = cache_dir() / folder
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a private name, then rename: of two racing processes one rename wins, the other reuses its result.
    private = build_random_clip(name, target.with_name(f".{folder}.build-{os.getpid()}-{uuid.uuid4().hex[:8]}"))
    try:
        private.rename(target)
    except OSError:
        shutil.rmtree(private, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise RuntimeError(f"could not create the {name} model at {target}: the folder exists but is not a "
                               f"model; delete it and retry") from None
    return str(target)


def build_random_clip(name: str, out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write the random model ``name`` of ``RANDOM_CLIPS`` initialised from ``seed`` to ``out_dir``; return it."""
    if name not in RANDOM_CLIPS:
        raise ValueError(f"expected a random model id in {sorted(RANDOM_CLIPS)}, got {name!r}")
    return build_tiny_clip(out_dir, seed=seed, **RANDOM_CLIPS[name])


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class LoadedClip:
    """A CLIP model with its tokenizer and image processor."""

    model: Any  # transformers.CLIPModel
    tokenizer: Any
    image_processor: Any


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or (len(name) > 1 and name[1] == ":")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def load_clip(name_or_dir: str | os.PathLike, *, max_text_tokens: int = 248, keep_positions: int = 20) -> LoadedClip:
    """Return the CLIP model, tokenizer and image processor for a hub id, a local folder or ``"structxlip/tiny-clip"``,
    with text positions stretched to ``max_text_tokens`` (Long-CLIP) when the model has fewer.

    Raises FileNotFoundError for a missing local folder and RuntimeError (one line, what to do) when loading fails.
    """
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    name = str(name_or_dir)
    source = resolve_model_source(name)
    local = Path(source).expanduser()
    if local.exists():
        if not local.is_dir():
            raise FileNotFoundError(f"CLIP model {name!r}: expected a folder saved with save_pretrained, got a file")
        source = str(local)
    elif _looks_like_path(name) or isinstance(name_or_dir, os.PathLike):
        raise FileNotFoundError(f"CLIP model folder not found: {local} (give a folder saved with save_pretrained, "
                                f"a Hugging Face hub id, or {TINY_CLIP!r})")
    try:
        with reading_model_file(source):  # a damaged weights/config file: ModelLoadError naming it
            model = CLIPModel.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source)
            image_processor = AutoImageProcessor.from_pretrained(source)
    except ModelLoadError:
        raise
    except pickle.UnpicklingError as error:  # a pickled pytorch_model.bin: refused by weights_only loading
        from structxlip.checkpoint import pickled_weights_error

        raise pickled_weights_error(Path(source) / "pytorch_model.bin", error) from None
    except (OSError, ValueError, KeyError) as error:
        raise RuntimeError(f"could not load CLIP model {name!r}: {_first_line(error)} -- use a local folder saved "
                           f"with save_pretrained, a hub id reachable from this machine (or already in the Hugging "
                           f"Face cache), or {TINY_CLIP!r}") from None
    extend_position_embeddings(model, max_tokens=max_text_tokens, keep=keep_positions)
    tokenizer.model_max_length = max_text_tokens
    return LoadedClip(model=model, tokenizer=tokenizer, image_processor=image_processor)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        with reading_model_file(path):
            return load_file(str(path))
    try:
        with reading_model_file(path):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # damage is already a ModelLoadError: this is a refused pickle
        from structxlip.checkpoint import pickled_weights_error

        raise pickled_weights_error(path, error) from None
    except ModelLoadError:
        raise
    except Exception as error:  # unpickling refuses arbitrary objects under weights_only
        raise ValueError(f"{path} is not a readable PyTorch state dict: {_first_line(error)}") from None
    for key in _WRAPPER_KEYS:
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
            break
    if not isinstance(payload, dict) or not payload or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()):
        raise ValueError(f"{path} is not a state dict (expected a mapping of parameter names to tensors, got "
                         f"{type(payload).__name__})")
    return payload


def _strip_prefixes(state_dict: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    stripped = {}
    for key, value in state_dict.items():
        while key not in expected and key.startswith(_STRIP_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


def load_structxlip_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a released StructXLIP checkpoint (``.pth``/``.pt`` via ``torch.load(weights_only=True)``, or
    ``.safetensors``) into the transformers CLIPModel ``model`` in place and return it.

    Keys may carry ``module.`` / ``clip_model.`` prefixes; text positions are stretched first when the checkpoint has
    more (248 for StructXLIP). The keys must be exactly the model's: missing or unexpected keys raise one
    CheckpointError (a ValueError) saying how many and which, where the reference evaluator's ``strict=False`` load
    would silently evaluate the base model.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"StructXLIP checkpoint not found: {path}")
    expected = set(model.state_dict())
    state_dict = _strip_prefixes(_read_state_dict(path), expected)
    # position_ids are non-persistent buffers in current transformers; older checkpoints still carry them.
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("position_ids") or k in expected}
    position_key = next((k for k in expected if k.endswith("text_model.embeddings.position_embedding.weight")
                         or k == "embeddings.position_embedding.weight"), None)
    if position_key in state_dict and state_dict[position_key].shape[0] > text_position_count(model):
        extend_position_embeddings(model, max_tokens=state_dict[position_key].shape[0])
    # Strict: a missing or unexpected key is one error, never a partly loaded (i.e. base) model.
    load_model_state(model, state_dict, path)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Export for the reference trainer's tools
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ExportedCheckpoint:
    """Where the plain state dict was written, how many tensors it holds and its text position count."""

    path: Path
    keys: int
    text_positions: int


def _clip_state_dict(source: Path, max_text_tokens: int, keep_positions: int) -> dict[str, torch.Tensor]:
    from transformers import CLIPModel

    from structxlip.checkpoint import is_training_checkpoint, read_checkpoint_payload

    if source.is_dir():
        try:
            with reading_model_file(source):
                model = CLIPModel.from_pretrained(source)
        except ModelLoadError:
            raise
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"{source}: not a CLIP model folder saved with save_pretrained ({_first_line(error)})") \
                from None
        extend_position_embeddings(model, max_tokens=max_text_tokens, keep=keep_positions)
        return model.state_dict()
    if not source.is_file():
        raise FileNotFoundError(f"no model folder or checkpoint at {source}")
    payload = read_checkpoint_payload(source)
    if not is_training_checkpoint(payload):
        raise ValueError(f"{source}: not a StructXLIP training checkpoint (last.pt / epoch-*.pt) or model folder")
    return payload["model"]


def export_reference_checkpoint(source: str | os.PathLike, out_path: str | os.PathLike, *,
                                max_text_tokens: int = 248, keep_positions: int = 20) -> ExportedCheckpoint:
    """Write the plain CLIPModel state dict of a ``save_pretrained`` folder or a training checkpoint to ``out_path``
    (``torch.save``, atomically): unprefixed transformers keys and ``max_text_tokens`` text positions (stretched
    Long-CLIP style when the model has fewer), what the reference trainer's ``retrieval.py --ckpt`` and ``train.py``
    load. Raises ValueError when the weights are not a
    full CLIPModel with that many positions (so the reference would not silently evaluate its base model)."""
    source = Path(source).expanduser()
    state = _clip_state_dict(source, max_text_tokens, keep_positions)
    position_key = "text_model.embeddings.position_embedding.weight"
    required = (position_key, "vision_model.embeddings.patch_embedding.weight", "text_projection.weight",
                "visual_projection.weight", "logit_scale")
    absent = [key for key in required if key not in state]
    if absent:
        raise ValueError(f"{source}: not a transformers CLIPModel state dict (no {', '.join(absent)})")
    positions = int(state[position_key].shape[0])
    if positions > max_text_tokens:
        raise ValueError(f"{source}: the text model has {positions} positions, more than {max_text_tokens} "
                         f"(pass max_text_tokens={positions} to export it as it is)")
    if positions < max_text_tokens:  # e.g. trained with 77 tokens: stretched as the reference stretches its base
        weight = state[position_key]
        state = dict(state, **{position_key: stretch_positions(weight, max_text_tokens, keep_positions).to(weight)})
        positions = max_text_tokens
    # position_ids are non-persistent buffers: neither side stores them.
    plain = {key: tensor.detach().cpu().contiguous() for key, tensor in state.items()
             if not key.endswith("position_ids")}
    out_path = Path(out_path).expanduser()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        torch.save(plain, tmp)
    return ExportedCheckpoint(path=out_path, keys=len(plain), text_positions=positions)
