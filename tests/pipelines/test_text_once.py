"""Text parsed once: the sentence-only splitter gives the full parser's clauses, and the hard-negative search without
Doc slicing gives exactly the old implementation's negatives (golden outputs)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pipelines.steps.captions import SentenceSplitter, _clauses, sentence_clauses, split_sentences
from pipelines.steps.filtering import load_spacy, load_vocabulary
from pipelines.steps.hard_negatives import find_replaceables, make_hard_negatives
from tests.corpus import make_generated_images

ROOT = Path(__file__).resolve().parents[2]
VOCAB_DIR = ROOT / "configs" / "vocab"

# Hand-made captions: abbreviations, ';' clauses, quotes, ellipses, brackets, asides, no punctuation at all.
HAND_MADE = [
    "Dr. Smith stands next to a red car on St. James Street. The car is parked near a U.S. flag; a dog sits beside it.",
    'A sign reads "Stop here." A man in a blue coat waits at the corner.',
    "A woman holds a mug, e.g. a white one with a logo. Behind her, a window shows the sea at approx. 5 p.m. light.",
    "Two cats sleep on a sofa; one is black, the other is ginger. A lamp glows in the corner!",
    "Is that a boat? Yes, a small wooden boat floats on the calm lake near the shore.",
    "A bowl of fruit (apples, pears, etc.) sits on the table. The wall behind is pale green.",
    "The photo shows Mt. Fuji at dawn... Snow covers the peak, and clouds drift by.",
    "A red bus - a double-decker - drives past Big Ben. People walk on the pavement; some carry umbrellas.",
    "'What a view,' says the caption. A valley stretches to the horizon under a grey sky.",
    "A man wearing a No. 10 shirt kicks a ball. The goalkeeper, in yellow, dives to the left.",
    "three apples on a plate a knife beside them a glass of water",
    "A close-up of a clock face: the hands point to 10:10. The numerals are Roman (I, II, III...).",
    "A navy blue boat with a sky-blue sail; two light grey gulls above it. The jet black dog is on the left.",
    "A dark gray car is parked below a hot pink sign. \"Open,\" it says; the door is off white.",
    "  ; ; A lone tree.  ",
]


@pytest.fixture(scope="module")
def parser():
    return load_spacy("en_core_web_sm")


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> list[str]:
    """Realistic captions: the bundled sample's and 60 generated 30+-word ones, then the hand-made ones."""
    folder = tmp_path_factory.mktemp("generated")
    make_generated_images(folder, 60, size=(32, 32), seed=3)
    texts = [json.loads(line)["caption"] for line in (folder / "captions.jsonl").read_text().splitlines()]
    sample = ROOT / "sample" / "images"
    texts += [json.loads(line)["caption"] for line in (sample / "captions.jsonl").read_text().splitlines()]
    texts += [p.read_text(encoding="utf-8") for p in sorted(sample.glob("*.txt"))]
    return texts


def test_splitter_gives_the_parser_clauses(parser, captions):
    splitter = SentenceSplitter("en_core_web_sm")
    expected = [_clauses(doc) for doc in parser.pipe(captions + HAND_MADE)]
    assert splitter.clauses(captions + HAND_MADE) == expected
    # The realistic captions never needed the parser: both sentence-only splitters agreed on every one.
    realistic = SentenceSplitter("en_core_web_sm")
    assert realistic.clauses(captions) == expected[: len(captions)] and realistic.parsed == 0
    # The hand-made ones include texts the two disagree on ("No. 10", "etc.)", "dawn... Snow"): parsed.
    assert 0 < splitter.parsed <= len(HAND_MADE)


def test_split_sentences_default_splitter():
    assert split_sentences("Dr. Smith waves. A red car; a dog.") == ["Dr. Smith waves.", "A red car", "a dog."]
    assert split_sentences("  ") == [] and split_sentences("; ; .") == []
    assert sentence_clauses([], SentenceSplitter("en_core_web_sm")) == []


# ---- hard negatives: golden outputs ----------------------------------------------------------------------------------
GOLDEN = Path(__file__).resolve().parent / "golden" / "hard_negatives.json"


def _options_digest(options) -> str:
    return hashlib.sha256("|".join(options).encode()).hexdigest()[:12]


def test_hard_negatives_equal_the_golden_outputs(parser):
    """``golden/hard_negatives.json`` holds, for 49 captions (20 generated, the bundled sample's and the hand-made
    ones), the negatives of the Doc-slicing phrase search this module once used, each as an edit of the caption
    ``[start, end, replacement]``, and every replaceable span ``[start, end, kind, digest of its options]``. The
    search without Doc slicing must give exactly those."""
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    vocab = load_vocabulary(str(VOCAB_DIR))
    texts = [entry["caption"] for entry in golden]
    assert set(HAND_MADE) <= set(texts)
    multi_word = 0
    for entry, doc in zip(golden, parser.pipe(texts)):
        text = entry["caption"]
        expected = [text[:start] + replacement + text[end:] for start, end, replacement in entry["negatives"]]
        assert make_hard_negatives(doc, vocab=vocab, max_negatives=6, seed_key=text) == expected, text
        spans = [[r.start_char, r.end_char, r.kind, _options_digest(r.options)]
                 for r in find_replaceables(doc, vocab=vocab)]
        assert spans == entry["replaceable"], text
        multi_word += any(p in text.lower().replace("-", " ") for p in vocab.phrases["colors"] if " " in p)
    assert multi_word >= 2  # the multi-word colour branch is exercised


# ---- threads -------------------------------------------------------------------------------------------------------
def test_torch_threads_sized_to_cores_processes_and_load(monkeypatch):
    import os as _os

    from pipelines.steps import captions
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(_os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(_os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert captions.torch_threads_for(1) == 8  # idle machine: every core
    assert captions.torch_threads_for(2) == 4  # two worker processes share them
    assert captions.torch_threads_for(16) == 1
    monkeypatch.setattr(_os, "getloadavg", lambda: (6.6, 0.0, 0.0))
    assert captions.torch_threads_for(1) == 1  # ~7 cores busy: only the free one
    monkeypatch.setattr(_os, "getloadavg", lambda: (30.0, 0.0, 0.0))
    assert captions.torch_threads_for(1) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert captions.torch_threads_for(2) == 3  # an explicit setting wins


def test_captions_runtime_counts_local_worker_processes():
    from configs.schema import load_config
    from pipelines.engine.stages import STAGE_DEFINITIONS, stage_keys

    captions = STAGE_DEFINITIONS["captions"]
    local = load_config(None, {"captions.device": "cpu", "runtime.workers": 4})
    one = load_config(None, {"captions.device": "cpu", "runtime.workers": 1})
    dask = load_config(None, {"runtime.runner": "dask", "runtime.dask_workers": 3})
    remote = load_config(None, {"runtime.runner": "dask", "runtime.dask_workers": 3,
                                "runtime.dask_address": "tcp://10.0.0.1:8786"})
    assert captions.runtime(local)["processes_per_machine"] == 4  # the engine's worker processes
    assert captions.runtime(one)["processes_per_machine"] == 1
    assert captions.runtime(dask)["processes_per_machine"] == 3
    assert captions.runtime(remote)["processes_per_machine"] == 1  # the cluster's machines are not this one
    assert stage_keys(local) == stage_keys(dask)  # a runtime setting: no cache key changes
