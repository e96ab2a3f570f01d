"""Caption filtering: hand-written expected outputs for colours, materials, textures, domain words and grammar."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.steps.filtering import CaptionFilter, base_forms, load_spacy, load_vocabulary
from pipelines.steps.hard_negatives import filter_captions

VOCAB_DIR = Path(__file__).resolve().parents[2] / "configs" / "vocab"


@pytest.fixture(scope="module")
def colors_only() -> CaptionFilter:
    return CaptionFilter(vocab_dir=VOCAB_DIR)


@pytest.fixture(scope="module")
def everything() -> CaptionFilter:
    return CaptionFilter(vocab_dir=VOCAB_DIR, remove_materials=True, remove_textures=True, remove_domain=True)


# (caption, expected with colours only, expected with colours + materials + textures + domain)
CASES = [
    # coordinated attributes
    ("A red and white shirt hangs on a chair.", "A shirt hangs on a chair.", "A shirt hangs on a chair."),
    ("A black-capped bird holds a red, white and blue flag.", "A bird holds a flag.", "A bird holds a flag."),
    ("The car is tall and red.", "The car is tall.", "The car is tall."),
    (
        "A cat with green eyes sleeps on a brown, soft blanket.",
        "A cat with eyes sleeps on a soft blanket.",
        "A cat with eyes sleeps on a soft blanket.",
    ),
    # predicates: a relative clause goes entirely, a sentence that only stated a colour is dropped
    ("A man wears a shirt that is red.", "A man wears a shirt.", "A man wears a shirt."),
    ("A man wears a shirt that is red and white.", "A man wears a shirt.", "A man wears a shirt."),
    ("The shirt, which is light blue, has two pockets.", "The shirt has two pockets.", "The shirt has two pockets."),
    (
        "The car is red. It is parked on a quiet street.",
        "It is parked on a quiet street.",
        "It is parked on a quiet street.",
    ),
    # multi-word and modified colours
    ("A navy blue coat with light grey buttons.", "A coat with buttons.", "A coat with buttons."),
    (
        "Two men in dark blue suits stand to the left of a grey van.",
        "Two men in suits stand to the left of a van.",
        "Two men in suits stand to the left of a van.",
    ),
    ("A pale pink wall and a light fixture.", "A wall and a light fixture.", "A wall and a light fixture."),
    # hyphenated colours
    ("A reddish-brown bowl next to a blue-green vase.", "A bowl next to a vase.", "A bowl next to a vase."),
    (
        "The sky-blue door, the dark-grey wall and the cherry-red bench.",
        "The door, the wall and the bench.",
        "The door, the wall and the bench.",
    ),
    (
        "A bird with a bright yellow-orange beak perches on a branch.",
        "A bird with a beak perches on a branch.",
        "A bird with a beak perches on a branch.",
    ),
    (
        "A woman in a grey-and-white striped sweater reads.",
        "A woman in a striped sweater reads.",
        "A woman in a sweater reads.",
    ),
    # derived adjectives
    ("A yellowish butterfly on a whitish flower.", "A butterfly on a flower.", "A butterfly on a flower."),
    (
        "The woman wears a bluish dress and a woollen hat.",
        "The woman wears a dress and a woollen hat.",
        "The woman wears a dress and a hat.",
    ),
    ("Silvery golden metallic bowls sit on a shelf.", "Metallic bowls sit on a shelf.", "Bowls sit on a shelf."),
    (
        "A tiny shiny robot stands on a table.",
        "A tiny shiny robot stands on a table.",
        "A tiny robot stands on a table.",
    ),
    # materials as noun compounds, and words that are colours only sometimes
    (
        "A brightly colored silk dress on a glossy striped rug.",
        "A silk dress on a glossy striped rug.",
        "A dress on a rug.",
    ),
    (
        "An orange on the table next to a gold medal.",
        "An orange on the table next to a gold medal.",
        "An orange on the table next to a medal.",
    ),
    (
        "A silver car is parked next to a gold medal.",
        "A car is parked next to a gold medal.",
        "A car is parked next to a medal.",
    ),
    (
        "Olive oil and lime juice in a glass bottle.",
        "Olive oil and lime juice in a glass bottle.",
        "Olive oil and lime juice in a bottle.",
    ),
    (
        "A golden retriever sits on green grass.",
        "A golden retriever sits on grass.",
        "A golden retriever sits on grass.",
    ),
    (
        "A woman with blonde hair wears a black leather jacket.",
        "A woman with hair wears a leather jacket.",
        "A woman with hair wears a jacket.",
    ),
    # names and capitalisation
    (
        "Orange County is home to Red Bull fans.",
        "Orange County is home to Red Bull fans.",
        "Orange County is home to Red Bull fans.",
    ),
    ("Red Bull cans lie on the floor.", "Red Bull cans lie on the floor.", "Red Bull cans lie on the floor."),
    ("Green leaves cover the ground.", "Leaves cover the ground.", "Leaves cover the ground."),
    (
        "Red apples lie on a dark wooden table, beside a very bright red cup.",
        "Apples lie on a dark wooden table, beside a cup.",
        "Apples lie on a dark table, beside a cup.",
    ),
    # articles are re-chosen, punctuation tidied
    ("An orange shirt and a red apple.", "A shirt and an apple.", "A shirt and an apple."),
    ("An old red barn stands in a field.", "An old barn stands in a field.", "An old barn stands in a field."),
    ("Look: a red, shiny apple!", "Look: a shiny apple!", "Look: an apple!"),
    # domain vocabulary (insect colouration) is separate from textures
    (
        "A mottled brown moth with iridescent wings rests on a spotted leaf.",
        "A mottled moth with iridescent wings rests on a spotted leaf.",
        "A moth with wings rests on a leaf.",
    ),
    # fewer than two content words would remain: the original is kept
    ("A red car.", "A red car.", "A red car."),
    ("A blue one.", "A blue one.", "A blue one."),
    # nothing to remove: returned byte for byte
    ("Two  dogs run  on the beach.", "Two  dogs run  on the beach.", "Two  dogs run  on the beach."),
]


def test_table_has_enough_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("caption, expected_colors, expected_all", CASES, ids=[c[0][:40] for c in CASES])
def test_filter_table(colors_only, everything, caption, expected_colors, expected_all):
    assert colors_only.filter([caption]) == [expected_colors]
    assert everything.filter([caption]) == [expected_all]


def test_flags_are_independent():
    caption = "A wooden chair with a striped cushion stands beside a mottled red vase."
    materials = CaptionFilter(vocab_dir=VOCAB_DIR, remove_colors=False, remove_materials=True)
    textures = CaptionFilter(vocab_dir=VOCAB_DIR, remove_colors=False, remove_textures=True)
    domain = CaptionFilter(vocab_dir=VOCAB_DIR, remove_colors=False, remove_domain=True)
    nothing = CaptionFilter(vocab_dir=VOCAB_DIR, remove_colors=False)
    assert materials.filter([caption]) == ["A chair with a striped cushion stands beside a mottled red vase."]
    assert textures.filter([caption]) == ["A wooden chair with a cushion stands beside a mottled red vase."]
    assert domain.filter([caption]) == ["A wooden chair with a striped cushion stands beside a red vase."]
    assert nothing.filter([caption]) == [caption]


def test_min_content_words_threshold():
    caption = "A red car parks."  # content words after removal: car, parks
    assert CaptionFilter(vocab_dir=VOCAB_DIR, min_content_words=2).filter([caption]) == ["A car parks."]
    assert CaptionFilter(vocab_dir=VOCAB_DIR, min_content_words=3).filter([caption]) == [caption]


def test_base_forms_reduce_derived_adjectives():
    assert "red" in base_forms("reddish")
    assert "blue" in base_forms("bluish")
    assert "wood" in base_forms("wooden")
    assert "wool" in base_forms("woollen")
    assert "metal" in base_forms("metallic")
    assert "silver" in base_forms("silvery")
    assert "tin" not in base_forms("tiny")  # too short a stem to be a derivation


def test_vocabulary_files_parse():
    vocab = load_vocabulary(str(VOCAB_DIR))
    assert "navy blue" in vocab.phrases["colors"] and "red" in vocab.terms["colors"]
    assert (
        "silk" in vocab.terms["materials"]
        and "striped" in vocab.terms["textures"]
        and "mottled" in vocab.terms["domain"]
    )
    assert "light" in vocab.color_modifiers and "light" not in vocab.terms["colors"]
    assert vocab.material_swap["wood"] == "wooden"


def test_missing_vocabulary_and_model_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocabulary file not found"):
        load_vocabulary(str(tmp_path))
    with pytest.raises(RuntimeError, match="not installed: run `python -m spacy download"):
        load_spacy("xx_no_such_model")


def test_spacy_loader_falls_back_and_caches():
    assert load_spacy("en_core_web_sm") is load_spacy("en_core_web_sm")
    assert "ner" not in load_spacy("en_core_web_sm").pipe_names


def _record_pipe_calls(monkeypatch, caption_filter) -> list[list[str]]:
    """Return the list that every ``caption_filter.pipe`` call's texts are appended to from now on."""
    calls: list[list[str]] = []
    original_pipe = caption_filter.pipe

    def recording_pipe(texts):
        texts = list(texts)
        calls.append(texts)
        return original_pipe(texts)

    monkeypatch.setattr(caption_filter, "pipe", recording_pipe)
    return calls


def test_filter_captions_records(colors_only, monkeypatch):
    calls = _record_pipe_calls(monkeypatch, colors_only)
    records = [
        {
            "image_id": "a" * 32,
            "caption": "Two red apples lie on the left of a wooden table.",
            "segments": [
                {"bbox": {"x1": 0}, "caption": "A red apple on a plate."},
                {"bbox": {"x1": 5}, "caption": None},
            ],
        },
        {"image_id": "b" * 32, "caption": None, "segments": []},
    ]
    out = filter_captions(records, caption_filter=colors_only, max_hard_negatives=2)
    assert len(calls) == 1 and len(calls[0]) == 2  # every text of the chunk in one pipe call
    first, second = out
    assert first["status"] == "ok" and first["filtered_caption"] == "Two apples lie on the left of a wooden table."
    assert first["segments"][0] == {
        "bbox": {"x1": 0},
        "caption": "A red apple on a plate.",
        "filtered_caption": "An apple on a plate.",
    }
    assert first["segments"][1]["filtered_caption"] is None
    assert len(first["hard_negatives"]) == 2 and all(n != records[0]["caption"] for n in first["hard_negatives"])
    assert second == {
        "image_id": "b" * 32,
        "status": "ok",
        "error": None,
        "filtered_caption": None,
        "segments": [],
        "hard_negatives": [],
    }


def test_each_distinct_text_of_a_chunk_is_parsed_once(colors_only, monkeypatch):
    calls = _record_pipe_calls(monkeypatch, colors_only)
    whole = "A red car parks. A blue bus waits."
    records = [  # a segment caption equal to its own caption, to another record's caption, and to another segment
        {"image_id": "a" * 32, "caption": whole,
         "segments": [{"caption": whole}, {"caption": "A red car parks."}, {"caption": "A blue bus waits."}]},
        {"image_id": "b" * 32, "caption": "A red car parks.", "segments": [{"caption": "A blue bus waits."}]},
        {"image_id": "c" * 32, "caption": whole, "segments": []},
    ]
    out = filter_captions(records, caption_filter=colors_only)
    assert sorted(text for call in calls for text in call) == sorted([whole, "A red car parks.", "A blue bus waits."])
    assert [r["filtered_caption"] for r in out] == ["A car parks. A bus waits.", "A car parks.",
                                                    "A car parks. A bus waits."]
    assert [s["filtered_caption"] for s in out[0]["segments"]] == ["A car parks. A bus waits.", "A car parks.",
                                                                   "A bus waits."]


def _parse(doc) -> list[tuple]:
    """Every token's text, whitespace, tags, dependency, head (relative to the doc) and lemma."""
    return [(t.text, t.whitespace_, t.tag_, t.pos_, t.dep_, t.head.i - doc[0].i, t.lemma_, t.is_sent_start)
            for t in doc]


def _record_parses(monkeypatch, nlp):
    """Return the pipeline's own ``pipe`` and the list every ``nlp.pipe`` call's texts are appended to from now on."""
    parse, calls = nlp.pipe, []

    def recording_pipe(texts, **options):
        calls.append(list(texts))
        return parse(calls[-1], **options)

    monkeypatch.setattr(nlp, "pipe", recording_pipe)
    return parse, calls


def test_each_distinct_sentence_is_parsed_once_and_alone(colors_only, monkeypatch):
    """``CaptionFilter.pipe`` parses each distinct sentence of its texts once, on its own; a text's Doc has the text's
    own characters and tokens, and each of its sentences the parse that sentence gets alone."""
    nlp = colors_only.nlp
    parse, calls = _record_parses(monkeypatch, nlp)
    # One space after a sentence is left out of its piece; a newline or a second space stays with the sentence before.
    pieces = {"A red car parks. A blue bus waits.": ["A red car parks.", "A blue bus waits."],
              "A blue bus waits.": ["A blue bus waits."],
              "A red car parks.\nA green van stops.": ["A red car parks.\n", "A green van stops."],
              "A red car parks.  A blue bus waits. ": ["A red car parks.  ", "A blue bus waits. "]}
    docs = list(colors_only.pipe(pieces))
    assert calls == [list(dict.fromkeys(piece for cut in pieces.values() for piece in cut))]
    for (text, cut), doc in zip(pieces.items(), docs):
        assert doc.text == text and [t.text for t in doc] == [t.text for t in nlp.make_doc(text)]
        offset = 0
        for piece in cut:
            alone = next(iter(parse([piece])))
            assert [row[2:] for row in _parse(doc[offset:offset + len(alone)])] == [row[2:] for row in _parse(alone)]
            offset += len(alone)
        assert offset == len(doc)


def test_a_sentence_is_filtered_the_same_in_every_caption_that_holds_it(colors_only):
    """The whole-caption parse made "silver" a noun compound in the third sentence and kept it; alone, and now in the
    caption too, it is an adjective and goes."""
    sentences = ["A woman in a yellow raincoat holds a black umbrella.",
                 "She stands next to a red brick wall covered in green ivy.",
                 "A silver bicycle leans against the wall on her left."]
    alone = colors_only.filter(sentences)
    assert alone[2] == "A bicycle leans against the wall on her left."
    assert colors_only.filter([" ".join(sentences)]) == [" ".join(alone)]


def test_a_text_its_sentence_pieces_would_tokenise_differently_is_parsed_whole(colors_only, monkeypatch):
    parse, calls = _record_parses(monkeypatch, colors_only.nlp)
    text = 'A red car is No."10 here. A blue bus waits.'  # cut after "No." alone, '"10' is two tokens, not one
    [doc] = colors_only.pipe([text])
    assert calls[-1] == [text]
    assert _parse(doc) == _parse(next(iter(parse([text]))))


def test_filter_captions_reports_a_bad_record(colors_only):
    out = filter_captions(
        [{"image_id": "c" * 32, "caption": "A red cup.", "segments": ["not a dict"]}], caption_filter=colors_only
    )
    assert (
        out[0]["status"] == "failed"
        and "\n" not in out[0]["error"]
        and out[0]["error"].startswith("caption filtering failed")
    )


@pytest.mark.parametrize("caption, reason", [
    ("Red, blue and green.", "no content word left after filtering: only appearance words (red, blue, green)"),
    ("Dark red and light blue!",
     "no content word left after filtering: only appearance words (dark, red, light, blue)"),
    ("... ?! -- !!", "no content word: the caption has only punctuation, numbers or stop words"),
    ("It is 42.", "no content word: the caption has only punctuation, numbers or stop words"),
])
def test_a_caption_without_a_content_word_is_a_failed_record(colors_only, caption, reason):
    (out,) = filter_captions([{"image_id": "d" * 32, "caption": caption, "segments": []}], caption_filter=colors_only)
    assert out == {"image_id": "d" * 32, "status": "failed", "error": reason, "filtered_caption": None,
                   "segments": [], "hard_negatives": []}


@pytest.mark.parametrize("caption", [
    "A red car.",  # one content word besides the colour
    "An orange.",  # a thing (noun with an article), not its colour
    "一只橙色的猫坐在木桌上。",  # one English-tokenizer token with punctuation in it: still words
    "Red, blue and green.",  # with colours not filtered they are the content
])
def test_captions_with_a_content_word_pass(colors_only, caption):
    caption_filter = colors_only if caption != "Red, blue and green." else \
        CaptionFilter(vocab_dir=VOCAB_DIR, remove_colors=False)
    (out,) = filter_captions([{"image_id": "e" * 32, "caption": caption, "segments": []}],
                             caption_filter=caption_filter)
    assert out["status"] == "ok" and out["filtered_caption"], out



def test_word_answers_are_memoised_by_word_only_never_by_its_use():
    """The per-word memo holds vocabulary answers; how a word is used still decides each time: "orange" as a noun
    with an article stays, as a modifier goes, in whichever order one filter meets them."""
    expected = {
        "An orange lies on the table.": "An orange lies on the table.",
        "An orange shirt hangs on a hook.": "A shirt hangs on a hook.",
        "The orange is ripe.": "The orange is ripe.",
        "A man peels an orange beside a wooden bowl.": "A man peels an orange beside a wooden bowl.",
        "A tall man in a grey coat holds an orange.": "A tall man in a coat holds an orange.",
    }
    captions = list(expected)
    for order in (captions, captions[::-1]):
        caption_filter = CaptionFilter(vocab_dir=VOCAB_DIR)  # one memo shared by the captions, in this order
        assert caption_filter.filter(order) == [expected[c] for c in order]
        assert [caption_filter.no_content_reason(d) for d in caption_filter.pipe(order)] == [None] * len(order)
    assert caption_filter._listing_cache and caption_filter._appearance_cache  # the memo was used


# ---- the attribute ruler's matches found by index ---------------------------------------------------------------


def _plain_ruler(nlp, patterns):
    from spacy.pipeline import AttributeRuler

    ruler = AttributeRuler(nlp.vocab)
    ruler.add_patterns(patterns)
    return ruler


def _annotations(doc):
    return [(t.tag_, t.pos_, str(t.morph), t.lemma_, t.dep_) for t in doc]


def test_the_indexed_attribute_ruler_sets_what_the_matcher_sets_on_hand_made_patterns():
    import spacy
    from spacy.tokens import Doc

    from pipelines.steps.filtering import _IndexedPatterns, _indexed_ruler_class

    nlp = spacy.blank("en")
    patterns = [
        {"patterns": [[{"TAG": "NN"}]], "attrs": {"POS": "NOUN"}},
        {"patterns": [[{"TAG": "NN", "LOWER": "red"}]], "attrs": {"POS": "ADJ", "LEMMA": "red"}},  # later wins
        {"patterns": [[{"LOWER": "gon"}, {"LOWER": "na"}]], "attrs": {"LEMMA": "to"}, "index": 1},
        {"patterns": [[{"LOWER": "got"}, {"LOWER": "ta"}]], "attrs": {"LEMMA": "get"}, "index": -2},
        {"patterns": [[{"DEP": "expl"}, {"LOWER": {"IN": ["is", "are"]}}]], "attrs": {"POS": "VERB"}, "index": 1},
        {"patterns": [[{"LOWER": {"REGEX": "^n[ou]thin'$"}}]], "attrs": {"LEMMA": "nothing"}},
        {"patterns": [[{"LOWER": "let"}, {"LOWER": "'s"}]], "attrs": {"LEMMA": "us"}, "index": -1},
        {"patterns": [[{"TAG": {"NOT_IN": ["NN", "VBZ"]}, "DEP": {"IN": ["amod", "acomp"]}}]],
         "attrs": {"MORPH": "Degree=Pos"}},
        {"patterns": [[{"IS_SPACE": True}]], "attrs": {"TAG": "_SP", "POS": "SPACE"}},
    ]
    words = ["there", "is", "a", "red", "car", "gon", "na", "got", "ta", "nothin'", "  ", "big", "is", "let", "'s"]
    tags = ["EX", "VBZ", "DT", "NN", "NN", "VBG", "TO", "VBD", "TO", "NN", "XX", "JJ", "VBZ", "VB", "PRP"]
    deps = ["expl", "ROOT", "det", "amod", "attr", "dep", "aux", "dep", "aux", "dobj", "dep", "amod", "dep", "dep",
            "dobj"]

    def doc():
        return Doc(nlp.vocab, words=words, tags=tags, deps=deps, heads=[1] * len(words))

    plain = _plain_ruler(nlp, patterns)
    indexed = _plain_ruler(nlp, patterns)
    index = _IndexedPatterns.from_ruler(indexed)
    assert index is not None
    indexed.__class__ = _indexed_ruler_class()
    indexed._indexed_patterns = index
    expected = _annotations(plain(doc()))
    got = indexed(doc())
    assert _annotations(got) == expected
    # By hand: the later pattern wins on "red"; index 1 reaches the second word, -2 the first; IN after an expletive.
    assert [(t.pos_, t.lemma_) for t in got[3:5]] == [("ADJ", "red"), ("NOUN", "")]
    assert got[6].lemma_ == "to" and (got[7].lemma_, got[8].lemma_) == ("get", "") and got[9].lemma_ == "nothing"
    assert got[1].pos_ == "VERB" and got[12].pos_ == "" and got[11].morph.get("Degree") == ["Pos"]
    assert got[10].tag_ == "_SP" and got[10].pos_ == "SPACE" and (got[13].lemma_, got[14].lemma_) == ("", "us")


def test_a_pattern_the_index_does_not_handle_keeps_the_matcher():
    import spacy

    from pipelines.steps.filtering import _IndexedPatterns

    nlp = spacy.blank("en")
    assert _IndexedPatterns.from_ruler(_plain_ruler(nlp, [{"patterns": [[{"LOWER": "a", "OP": "+"}]],
                                                           "attrs": {"LEMMA": "a"}}])) is None
    assert _IndexedPatterns.from_ruler(_plain_ruler(nlp, [{"patterns": [[{"ORTH": "A"}]],
                                                           "attrs": {"LEMMA": "a"}}])) is None


def test_the_loaded_pipeline_annotates_like_the_matcher_on_random_tag_and_word_sequences():
    """The trained pipeline's own ~180 patterns: random documents over every word, tag and label they mention."""
    import random

    import spacy
    from spacy.tokens import Doc

    nlp = load_spacy()
    indexed = nlp.get_pipe("attribute_ruler")
    assert type(indexed).__name__ == "IndexedAttributeRuler"
    plain = _plain_ruler(nlp, indexed.patterns)
    words = {"n't", "nt", "y", "y'", "all", "the", "cat", "  "}
    for entry in indexed.patterns:
        for token in (t for pattern in entry["patterns"] for t in pattern):
            value = token.get("LOWER")
            words.update([value] if isinstance(value, str) else (value or {}).get("IN", []))
    words, tags, deps = sorted(words), list(nlp.get_pipe("tagger").labels) + ["_SP"], list(nlp.get_pipe("parser").labels)
    rng = random.Random(0)
    for _ in range(400):
        n = rng.randint(1, 10)
        sample = [rng.choice(words) for _ in range(n)]
        sample = [w.upper() if rng.random() < 0.1 else w for w in sample]
        tag_seq, dep_seq = [rng.choice(tags) for _ in range(n)], [rng.choice(deps) for _ in range(n)]

        def doc():
            return Doc(nlp.vocab, words=sample, tags=tag_seq, deps=dep_seq, heads=[0] * n)

        assert _annotations(indexed(doc())) == _annotations(plain(doc())), (sample, tag_seq, dep_seq)
    text = "There is a red car; it ain't gonna move, y'all. Let's go!"
    reference = spacy.load(nlp.meta["lang"] + "_" + nlp.meta["name"], exclude=["ner"])
    assert _annotations(nlp(text)) == _annotations(reference(text))


def test_only_a_pipeline_with_a_transformer_or_an_unknown_one_may_need_torch(tmp_path):
    from pipelines.steps.filtering import spacy_needs_torch

    def saved(name: str, factories: list[str]) -> str:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.cfg").write_text("".join(f'[components.c{i}]\nfactory = "{f}"\n\n'
                                                   for i, f in enumerate(factories)))
        return str(folder)

    assert not spacy_needs_torch("en_core_web_sm")  # the installed small pipeline (or its PyPI copy)
    assert not spacy_needs_torch(saved("small", ["tok2vec", "tagger", "parser", "lemmatizer"]))
    assert spacy_needs_torch(saved("trf", ["transformer", "tagger", "parser"]))
    assert spacy_needs_torch(saved("curated", ["curated_transformer", "tagger"]))
    assert spacy_needs_torch(str(tmp_path / "missing"))  # nothing to read: assume it may


def test_the_batch_size_does_not_change_what_is_filtered(colors_only):
    """``filter.batch_size`` is a runtime setting (not in the stage key): spaCy's batches must give the same parses.
    Captions of very different lengths, so a batch pads short ones to long ones."""
    captions = [row[0] for row in CASES] + [
        "A synthetic photo with 5 flat shapes on a smooth background that fades from orange at the top to pink at the "
        "bottom, covered with fine grain. A purple triangle lies near the top right corner of the picture.",
        "red", "A man in a bright red jacket; a dog beside him is brown and white.",
    ] * 3
    by_batch = {size: CaptionFilter(vocab_dir=VOCAB_DIR, batch_size=size).filter(captions) for size in (1, 7, 64, 256)}
    assert by_batch[1] == colors_only.filter(captions)
    assert all(result == by_batch[1] for result in by_batch.values())
