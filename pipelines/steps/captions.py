"""Local captions and similarity scores (METHOD.md section 2): each caption sentence goes to the crop CLIP likes best.

Each source image is decoded once, at the JPEG reduction its crops allow, and its crops are cut by their ``bbox``
(the regions stage's crop files are not re-read). Every sentence (``;`` clauses included) and every crop (plus each
full image, as crop 0) is embedded in batches over groups of images (a few CLIP batches of crops each, so memory
holds one group's pixels); then per image, each sentence is assigned to its best crop. A segment's
``caption`` is its sentences joined in caption order and its ``similarity_score`` the CLIP logit ``100 * cos`` of its
best-matching sentence (the max: a segment is as relevant as its strongest description). Sentences that prefer the
full image describe the whole scene and make no segment. Segments without a sentence are dropped, except with
``caption_regions``, where a generative captioner writes their caption and the score is against that caption.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.steps.errors import one_line
from storage.layout import OutputLayout
from storage.manifest import STATUS_FAILED, STATUS_OK
from structxlip.devices import resolve_device

VERSION = "3"  # 2: sentences from sentence-only splitters (the parser where they disagree); 3: crops cut from the
# decoded source by bbox, not re-read from their JPEG files (scores change by ~0.06 on average), shrunk to 448 px by
# area averaging (OpenCV) instead of PIL's bicubic thumbnail

GROUP_CLIP_BATCHES = 4  # images go through CLIP in groups holding about this many scorer batches of crops
FULL_IMAGE_LONG_SIDE = 448  # CLIP sees 224 px; every crop and full image is thumbnailed to this long side first
MAX_PIXELS = 178_956_970  # pipelines.steps.images' default: PIL's own bomb guard, which the old decode relied on
_DCT_SCALES = (8, 4, 2)  # JPEG reduced decoding factors, largest first
CAPTION_SOURCE_GENERATED = "generated"
_TERMINAL = (".", "!", "?", "…")


# ---------------------------------------------------------------------------------------------------------------
# Sentences
# ---------------------------------------------------------------------------------------------------------------
def _clauses(doc) -> list[str]:
    """Return the doc's sentences, then their ``;`` clauses, stripped, without those holding no letter or digit.

    Sentence texts are cut from ``doc.text`` at the sentence starts' character offsets (one array read instead of a
    Span per sentence and a Token per word: a third of the splitter's time); after stripping that is ``sent.text``."""
    from spacy.attrs import IDX, SENT_START

    if not len(doc):
        return []
    text = doc.text
    marks = doc.to_array([SENT_START, IDX])
    bounds = [0, *(int(offset) for start, offset in marks[1:] if start == 1), len(text)]
    pieces = []
    for begin, end in zip(bounds, bounds[1:]):
        for clause in text[begin:end].split(";"):
            clause = clause.strip()
            if any(ch.isalnum() for ch in clause):
                pieces.append(clause)
    return pieces


def split_sentences(text: str | None, nlp=None) -> list[str]:
    """Return the sentences of ``text`` (spaCy parser sentences, then ``;`` clauses), stripped, without empty ones.

    ``nlp``: a ``SentenceSplitter`` (the default) or a spaCy pipeline with a parser or senter."""
    if not text or not text.strip():
        return []
    if nlp is None:
        nlp = get_sentence_splitter()
    return sentence_clauses([text], nlp)[0]


def sentence_clauses(texts: Sequence[str], nlp) -> list[list[str]]:
    """Return the clauses of every text: ``nlp.clauses`` of a ``SentenceSplitter``, else one ``nlp.pipe`` pass."""
    if isinstance(nlp, SentenceSplitter):
        return nlp.clauses(texts)
    return [_clauses(doc) for doc in nlp.pipe(list(texts))]


class SentenceSplitter:
    """The full parser's sentence splits at the price of two sentence-only splitters.

    spaCy's ``senter`` (a small tagger trained on the parser's boundaries) and the rule-based ``sentencizer`` split
    each text; where their clauses agree (every realistic caption we measured) that is the answer, and where they
    disagree ("No. 10", "etc.)", "dawn... Snow", " - " asides) the text goes through the full tagger + parser as
    before. Both cost ~1-5% of a parse, and the full pipeline is loaded only when a text needs it.
    """

    def __init__(self, spacy_model: str = "en_core_web_sm"):
        import spacy

        from pipelines.steps.filtering import load_spacy_components

        self.spacy_model = spacy_model
        self.senter = load_spacy_components(spacy_model, ("senter",))
        self.rules = spacy.blank("en")
        self.rules.add_pipe("sentencizer")
        self.parsed = 0  # texts the splitters disagreed on (sent to the parser)

    def clauses(self, texts: Sequence[str]) -> list[list[str]]:
        """Return the clauses of every text (sentences, then ``;`` clauses) as the parser would split them."""
        texts = list(texts)
        found: list[list[str] | None] = []
        for statistical, rules in zip(self.senter.pipe(texts), self.rules.pipe(texts)):
            first, second = _clauses(statistical), _clauses(rules)
            found.append(first if first == second else None)
        disputed = [n for n, clauses in enumerate(found) if clauses is None]
        if disputed:
            from pipelines.steps.filtering import load_spacy

            self.parsed += len(disputed)
            for n, doc in zip(disputed, load_spacy(self.spacy_model).pipe([texts[n] for n in disputed])):
                found[n] = _clauses(doc)
        return found


@functools.lru_cache(maxsize=2)
def get_sentence_splitter(spacy_model: str = "en_core_web_sm") -> SentenceSplitter:
    """Return the process-wide ``SentenceSplitter`` of this spaCy model."""
    return SentenceSplitter(spacy_model)


def join_sentences(sentences: Sequence[str]) -> str:
    """Return sentences joined by spaces, each ending in terminal punctuation (a bare ``;`` clause gets a full stop)."""
    return " ".join(s if s.endswith(_TERMINAL) else s + "." for s in sentences)


# ---------------------------------------------------------------------------------------------------------------
# Assignment (pure)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Assignment:
    """Where one sentence went: the index of its best crop and the CLIP logit ``100 * cos`` with that crop."""

    crop_index: int
    similarity_score: float


def similarity_logits(crop_embeds: np.ndarray, sentence_embeds: np.ndarray) -> np.ndarray:
    """Return ``100 * cos`` between every crop and every sentence, (R, S) float32."""
    crops = np.asarray(crop_embeds, dtype=np.float32)
    sentences = np.asarray(sentence_embeds, dtype=np.float32)
    if crops.ndim != 2 or sentences.ndim != 2 or crops.shape[1] != sentences.shape[1]:
        raise ValueError(f"expected (R, D) and (S, D) embeddings, got shapes {crops.shape} and {sentences.shape}")
    crops = crops / np.maximum(np.linalg.norm(crops, axis=1, keepdims=True), 1e-12)
    sentences = sentences / np.maximum(np.linalg.norm(sentences, axis=1, keepdims=True), 1e-12)
    return 100.0 * crops @ sentences.T


def assign_sentences(crop_embeds: np.ndarray, sentence_embeds: np.ndarray) -> list[Assignment]:
    """Return, per sentence, its best crop (argmax of ``100 * cos`` over crops; ties go to the lower index)."""
    scores = similarity_logits(crop_embeds, sentence_embeds)
    if scores.shape[0] == 0:
        raise ValueError("cannot assign sentences: no crops")
    best = scores.argmax(axis=0)
    return [Assignment(int(r), float(scores[r, s])) for s, r in enumerate(best)]


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
def torch_threads_for(processes_per_machine: int = 1) -> int:
    """Return the intra-op thread count for one of ``processes_per_machine`` worker processes on this machine.

    An explicit ``OMP_NUM_THREADS`` wins. Otherwise: the process's share of the usable cores, but no more than the
    cores the 1-minute load average leaves free (at least one). torch's default (every physical core, in every
    process) oversubscribes shared or busy cores: on a 2-core machine at load ~2, the tiny CLIP embedded images
    4-15x slower with 2 threads than with 1; next to a 2-process pool, 30-100x.
    """
    explicit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, usable // max(1, int(processes_per_machine)))
    try:
        free = int(usable - os.getloadavg()[0] + 0.5)
    except (AttributeError, OSError):
        free = share
    return max(1, min(share, free))


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run the block with torch's intra-op thread count at ``threads``, then restore it: the setting is
    process-wide, and a library call must not leave it changed for the rest of the process (e.g. a trainer)."""
    import torch

    previous = torch.get_num_threads()
    if previous != threads:
        torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def _autocast(device: str):
    import contextlib

    import torch

    if not device.startswith("cuda"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _pooled(output):
    """transformers 5 returns a ModelOutput whose ``pooler_output`` is the projected embedding; 4.x a tensor."""
    return output if hasattr(output, "shape") else output.pooler_output


def _size_value(size, key: str) -> int | None:
    value = size.get(key) if hasattr(size, "get") else getattr(size, key, None)
    return int(value) if value else None


@dataclass(frozen=True)
class ClipImageTransform:
    """CLIPImageProcessor's pixel pipeline as batched tensor code: resize (shortest edge or fixed size, antialiased),
    centre crop (floor offsets, zero padding when the crop is larger), rescale and normalise.

    Each image is resized as a uint8 channels-last view of its numpy array (torchvision's vectorised uint8 path, no
    copy to CHW first); crops land in one uint8 batch that is normalised in a single op (on the model's device).
    """

    shortest_edge: int | None  # resize the short side to this, keeping the aspect ratio
    resize_hw: tuple[int, int] | None  # or resize to exactly (H, W)
    crop_hw: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float | None  # None: no rescale
    normalize: bool
    interpolation: str  # torchvision InterpolationMode value: "bicubic", "bilinear" or "nearest"

    @classmethod
    def from_processor(cls, processor) -> ClipImageTransform | None:
        """Return the transform matching a transformers image processor's saved settings, or None when the processor
        uses an option this path does not implement (longest_edge, padding, no centre crop, BOX/LANCZOS...)."""
        # PIL resample ids (as saved in preprocessor_config.json) that tensor resizing reproduces.
        modes = {0: "nearest", 2: "bilinear", 3: "bicubic"}
        resample = getattr(processor, "resample", 3)
        resample = getattr(resample, "value", 3 if resample is None else resample)  # PILImageResampling -> int
        if not isinstance(resample, int) or resample not in modes:
            return None
        size = getattr(processor, "size", None) or {}
        crop = getattr(processor, "crop_size", None) or {}
        shortest = _size_value(size, "shortest_edge")
        height, width = _size_value(size, "height"), _size_value(size, "width")
        crop_hw = (_size_value(crop, "height"), _size_value(crop, "width"))
        if (
            not getattr(processor, "do_resize", True)
            or not getattr(processor, "do_center_crop", False)
            or not all(crop_hw)
            or getattr(processor, "do_pad", False)
            or _size_value(size, "longest_edge")
            or (shortest is None and not (height and width))
        ):
            return None
        do_normalize = bool(getattr(processor, "do_normalize", True))
        mean = tuple(float(v) for v in np.broadcast_to(processor.image_mean, 3)) if do_normalize else (0.0,) * 3
        std = tuple(float(v) for v in np.broadcast_to(processor.image_std, 3)) if do_normalize else (1.0,) * 3
        return cls(
            shortest_edge=shortest,
            resize_hw=None if shortest else (height, width),
            crop_hw=crop_hw,
            mean=mean,
            std=std,
            rescale_factor=float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else None,
            normalize=do_normalize,
            interpolation=modes[resample],
        )

    def resized_hw(self, height: int, width: int) -> tuple[int, int]:
        """Return the (H, W) an (height, width) image is resized to (transformers' shortest-edge rule)."""
        if self.shortest_edge is None:
            return self.resize_hw
        short, long = min(height, width), max(height, width)
        new_long = int(self.shortest_edge * long / short)
        return (self.shortest_edge, new_long) if height <= width else (new_long, self.shortest_edge)

    def __call__(self, images: Sequence[np.ndarray], *, device: str = "cpu"):
        """Return the pixel values of (h, w, 3) uint8 RGB arrays of any sizes, (N, 3, H, W) float32 on ``device``."""
        import torch
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as tvF

        mode = InterpolationMode(self.interpolation)
        crop_h, crop_w = self.crop_hw
        batch = torch.empty((len(images), 3, crop_h, crop_w), dtype=torch.uint8)
        for n, array in enumerate(images):
            array = np.asarray(array)
            if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8 or 0 in array.shape:
                raise ValueError(f"expected an RGB image (H, W, 3) uint8, got shape {array.shape} {array.dtype} "
                                 f"(image {n} of the batch)")
            image = torch.from_numpy(array).permute(2, 0, 1)  # a channels-last view: no copy
            new_hw = self.resized_hw(*array.shape[:2])
            if tuple(new_hw) != tuple(array.shape[:2]):
                image = tvF.resize(image, list(new_hw), interpolation=mode, antialias=True)
            height, width = image.shape[-2:]
            if crop_h > height or crop_w > width:
                # As transformers does: pad with black (left/top get the smaller half), then crop.
                pad_w, pad_h = max(crop_w - width, 0), max(crop_h - height, 0)
                image = tvF.pad(image, [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2], fill=0)
                height, width = image.shape[-2:]
            top, left = int((height - crop_h) / 2.0), int((width - crop_w) / 2.0)  # floor, as transformers
            batch[n] = image[:, top : top + crop_h, left : left + crop_w]
        # uint8 to the device (4x fewer bytes than float), then one normalise for the whole batch.
        pixels = batch.to(device, non_blocking=True).float()
        if self.normalize:
            # transformers' fused form: (x - mean / rescale) / (std / rescale).
            scale = self.rescale_factor or 1.0
            mean = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1) / scale
            std = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1) / scale
            return pixels.sub_(mean).div_(std)
        return pixels.mul_(self.rescale_factor) if self.rescale_factor is not None else pixels


class ClipScorer:
    """CLIP image and text embeddings in batches, L2-normalised, as float32 numpy arrays."""

    def __init__(self, model_name_or_dir: str, *, device: str = "auto", batch_size: int = 64):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        from structxlip.models import resolve_model_source

        if batch_size <= 0:
            raise ValueError(f"expected batch_size > 0, got {batch_size}")
        from structxlip.model_files import ModelLoadError, reading_model_file

        source = resolve_model_source(str(model_name_or_dir))
        try:
            with reading_model_file(source):  # a damaged weights/config file: ModelLoadError naming it
                self.model = CLIPModel.from_pretrained(source)
                self.tokenizer = AutoTokenizer.from_pretrained(source)
                self.image_processor = AutoImageProcessor.from_pretrained(source)
        except ModelLoadError:
            raise
        except (OSError, ValueError, KeyError) as exc:
            raise RuntimeError(
                f"could not load CLIP model {model_name_or_dir!r} for scoring: {one_line(exc)} -- give a local folder "
                "saved with save_pretrained or a hub id reachable from this machine"
            ) from None
        self.device = str(resolve_device(device))
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        # Batched tensor preprocessing: the processor's pixels at 1.5-2x its speed (it copies every image to
        # contiguous CHW, then casts and normalises image by image); the processor itself only for settings the
        # fast path does not implement.
        self.image_transform = ClipImageTransform.from_processor(self.image_processor)
        self.max_text_tokens = int(self.model.config.text_config.max_position_embeddings)

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Return the normalised image embeddings of (H, W, 3) uint8 RGB arrays, (N, D) float32."""
        import torch

        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = list(images[start : start + self.batch_size])
            pixels = self._pixels(batch)
            with torch.inference_mode(), _autocast(self.device):
                features = _pooled(self.model.get_image_features(pixel_values=pixels))
            chunks.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
        return self._stack(chunks)

    def _pixels(self, images: list[np.ndarray]):
        """Return the model's pixel values of (h, w, 3) uint8 RGB arrays, (N, 3, H, W) float32 on the device."""
        if self.image_transform is not None:
            return self.image_transform(images, device=self.device)
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Return the normalised text embeddings, truncated at the model's max positions, (M, D) float32."""
        import torch

        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_text_tokens,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode(), _autocast(self.device):
                features = _pooled(
                    self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
                )
            chunks.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
        return self._stack(chunks)

    def _stack(self, chunks) -> np.ndarray:
        if not chunks:
            return np.zeros((0, int(self.model.config.projection_dim)), dtype=np.float32)
        import torch

        return torch.cat(chunks).numpy().astype(np.float32, copy=False)


class Captioner:
    """A generative image-to-text model (BLIP, ViT+GPT-2 VisionEncoderDecoder...) writing one caption per image."""

    def __init__(self, model_id: str, *, device: str = "auto", max_new_tokens: int = 40):
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        from structxlip.model_files import ModelLoadError, reading_model_file

        try:
            with reading_model_file(model_id):
                self.model = AutoModelForImageTextToText.from_pretrained(model_id)
                self.image_processor = AutoImageProcessor.from_pretrained(model_id)
                self.tokenizer = AutoTokenizer.from_pretrained(model_id)
        except ModelLoadError:
            raise
        except (OSError, ValueError, KeyError) as exc:
            raise RuntimeError(
                f"could not load captioner {model_id!r}: {one_line(exc)} -- give an image-to-text model (e.g. "
                "Salesforce/blip-image-captioning-base) as a local folder or a reachable hub id"
            ) from None
        self.device = str(resolve_device(device))
        self.model.to(self.device).eval()
        self.max_new_tokens = max_new_tokens

    def caption(self, images: Sequence[np.ndarray], *, batch_size: int = 16) -> list[str]:
        """Return one generated caption per (H, W, 3) uint8 RGB image (stripped text)."""
        import torch

        captions: list[str] = []
        for start in range(0, len(images), batch_size):
            batch = list(images[start : start + batch_size])
            pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            with torch.inference_mode(), _autocast(self.device):
                generated = self.model.generate(pixel_values=pixels, max_new_tokens=self.max_new_tokens)
            captions += [
                " ".join(text.split()) for text in self.tokenizer.batch_decode(generated, skip_special_tokens=True)
            ]
        return captions


# ---------------------------------------------------------------------------------------------------------------
# Stage
# ---------------------------------------------------------------------------------------------------------------
# spaCy's default ``Language.max_length``: a longer text is refused (E088), and would take about 1 GB per 100,000
# characters to parse.
MAX_CAPTION_CHARACTERS = 1_000_000


class CaptionInputError(ValueError):
    """A record or one of its files is unusable; the message is one line naming it."""


def _path(layout: OutputLayout, path: str) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else layout.resolve(path)


def load_thumbnail(path: str | os.PathLike, long_side: int = FULL_IMAGE_LONG_SIDE) -> np.ndarray:
    """Return the image at ``path`` as (h, w, 3) uint8 RGB with its long side at most ``long_side`` (EXIF-oriented)."""
    from PIL import Image

    from pipelines.steps.images import image_orientation, orient_image
    from storage.filenames import display_path, source_file

    path = source_file(path)  # a source name with undecodable bytes is stored \xNN-escaped
    name = display_path(path.name)
    try:
        with Image.open(path) as image:
            orientation = image_orientation(image)
            image.draft("RGB", (long_side, long_side))  # JPEG: decode at 1/2..1/8 scale directly
            image.load()
            return _thumbnail(orient_image(image, orientation).convert("RGB"), long_side)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise CaptionInputError(f"cannot read image: {detail} ({name})") from None


def draft_scale(long_sides: Sequence[int], long_side: int = FULL_IMAGE_LONG_SIDE) -> int:
    """Return the largest JPEG DCT reduction (8, 4 or 2; else 1) after which every item whose long side in source
    pixels is in ``long_sides`` still has at least ``min(its long side, long_side)`` pixels on its long side.

    An item at most ``long_side`` long is never reduced, so any such item means 1."""
    shortest = min(long_sides, default=0)
    return next((scale for scale in _DCT_SCALES if shortest >= scale * long_side), 1)


@dataclass
class SourcePixels:
    """A source image decoded once: its full view and crops, each (h, w, 3) uint8 RGB, long side at most 448."""

    full_image: np.ndarray | None
    crops: list[np.ndarray]
    scale: int  # the JPEG DCT reduction it was decoded at (1: full resolution)


def load_source_crops(
    path: str | os.PathLike,
    boxes: Sequence[tuple[int, int, int, int]],
    *,
    full_image: bool = True,
    long_side: int = FULL_IMAGE_LONG_SIDE,
    max_pixels: int = MAX_PIXELS,
    validated: bool = False,
) -> SourcePixels:
    """Return the full image (when asked) and the crops ``boxes`` of the source at ``path``, decoding it once.

    Boxes are ``(x1, y1, x2, y2)`` in pixels of the EXIF-oriented source (as ``load_rgb`` returns it), x2/y2
    exclusive; like a numpy slice of that image they are clipped to it, and a box left empty is an error. A JPEG is
    decoded at the ``draft_scale`` of the full image (when asked) and the crops, so each keeps the resolution a
    full-resolution decode would give it after shrinking to ``long_side`` (``_thumbnail``), which every item then gets.
    ``validated``: the file passed ``validate_image`` (ingest): a complete 8-bit JPEG is then decoded by OpenCV, to
    the same pixels, faster (as ``load_rgb``). Crops are slices of the decoded pixels, turned as displayed.
    Raises ``CaptionInputError`` (``pipelines.steps.images``' one-line messages, naming the file) on any problem.
    """
    from PIL import Image

    from pipelines.steps.images import (ImageLoadError, _fail, _open_checked, _opencv_rgb, _pil_to_rgb,
                                        displayed_box, image_orientation, orient_array, read_source)

    try:
        path, data = read_source(path)
        image, name = _open_checked(path, data, max_pixels)
    except ImageLoadError as exc:
        raise CaptionInputError(str(exc)) from None
    try:
        with image:
            image.seek(0)  # animated images: the first frame, as load_rgb
            orientation = image_orientation(image)  # before load: the one definition every loader uses
            width, height = orientation.size
            stored_w, stored_h = image.size  # the pixels PIL decodes (already displayed for an oriented TIFF)
            clipped = []
            for box in boxes:
                x1, y1, x2, y2 = (min(max(int(v), 0), limit) for v, limit in zip(box, (width, height) * 2))
                if x2 <= x1 or y2 <= y1:
                    raise CaptionInputError(f"region box {tuple(box)} is empty inside the {width}x{height} image "
                                            f"({name})")
                clipped.append((x1, y1, x2, y2))
            scale = 1
            if image.format in ("JPEG", "MPO"):
                sides = [max(x2 - x1, y2 - y1) for x1, y1, x2, y2 in clipped]
                scale = draft_scale(sides + ([max(width, height)] if full_image else []), long_side)
            # Stored pixels (the crops are cut before they are turned), by OpenCV where it decodes them as PIL would.
            pixels = _opencv_rgb(image, orientation, data, factor=scale, oriented=False) if validated else None
            if pixels is None:
                if scale > 1:
                    # PIL drafts at the largest 1/s with both sides >= the request: asking for floor(size / s) gives s.
                    image.draft("RGB", (max(stored_w // scale, 1), max(stored_h // scale, 1)))
                image.load()  # full decode now, so truncation surfaces here
                # The reduction applied, from the decoded size (ceil(size / s)); a multi-tile JPEG ignores the draft.
                scale = next((s for s in (1, *_DCT_SCALES) if image.size == (-(-stored_w // s), -(-stored_h // s))),
                             0)
                if not scale:
                    raise OSError(f"decoded at {image.size}, not a reduction of its {stored_w}x{stored_h} pixels")
                pixels = np.asarray(image) if image.mode == "RGB" else _pil_to_rgb(image)
            rows, columns = pixels.shape[:2]
            crops = []
            for box in clipped:
                x1, y1, x2, y2 = displayed_box(box, orientation)
                # The reduced pixel grid: pixel i covers stored pixels [i * s, (i + 1) * s); keep every one the box
                # touches (at least one).
                left, top = min(x1 // scale, columns - 1), min(y1 // scale, rows - 1)
                right = min(max(-(-x2 // scale), left + 1), columns)
                bottom = min(max(-(-y2 // scale), top + 1), rows)
                crops.append(_thumbnail(orient_array(pixels[top:bottom, left:right], orientation.pending), long_side))
            full = _thumbnail(orient_array(pixels, orientation.pending), long_side) if full_image else None
    except CaptionInputError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise CaptionInputError(str(_fail("cannot decode image", exc, name))) from None
    except MemoryError:
        raise CaptionInputError(f"cannot decode image: out of memory ({name})") from None
    return SourcePixels(full_image=full, crops=crops, scale=scale)


def _thumbnail(image, long_side: int) -> np.ndarray:
    """Return an RGB image (PIL, or an (h, w, 3) uint8 array) as a writable (h, w, 3) uint8 array of its own with its
    long side at most ``long_side``: shrunk with OpenCV's area averaging (1.0 ms for 640x480 -> 448 vs 3.9 ms for
    PIL's bicubic ``thumbnail``) to the size PIL's ``thumbnail`` gives. CLIP's own transform then resizes it to its
    input size."""
    import cv2

    from pipelines.steps.images import thumbnail_size

    array = image if isinstance(image, np.ndarray) else np.asarray(image)
    height, width = array.shape[:2]
    size = thumbnail_size(width, height, long_side)  # PIL's thumbnail size, so the sizes stay what they were
    # A copy where nothing shrinks: writable (torch.from_numpy warns on read-only PIL buffers), and no view of the
    # decoded image the other crops share.
    return array.copy() if size == (width, height) else cv2.resize(array, size, interpolation=cv2.INTER_AREA)


def _load_crop(layout: OutputLayout, crop_path: str | None, image_name: str) -> np.ndarray:
    if not crop_path:
        raise CaptionInputError(f"segment without bbox or crop_path ({image_name})")
    return load_thumbnail(_path(layout, crop_path))


def _box(segment, index: int, image_name: str) -> tuple[int, int, int, int] | None:
    """Return a segment's bbox as (x1, y1, x2, y2), or None when it has none (its crop file is read instead)."""
    if not isinstance(segment, dict):
        raise CaptionInputError(f"invalid segment {index}: expected a dict, got {type(segment).__name__} "
                                f"({image_name})")
    box = segment.get("bbox")
    if box is None:
        return None
    try:
        return tuple(int(box[key]) for key in ("x1", "y1", "x2", "y2"))
    except (KeyError, TypeError, ValueError):
        shown = " ".join(repr(box).split())[:80]
        raise CaptionInputError(
            f"invalid bbox of segment {index}: expected {{x1, y1, x2, y2}} pixels, got {shown} ({image_name})"
        ) from None


@dataclass
class _Work:
    """One image being processed: its sentences, its pixels, and where they land in its group's batches."""

    index: int  # position in the chunk's records
    record: dict
    caption: str | None
    caption_source: str | None
    sentences: list[str]
    crop_rows: list[int] = field(default_factory=list)  # rows into the group's image embeddings (full image first)
    sentence_rows: list[int] = field(default_factory=list)
    full_image: np.ndarray | None = None
    crops: list[np.ndarray | None] | None = None  # per segment: cut from the source (None: read its crop file)
    has_full: bool = False  # whether crop_rows[0] is the full image
    error: str | None = None
    result: dict | None = None

    @property
    def name(self) -> str:
        return Path(str(self.record.get("source_path"))).name


def _failed(image_id, error: str) -> dict:
    return {
        "image_id": image_id,
        "status": STATUS_FAILED,
        "error": error,
        "caption": None,
        "caption_source": None,
        "segments": [],
    }


def _groups(works: list[_Work], max_crops: int) -> list[list[_Work]]:
    """Return consecutive groups of works, each with at most ``max_crops`` crops (full images included) unless a
    single image has more."""
    groups: list[list[_Work]] = []
    size = 0
    for work in works:
        crops = 1 + len(work.record.get("segments") or [])
        if not groups or size + crops > max_crops:
            groups.append([])
            size = 0
        groups[-1].append(work)
        size += crops
    return groups


def score_local_captions(
    records: list[dict],
    *,
    layout: OutputLayout,
    scorer: ClipScorer,
    nlp,
    include_full_image: bool = True,
    captioner: Captioner | None = None,
    caption_regions: bool = False,
    max_pixels: int = MAX_PIXELS,
    group_crops: int | None = None,
) -> list[dict]:
    """Return one ``{image_id, status, error, caption, caption_source, segments}`` per record.

    ``segments`` are the input segments that received a sentence (or, with ``caption_regions``, a generated
    caption), each with ``caption`` and ``similarity_score`` (100 * cos), ranked by score, highest first. Sources are
    those ingest validated (``validate_image``): each is decoded once, as such (``load_source_crops(validated=True)``),
    and its crops cut by their ``bbox``; a segment without one is read from its ``crop_path``. Images go through CLIP
    in groups of about ``group_crops`` crops (default ``GROUP_CLIP_BATCHES`` of the scorer's batches), so memory holds
    one group's pixels, not the chunk's.
    """
    if group_crops is None:
        group_crops = GROUP_CLIP_BATCHES * int(getattr(scorer, "batch_size", 64))
    works: list[_Work] = []
    outputs: dict[int, dict] = {}
    for n, record in enumerate(records):
        image_id = record.get("image_id")
        if record.get("status", STATUS_OK) != STATUS_OK:
            outputs[n] = _failed(image_id, f"skipped: an earlier stage failed ({record.get('error')})")
            continue
        caption = record.get("caption")
        caption = caption.strip() if isinstance(caption, str) and caption.strip() else None
        if caption is not None and len(caption) > MAX_CAPTION_CHARACTERS:
            outputs[n] = _failed(image_id, f"caption of {len(caption):,} characters: more than the "
                                           f"{MAX_CAPTION_CHARACTERS:,} spaCy splits into sentences (shorten it)")
            continue
        works.append(_Work(n, record, caption, record.get("caption_source") if caption else None, []))

    # Sentences of every given caption of the chunk, split in one pass (text: cheap to hold for the whole chunk).
    captioned = [w for w in works if w.caption is not None]
    for work, clauses in zip(captioned, sentence_clauses([w.caption for w in captioned], nlp) if captioned else []):
        work.sentences = clauses

    for group in _groups(works, max(1, group_crops)):
        _score_group(group, layout=layout, scorer=scorer, nlp=nlp, include_full_image=include_full_image,
                     captioner=captioner, caption_regions=caption_regions, max_pixels=max_pixels)
        for work in group:
            outputs[work.index] = work.result
    return [outputs[n] for n in range(len(records))]


def _score_group(
    works: list[_Work],
    *,
    layout: OutputLayout,
    scorer: ClipScorer,
    nlp,
    include_full_image: bool,
    captioner: Captioner | None,
    caption_regions: bool,
    max_pixels: int,
) -> None:
    """Set ``result`` of every work of one group: decode, caption, embed and assign; its pixels are freed after."""
    generate = captioner is not None
    # 1. Pixels: each source decoded once, for its full image (crop 0; or to caption an image without a caption)
    # and the crops of every image that can receive a sentence or a generated caption.
    for work in works:
        segments = work.record.get("segments") or []
        if not isinstance(segments, (list, tuple)):
            work.error = f"invalid segments: expected a list, got {type(segments).__name__} ({work.name})"
            continue
        # Without segments no sentence can land anywhere: the full image only serves a captioner then.
        needs_full = (include_full_image and bool(work.sentences) and bool(segments)) or (
            work.caption is None and generate
        )
        needs_crops = bool(segments) and (
            bool(work.sentences) or (generate and (caption_regions or work.caption is None))
        )
        if not (needs_full or needs_crops):
            continue
        name = work.name
        try:
            source_path = work.record["source_path"]
            if not isinstance(source_path, (str, os.PathLike)):
                raise TypeError
            boxes = [_box(segment, k, name) for k, segment in enumerate(segments)] if needs_crops else []
            pixels = load_source_crops(  # ingest validated every source it passes on
                source_path, [b for b in boxes if b is not None], full_image=needs_full, max_pixels=max_pixels,
                validated=True)
        except CaptionInputError as exc:
            work.error = str(exc)
            continue
        except (KeyError, TypeError):
            work.error = f"invalid record: no source_path ({work.record.get('image_id')})"
            continue
        work.full_image = pixels.full_image
        cut = iter(pixels.crops)
        work.crops = [next(cut) if box is not None else None for box in boxes] if needs_crops else None

    # 2. Generated captions for images that have none (one batched call for the group), then their sentences.
    if generate:
        todo = [w for w in works if w.error is None and w.caption is None and w.full_image is not None]
        for work, text in zip(todo, captioner.caption([w.full_image for w in todo]) if todo else []):
            if text:
                work.caption, work.caption_source = text, CAPTION_SOURCE_GENERATED
        fresh = [w for w in todo if w.caption is not None]
        for work, clauses in zip(fresh, sentence_clauses([w.caption for w in fresh], nlp) if fresh else []):
            work.sentences = clauses

    # 3. Crops of every image that can receive a sentence or a generated region caption.
    images: list[np.ndarray] = []
    region_images: list[tuple[_Work, int]] = []  # (work, segment index) to caption with the captioner
    for work in works:
        if work.error is not None or not (work.sentences or (caption_regions and generate)) or work.crops is None:
            continue  # work.crops is None: no segments, or none needed
        try:
            # Segments without a bbox (hand-made records) fall back to their crop file.
            crops = [
                crop if crop is not None else _load_crop(layout, segment.get("crop_path"), work.name)
                for crop, segment in zip(work.crops, work.record.get("segments") or [])
            ]
        except (CaptionInputError, AttributeError, TypeError) as exc:
            work.error = str(exc) if isinstance(exc, CaptionInputError) else f"invalid segments ({work.name})"
            continue
        if caption_regions and generate:
            region_images += [(work, k) for k in range(len(crops))]
        work.has_full = include_full_image and work.full_image is not None and bool(work.sentences)
        if work.has_full:
            crops = [work.full_image] + crops
        work.crop_rows = list(range(len(images), len(images) + len(crops)))
        images += crops

    region_captions: dict[tuple[int, int], str] = {}
    if region_images:
        texts = captioner.caption([images[w.crop_rows[k + w.has_full]] for w, k in region_images])
        region_captions = {(id(w), k): t for (w, k), t in zip(region_images, texts) if t}

    # 4. One batched pass over the group's crops and sentences.
    sentences: list[str] = []
    for work in works:
        if work.error is None and work.crop_rows:
            work.sentence_rows = list(range(len(sentences), len(sentences) + len(work.sentences)))
            sentences += work.sentences
    extra_rows = {key: len(sentences) + i for i, key in enumerate(region_captions)}
    sentences += list(region_captions.values())
    image_embeds = scorer.embed_images(images) if images else None
    sentence_embeds = scorer.embed_texts(sentences) if sentences else None
    del images
    for work in works:
        work.full_image, work.crops = None, None

    # 5. Per image: assign its sentences to its crops.
    for work in works:
        record = work.record
        if work.error is not None:
            work.result = _failed(record.get("image_id"), work.error)
            continue
        in_segments = list(record.get("segments") or [])
        offset = int(work.has_full)
        chosen: dict[int, tuple[list[int], float]] = {}  # segment index -> (sentence indices, best score)
        if work.sentence_rows and work.crop_rows:
            crops = image_embeds[work.crop_rows]
            for s, assignment in enumerate(assign_sentences(crops, sentence_embeds[work.sentence_rows])):
                segment = assignment.crop_index - offset
                if segment < 0:
                    continue  # the full image won: the sentence describes the whole scene
                found, best = chosen.get(segment, ([], float("-inf")))
                chosen[segment] = (found + [s], max(best, assignment.similarity_score))
        segments = []
        for k, source in enumerate(in_segments):
            if k in chosen:
                indices, score = chosen[k]
                text = join_sentences([work.sentences[i] for i in indices])
            elif (id(work), k) in region_captions:
                text = region_captions[(id(work), k)]
                row = image_embeds[work.crop_rows[k + offset]]
                score = float(similarity_logits(row[None], sentence_embeds[[extra_rows[(id(work), k)]]])[0, 0])
            else:
                continue
            segments.append(
                {
                    "bbox": source.get("bbox"),
                    "crop_path": source.get("crop_path"),
                    "structure_crop_path": source.get("structure_crop_path"),
                    "caption": text,
                    "similarity_score": float(score),
                }
            )
        segments.sort(key=lambda s: -s["similarity_score"])  # stable: equal scores keep region order
        work.result = {
            "image_id": record.get("image_id"),
            "status": STATUS_OK,
            "error": None,
            "caption": work.caption,
            "caption_source": work.caption_source,
            "segments": segments,
        }
