"""FG-CLIP style hard negatives: copies of a caption that change exactly one attribute.

Each negative replaces one token span: a colour by another colour, a material by another material, a number by a
neighbouring number ("two" -> "three", "3" -> "4"), or a spatial word by its opposite (left/right, above/below,
top/bottom, upper/lower). Choices are seeded by the caption text (no global RNG), so a caption always gets the same
negatives. Replacements that would need a different article ("a red apple" -> "a orange apple") are skipped, so the
rest of the caption stays grammatical and untouched.

``filter_captions`` is the filter stage's work on a chunk: every caption parsed once, filtered, and its hard
negatives built from the same parse.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from pipelines.steps.filtering import CaptionFilter, Vocabulary, describes_noun, is_name, load_spacy

VERSION = "2"  # 2: each sentence parsed alone (filtering.CaptionFilter.pipe; filtering's own VERSION stays, as the
# captions stage keys that module for its spaCy loaders, whose results did not change)

NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
)  # fmt: skip
SPATIAL_OPPOSITES = {
    "left": "right",
    "right": "left",
    "leftmost": "rightmost",
    "rightmost": "leftmost",
    "above": "below",
    "below": "above",
    "top": "bottom",
    "bottom": "top",
    "upper": "lower",
    "lower": "upper",
}
_GREYS = frozenset({"grey", "gray"})
_SIDES = frozenset({"left", "right", "leftmost", "rightmost"})


@dataclass(frozen=True)
class Replaceable:
    """One token span that can be changed, with its alternatives in a fixed order."""

    start_char: int
    end_char: int
    kind: str  # color | material | number | spatial
    options: tuple[str, ...]


def _match_case(replacement: str, original: str) -> str:
    if len(original) > 1 and original.isupper():
        return replacement.upper()
    if original[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def _starts_with_vowel(word: str) -> bool:
    return word[:1].lower() in "aeiou"


def _article_compatible(doc, start: int, options: list[str]) -> list[str]:
    """Keep options that take the same article as the span's original first word."""
    if start == 0 or doc[start - 1].lower_ not in ("a", "an"):
        return options
    needs_vowel = doc[start - 1].lower_ == "an"
    return [o for o in options if _starts_with_vowel(o) == needs_vowel]


def find_replaceables(doc, *, vocab: Vocabulary) -> list[Replaceable]:
    """Return the changeable spans of a parsed caption in text order."""
    spans: list[Replaceable] = []
    taken: set[int] = set()

    def add(start: int, end: int, kind: str, options: list[str]) -> None:
        original = doc[start:end].text
        options = [_match_case(o, original) for o in _article_compatible(doc, start, options)]
        options = [o for o in dict.fromkeys(options) if o.lower() != original.lower()]
        if options and not taken.intersection(range(start, end)):
            taken.update(range(start, end))
            spans.append(Replaceable(doc[start].idx, doc[end - 1].idx + len(doc[end - 1].text), kind, tuple(options)))

    # Multi-word colours ("navy blue") are one span, replaced by a single basic colour. The words are compared as
    # strings first: a Doc slice per phrase and position made this loop most of the filter stage.
    lowers = [t.lower_ for t in doc]
    starts: dict[str, list[int]] = {}
    for i, word in enumerate(lowers):
        starts.setdefault(word, []).append(i)
    for phrase in vocab.phrases["colors"]:
        words = phrase.replace("-", " ").split()
        for i in starts.get(words[0], ()) if words else range(len(doc) + 1):
            if i + len(words) > len(doc) or lowers[i : i + len(words)] != words:
                continue
            window = doc[i : i + len(words)]
            if (
                describes_noun(window[-1])
                and not any(is_name(t) for t in window)
            ):
                # "navy blue" -> "blue" is no contradiction: skip the phrase's own words.
                add(i, i + len(words), "color", [c for c in vocab.color_swap if c not in words])
    adjective_to_material = {adj: noun for noun, adj in vocab.material_swap.items()}
    for token in doc:
        word = token.lower_
        if token.i in taken:
            continue
        if word in vocab.color_swap and describes_noun(token):
            excluded = _GREYS if word in _GREYS else {word}
            add(token.i, token.i + 1, "color", [c for c in vocab.color_swap if c not in excluded])
        elif word in vocab.material_swap and describes_noun(token):
            add(token.i, token.i + 1, "material", [n for n in vocab.material_swap if n != word])
        elif word in adjective_to_material and describes_noun(token):
            add(token.i, token.i + 1, "material", [a for n, a in vocab.material_swap.items() if a != word])
        elif token.pos_ == "NUM" and (word in NUMBER_WORDS or token.text.isdigit()):
            value = NUMBER_WORDS.index(word) if word in NUMBER_WORDS else int(token.text)
            neighbours = [v for v in (value + 1, value - 1, value + 2) if v >= 1]
            if word in NUMBER_WORDS:
                add(token.i, token.i + 1, "number", [NUMBER_WORDS[v] for v in neighbours if v < len(NUMBER_WORDS)])
            else:
                add(token.i, token.i + 1, "number", [str(v) for v in neighbours])
        elif word in SPATIAL_OPPOSITES and not is_name(token) and (token.pos_ in ("ADJ", "NOUN") or word not in _SIDES):
            # "left"/"right" only as sides: not "he left", not "right next to".
            add(token.i, token.i + 1, "spatial", [SPATIAL_OPPOSITES[word]])
    return sorted(spans, key=lambda s: s.start_char)


def make_hard_negatives(
    doc_or_text, *, vocab: Vocabulary, max_negatives: int = 3, seed_key: str | None = None, nlp=None
) -> list[str]:
    """Return up to ``max_negatives`` distinct captions, each differing from the input in exactly one token span."""
    if max_negatives <= 0:
        return []
    if isinstance(doc_or_text, str):
        doc_or_text = (nlp or load_spacy())(doc_or_text)
    doc = doc_or_text
    text = doc.text
    spans = find_replaceables(doc, vocab=vocab)
    if not spans:
        return []
    seed = int.from_bytes(
        hashlib.sha256((seed_key if seed_key is not None else text).encode("utf-8")).digest()[:8], "big"
    )
    rng = random.Random(seed)
    order = list(spans)
    rng.shuffle(order)  # spread negatives over different attributes before reusing one
    remaining = {id(s): rng.sample(s.options, len(s.options)) for s in order}
    negatives: list[str] = []
    while len(negatives) < max_negatives and any(remaining.values()):
        for span in order:
            if len(negatives) >= max_negatives:
                break
            if not remaining[id(span)]:
                continue
            replacement = remaining[id(span)].pop()
            negative = text[: span.start_char] + replacement + text[span.end_char :]
            if negative != text and negative not in negatives:
                negatives.append(negative)
    return negatives


def filter_captions(records: list[dict], *, caption_filter: CaptionFilter, max_hard_negatives: int = 3) -> list[dict]:
    """Return one ``{image_id, status, error, filtered_caption, segments, hard_negatives, extra_captions}`` per input
    record (``extra_captions``: the record's further captions, each filtered with its own hard negatives).

    All captions of the chunk (global and segment captions) go through a single ``nlp.pipe`` call, each distinct
    text once; hard negatives are built from the same parsed Docs of the global captions.

    A segment caption (a sentence or ``;`` clause of the caption) is parsed on its own, not cut from the caption's
    Doc: the tagger and parser see across sentence boundaries, so the cut-out span parses differently for ~9% of
    clauses and filters differently for ~0.3% (measured on 3,772 clauses of 877 captions).
    """
    texts: list[str] = []
    for record in records:
        segment_captions = [s.get("caption") for s in record.get("segments") or [] if isinstance(s, dict)]
        for text in [record.get("caption")] + segment_captions + list(record.get("extra_captions") or []):
            if isinstance(text, str) and text.strip():
                texts.append(text)
    unique = list(dict.fromkeys(texts))
    docs = dict(zip(unique, caption_filter.pipe(unique)))

    outputs = []
    for record in records:
        image_id = record.get("image_id")
        try:
            caption = record.get("caption")
            doc = docs.get(caption) if isinstance(caption, str) else None
            reason = caption_filter.no_content_reason(doc) if doc is not None else None
            if reason is not None:
                outputs.append({"image_id": image_id, "status": "failed", "error": reason, "filtered_caption": None,
                                "segments": [], "hard_negatives": []})
                continue
            segments = []
            for segment in record.get("segments") or []:
                seg_caption = segment.get("caption")
                seg_doc = docs.get(seg_caption) if isinstance(seg_caption, str) else None
                segments.append(
                    {**segment, "filtered_caption": caption_filter.filter_doc(seg_doc) if seg_doc is not None else None}
                )
            outputs.append(
                {
                    "image_id": image_id,
                    "status": "ok",
                    "error": None,
                    "filtered_caption": caption_filter.filter_doc(doc) if doc is not None else None,
                    "segments": segments,
                    "hard_negatives": (
                        make_hard_negatives(
                            doc, vocab=caption_filter.vocabulary, max_negatives=max_hard_negatives, seed_key=caption
                        )
                        if doc is not None
                        else []
                    ),
                    **({"extra_captions": _filter_extra_captions(record, docs, caption_filter, max_hard_negatives)}
                       if record.get("extra_captions") else {}),
                }
            )
        except Exception as exc:  # noqa: BLE001 - one bad record must not sink the chunk
            message = f"caption filtering failed: {exc.__class__.__name__}: {exc}".splitlines()[0]
            outputs.append(
                {
                    "image_id": image_id,
                    "status": "failed",
                    "error": message,
                    "filtered_caption": None,
                    "segments": [],
                    "hard_negatives": [],
                }
            )
    return outputs


def _filter_extra_captions(record: dict, docs: dict, caption_filter: CaptionFilter, max_hard_negatives: int) -> list:
    """Return ``{caption, filtered_caption, hard_negatives}`` for each further caption of a multi-caption image."""
    extras = []
    for text in record.get("extra_captions") or []:
        doc = docs.get(text) if isinstance(text, str) else None
        extras.append({"caption": text, "filtered_caption": caption_filter.filter_doc(doc) if doc is not None else None,
                       "hard_negatives": [] if doc is None else make_hard_negatives(
                           doc, vocab=caption_filter.vocabulary, max_negatives=max_hard_negatives, seed_key=text)})
    return extras
