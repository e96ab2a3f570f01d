"""Hard negatives: each changes exactly one attribute span, deterministically, without duplicates."""

from __future__ import annotations

import difflib
import itertools
from pathlib import Path

import pytest

from pipelines.steps.filtering import load_spacy, load_vocabulary
from pipelines.steps.hard_negatives import find_replaceables, make_hard_negatives

VOCAB_DIR = Path(__file__).resolve().parents[2] / "configs" / "vocab"


@pytest.fixture(scope="module")
def vocab():
    return load_vocabulary(str(VOCAB_DIR))


@pytest.fixture(scope="module")
def nlp():
    return load_spacy("en_core_web_sm")


def changed_spans(original: str, negative: str) -> list[tuple[str, str]]:
    """Return the (old, new) word spans that differ between two captions (independent of spaCy)."""
    a, b = original.split(), negative.split()
    ops = difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes()
    return [(" ".join(a[i1:i2]), " ".join(b[j1:j2])) for tag, i1, i2, j1, j2 in ops if tag != "equal"]


COLORS = {"red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey", "gray"}


@pytest.mark.parametrize(
    "caption, old, allowed",
    [
        ("A dog sleeps on a red blanket.", "red", COLORS - {"red"}),
        (
            "A dog sleeps on a wooden bench.",
            "wooden",
            {
                "metal",
                "glass",
                "plastic",
                "stone",
                "leather",
                "cotton",
                "silk",
                "woollen",
                "paper",
                "ceramic",
                "concrete",
                "brick",
                "marble",
                "steel",
            },
        ),
        (
            "A dog sleeps on a silk cushion.",
            "silk",
            {
                "wood",
                "metal",
                "glass",
                "plastic",
                "stone",
                "leather",
                "cotton",
                "wool",
                "paper",
                "ceramic",
                "concrete",
                "brick",
                "marble",
                "steel",
            },
        ),
        ("Two dogs sleep on the sofa.", "Two", {"Three", "One", "Four"}),
        ("A shelf holds 3 books.", "3", {"4", "2", "5"}),
        ("A cat sits on the left side of the sofa.", "left", {"right"}),
        ("A lamp hangs above the table.", "above", {"below"}),
        ("A book lies on the top shelf.", "top", {"bottom"}),
        ("A navy blue coat hangs on the hook.", "navy blue", COLORS),
    ],
)
def test_each_kind_changes_exactly_one_span(vocab, caption, old, allowed):
    negatives = make_hard_negatives(caption, vocab=vocab, max_negatives=20)
    assert negatives, caption
    for negative in negatives:
        spans = changed_spans(caption, negative)
        assert len(spans) == 1, (caption, negative)
        before, after = spans[0]
        assert before == old and after in allowed, (caption, negative)


def test_article_agreement_is_preserved(vocab):
    # "an" may only be followed by a colour starting with a vowel; "a" never by "orange".
    assert make_hard_negatives("An orange cup stands here.", vocab=vocab) == []
    negatives = make_hard_negatives("A red apple lies on a plate.", vocab=vocab, max_negatives=20)
    assert negatives and not any("A orange" in n for n in negatives)


def test_cap_distinct_deterministic(vocab, nlp):
    caption = "Two red apples lie on the left of a wooden table."
    negatives = make_hard_negatives(nlp(caption), vocab=vocab, max_negatives=3, seed_key=caption)
    assert len(negatives) == 3 and len(set(negatives)) == 3 and caption not in negatives
    assert make_hard_negatives(caption, vocab=vocab, max_negatives=3, seed_key=caption) == negatives
    # with the cap at 3 and four changeable spans, each negative changes a different attribute
    assert len({changed_spans(caption, n)[0][0] for n in negatives}) == 3
    everything = make_hard_negatives(caption, vocab=vocab, max_negatives=100)
    # 10 other colours + 14 other materials + 3 numbers (Three, One, Four) + 1 side
    assert len(everything) == len(set(everything)) == 10 + 14 + 3 + 1
    assert make_hard_negatives(caption, vocab=vocab, max_negatives=0) == []


def test_seed_changes_choice_but_not_validity(vocab):
    caption = "A red ball lies in the green grass."
    picks = {tuple(make_hard_negatives(caption, vocab=vocab, max_negatives=1, seed_key=str(k))) for k in range(12)}
    assert len(picks) > 1  # the seed key drives the choice
    for (negative,) in picks:
        assert len(changed_spans(caption, negative)) == 1


def test_capitalisation_is_kept(vocab):
    for negative in make_hard_negatives("Red apples and Two pears.", vocab=vocab, max_negatives=20):
        ((_, after),) = changed_spans("Red apples and Two pears.", negative)
        assert after[0].isupper() and after[1:].islower()


def test_nothing_to_change(vocab):
    assert make_hard_negatives("A dog sleeps under a tree.", vocab=vocab) == []
    assert make_hard_negatives("The cat left the room right now.", vocab=vocab) == []  # verb "left", adverb "right"
    assert make_hard_negatives("Orange County at night.", vocab=vocab) == []  # a name, not a colour


def test_replaceables_are_ordered_and_disjoint(vocab, nlp):
    spans = find_replaceables(nlp("Three green cups stand above two grey plates."), vocab=vocab)
    assert [s.kind for s in spans] == ["number", "color", "spatial", "number", "color"]
    ends = [(s.start_char, s.end_char) for s in spans]
    assert all(e1 <= s2 for (_, e1), (s2, _) in itertools.pairwise(ends))
    grey = spans[-1]
    assert "grey" not in grey.options and "gray" not in grey.options
