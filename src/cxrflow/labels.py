"""Label free-text chest X-ray notes with the canonical keys: 1 (present), 0 (absent), missing.

The method is rule-based, in the way of NegEx, ConText and the CheXpert labeler. Every pattern lives in a
vocabulary YAML file per language (``config/labels/ru.yaml``, ``en.yaml``); this module holds no label
mapping.

1. A note is lower-cased and folded (Russian "ё" -> "е"; patterns are folded the same way). Latin
   look-alike letters inside Cyrillic words ("Kардиомегалия" typed with a Latin K) are folded to
   Cyrillic (``lookalikes``), and so is a word of look-alikes only whose twin is a Russian word or an
   abbreviation ("he" for "не", "Ao" for "Ао"). The note is cut into sentences (``boundaries.sentence``), but not after
   an abbreviation ("пр.", "т.е."): scopes never leave a sentence, so each distinct sentence is labelled
   once per archive and a note's labels combine its sentences'.
2. In a sentence, abbreviations are expanded ("Ао" -> "аорта", ``abbreviations``), and a long word that
   is one edit (a wrong, missing, extra or transposed letter) away from a vocabulary stem is read as
   that stem (``typos``; never a short word, a cue, or a word the Russian dictionary knows). Phrases
   under ``ignore`` ("subcutaneous emphysema", "без динамики") and ``normal`` ("No acute
   cardiopulmonary process", "Без патологических изменений") are blanked, so they fire neither a
   finding nor a cue. Every match of a key's ``findings`` patterns is a *mention*.
3. Negation and uncertainty *cues* have a scope: ``window`` words after the cue (``direction: before``,
   "Без признаков кардиомегалии") or before it (``direction: after``, "Пневмонии нет"). A scope stops
   at a clause boundary (``boundaries.clause``: ";", "но", "but") and at a comma (``boundaries.soft``)
   unless the cue rule says ``across_commas``: ``true`` crosses every comma, ``list`` crosses a comma
   or "и"/"and" (``boundaries.list``) only into a list item, a segment without a predicate of its own
   ("Очаговых теней, инфильтрации не выявлено" but not "Эмфиземы нет, аорта развёрнута"). With
   ``morphology: ru`` the predicates are read by pymorphy3 (short participles and adjectives, verbs),
   and a Russian list item must start with a word that can be genitive, as a negated noun is.
4. A mention is uncertain if an uncertainty scope reaches its last word, else negated if a negation
   scope does (a cue inside the mention counts: "сердце не расширено"), else affirmed. A match of a
   key's ``absent`` patterns ("Heart size is normal") is a negated mention. Words set off by
   ``parenthetical`` punctuation (a hedge between commas, a heading before a colon: "Аорта: развёрнута")
   neither split a mention nor end a scope; such a hedge looks back only when no mention follows it in
   its comma segment ("Корни сосудистые, вероятно, малоструктурны" hedges only the second).
5. Per note and key the strongest mention wins: affirmed > uncertain > negated > not mentioned. A key
   the note does not mention is 0, since a radiologist's note lists what it finds. The ``normal`` key
   is 1 when the note holds a normal-study phrase and no key is affirmed or uncertain, else 0. An
   empty note is missing for every key: nothing was assessed.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import re
import time
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from cxrflow.errors import CxrflowError
from cxrflow.io import YAML_LOADER
from cxrflow.table_checks import read_text_file

log = logging.getLogger(__name__)

UNCERTAIN_POLICIES = ("missing", "positive", "negative")
NORMAL_KEY = "normal"
# A descriptor of ANY_FINDING is a sign ("opacity", "blunting of the costophrenic angle") that counts only when
# no other finding in its sentence explains it ("Opacity at the right base, likely atelectasis").
ANY_FINDING = "any"

# Mention states, ordered so that the maximum over a note's mentions is the label rule.
UNMENTIONED, NEGATED, UNCERTAIN, AFFIRMED, NOT_ASSESSED = 0, 1, 2, 3, 4
STATE_NAMES = {UNMENTIONED: "unmentioned", NEGATED: "negated", UNCERTAIN: "uncertain", AFFIRMED: "affirmed"}

_VOCABULARY_SECTIONS = {
    "fold", "lookalikes", "abbreviations", "macros", "typos", "morphology", "boundaries", "parenthetical",
    "ignore", "normal", "findings", "descriptors", "absent", "negation", "uncertainty",
}  # fmt: skip
_BOUNDARY_LEVELS = {"sentence", "clause", "soft", "list", "predicate", "list_any_case"}
_CUE_RULE_FIELDS = {"direction", "window", "across_commas", "cues"}
_TYPO_FIELDS = {"min_length", "max_distance"}
_WORD = re.compile(r"\w+")
_ESCAPE_OR_TEXT = re.compile(r"\\.|[^\\]+", re.DOTALL)
_MACRO = re.compile(r"\{([a-z_]+)\}")
_CYRILLIC = re.compile(r"[а-яё]")
_LATIN = re.compile(r"[a-z]")
# Russian one-letter words a Latin look-alike can stand for: "c" for "с", "B" (lower "b") for "в".
_ONE_LETTER_WORDS = set("авкосуи")
# pymorphy3 parts of speech that make a segment a clause of its own (short participle and adjective, verb,
# predicative "нет"), and the grammemes of proper-name parses, which say nothing about a medical word's case.
_PREDICATE_POS = {"PRTS", "ADJS", "VERB", "INFN", "PRED"}
_NAME_GRAMMEMES = {"Name", "Surn", "Patr", "Geox", "Orgn", "Trad", "Abbr", "Init"}


@dataclass(frozen=True)
class CueRule:
    """Cues sharing one scope: ``window`` words after (``before``) or before (``after``) the cue."""

    direction: str
    window: int | None
    across_commas: bool | str
    pattern: re.Pattern


@dataclass
class Typos:
    """Bounded typo tolerance: a word of ``min_length``+ letters that no stem starts, within
    ``max_distance`` edits (optimal string alignment: a transposition is one edit) of a stem's length
    of its start, is read as that stem. Cues and dictionary words are never changed."""

    stems: tuple[str, ...]
    min_length: int
    max_distance: int
    protected: re.Pattern | None
    morphology: object | None
    by_length: dict = field(init=False)
    inside: re.Pattern = field(init=False)
    cache: dict = field(init=False, default_factory=dict)

    def __post_init__(self):
        # A word that holds a stem ("пневмофиброз" holds "фиброз") is matched as written.
        self.inside = re.compile("|".join(map(re.escape, sorted(self.stems, key=len, reverse=True))) or "(?!)")
        self.by_length = {}
        for stem in self.stems:
            self.by_length.setdefault(len(stem), []).append(stem)

    def correct(self, word: str) -> str | None:
        """The corrected word, or None when the word stands as written."""
        if word in self.cache:
            return self.cache[word]
        self.cache[word] = fixed = self._correct(word)
        return fixed

    def _correct(self, word: str) -> str | None:
        if len(word) < self.min_length or not word.isalpha() or self.inside.search(word):
            return None
        if self.protected is not None and self.protected.search(word):
            return None
        if self.morphology is not None and self.morphology.word_is_known(word):
            return None  # a real word ("развита" near "развернута") is what the doctor wrote
        from rapidfuzz import process
        from rapidfuzz.distance import OSA

        # The longest stem within reach is the reading; a word that already starts with it stays as it is.
        for length in sorted(self.by_length, reverse=True):
            best = None
            for cut in (length, length - 1, length + 1):
                if cut > len(word) or cut < self.min_length - 1:
                    continue
                hit = process.extractOne(
                    word[:cut], self.by_length[length], scorer=OSA.distance, score_cutoff=self.max_distance
                )
                if hit is not None and (best is None or hit[1] < best[1]):
                    best = (hit[0] + word[cut:], hit[1])
            if best is not None:
                return None if best[1] == 0 else best[0]
        return None


@dataclass(frozen=True)
class Vocabulary:
    """One language's compiled patterns, as read from a vocabulary YAML file."""

    source: str
    fold: tuple[tuple[str, str], ...]
    findings: dict[str, re.Pattern]
    absent: dict[str, re.Pattern]
    negation: tuple[CueRule, ...]
    uncertainty: tuple[CueRule, ...]
    normal: re.Pattern | None
    ignore: re.Pattern | None
    sentence_boundaries: re.Pattern | None
    clause_boundaries: re.Pattern | None
    soft_boundaries: re.Pattern | None
    list_boundaries: re.Pattern | None = None
    predicate: re.Pattern | None = None
    list_any_case: re.Pattern | None = None
    parenthetical: re.Pattern | None = None
    lookalikes: dict | None = None
    abbreviations: re.Pattern | None = None
    abbreviation_texts: tuple[str, ...] = ()
    abbreviation_words: frozenset = frozenset()  # every word an abbreviation holds, to find one cheaply
    typos: Typos | None = None
    morphology: object | None = None
    # "other_finding|emphysema" -> pattern: an other_finding mention that only describes emphysema, dropped
    # when the note affirms or hedges emphysema ("Повышенная прозрачность лёгочных полей, эмфизема").
    descriptors: dict[str, re.Pattern] = field(default_factory=dict)


@dataclass(frozen=True)
class Mention:
    """One match of a key's pattern in a unit (sentence or clause) of a normalised note, with its state."""

    key: str
    unit: str
    start: int
    end: int
    text: str
    state: int


# --- reading a vocabulary ---------------------------------------------------------------------------------------


class _Source:
    """A vocabulary file's text and the line of each node, so that an error names file, line and term."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CxrflowError(f"{self.path}: file not found")
        text = read_text_file(self.path, "label file")  # binary or unreadable: one line, not a traceback
        try:
            node = yaml.compose(text, Loader=YAML_LOADER)
            self.data = yaml.load(text, Loader=YAML_LOADER)
        except yaml.YAMLError as error:
            raise CxrflowError(f"{self.path}: not valid YAML: {' '.join(str(error).split())}") from error
        self.lines: dict[tuple, int] = {}
        if node is not None:
            self._walk(node, ())

    def _walk(self, node, at: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value
                if at + (key,) in self.lines:
                    raise CxrflowError(
                        f"{self.path}:{key_node.start_mark.line + 1}: {'.'.join(map(str, at + (key,)))}: "
                        f"duplicate key (first on line {self.lines[at + (key,)]})"
                    )
                self.lines[at + (key,)] = value_node.start_mark.line + 1
                self._walk(value_node, at + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.lines[at + (index,)] = item.start_mark.line + 1
                self._walk(item, at + (index,))

    def where(self, *at) -> str:
        """'file:line: section.key' for the node at ``at`` (the nearest known line above it)."""
        for end in range(len(at), 0, -1):
            if at[:end] in self.lines:
                return (
                    f"{self.path}:{self.lines[at[:end]]}: {'.'.join(str(part) for part in at if isinstance(part, str))}"
                )
        return f"{self.path}: {'.'.join(str(part) for part in at if isinstance(part, str))}"


def _read_yaml(path) -> object:
    return _Source(path).data


def load_keys(path) -> list[str]:
    """Return the canonical label keys of ``keys.yaml``, in file order."""
    data = _read_yaml(path)
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, dict) or not keys:
        raise CxrflowError(f"{path}: expected a non-empty mapping under 'keys:'")
    return [str(key) for key in keys]


def _pattern_list(value, where: str) -> list[str]:
    """Accept one pattern or a list of patterns; anything else is a user error."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise CxrflowError(f"{where}: expected a list of regex strings, got {value!r}")
    return value


def _fold(text: str, fold: tuple[tuple[str, str], ...]) -> str:
    # str.replace per pair: str.translate is several times slower on non-ASCII text.
    for old, new in fold:
        text = text.replace(old, new)
    return text


def _lower_pattern(pattern: str, fold: tuple[tuple[str, str], ...]) -> str:
    """Lower-case and fold a pattern as notes are, leaving escapes (\\W, \\S, \\B) alone.

    Matching lower-case text without re.IGNORECASE lets the regex engine skip ahead to a literal
    prefix, several times faster on long archives.
    """
    lowered = _ESCAPE_OR_TEXT.sub(lambda m: m.group() if m.group().startswith("\\") else m.group().lower(), pattern)
    return _fold(lowered, fold)


class _Compiler:
    """Compiles a vocabulary's patterns, naming the file, line and term of a bad one."""

    def __init__(self, source: _Source, fold, macros: dict[str, str]):
        self.source, self.fold, self.macros = source, fold, macros
        self.terms: dict[str, str] = {}  # lowered term -> where it was first seen, to refuse duplicates

    def patterns(self, at: tuple, unique: bool = False) -> list[str]:
        """The lowered, macro-expanded patterns of the node at ``at`` (one string or a list)."""
        value = self._get(at)
        if value is None:
            return []
        where = self.source.where(*at)
        raw = _pattern_list(value, where)
        lowered = []
        for index, pattern in enumerate(raw):
            place = self.source.where(*at, index) if isinstance(value, list) else where
            expanded = self._expand(pattern, place)
            text = _lower_pattern(expanded, self.fold)
            try:
                re.compile(text)
            except re.error as error:
                raise CxrflowError(f"{place}: bad regex {pattern!r}: {error}") from error
            if unique:
                if text in self.terms:
                    raise CxrflowError(f"{place}: duplicate term {pattern!r} (also at {self.terms[text]})")
                self.terms[text] = place
            lowered.append(text)
        return lowered

    def _expand(self, pattern: str, place: str) -> str:
        def replace(match):
            name = match.group(1)
            if name not in self.macros:
                raise CxrflowError(f"{place}: unknown macro {{{name}}} in {pattern!r}; macros: {sorted(self.macros)}")
            return self.macros[name]

        return _MACRO.sub(replace, pattern)

    def _get(self, at: tuple):
        value = self.source.data
        for part in at:
            if not isinstance(value, (dict, list)):
                return None
            value = value.get(part) if isinstance(value, dict) else value[part]
        return value

    def combine(self, patterns: list[str], at: tuple) -> re.Pattern | None:
        """One alternation, so that a text is scanned once for all of them."""
        if not patterns:
            return None
        try:
            return re.compile("|".join(f"(?:{pattern})" for pattern in patterns))
        except re.error as error:
            # Happens when patterns clash once combined, e.g. two define the same named group.
            raise CxrflowError(f"{self.source.where(*at)}: patterns do not combine into one regex: {error}") from error

    def compile(self, at: tuple, unique: bool = False) -> re.Pattern | None:
        return self.combine(self.patterns(at, unique), at)


def _compile_per_key(compiler: _Compiler, section: str, keys: list[str]) -> dict[str, re.Pattern]:
    data = compiler.source.data.get(section)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CxrflowError(f"{compiler.source.where(section)}: expected a mapping of canonical key -> list of patterns")
    canonical = set(keys)
    compiled = {}
    for key in data:
        if key not in canonical:
            raise CxrflowError(
                f"{compiler.source.where(section, key)}: key {key!r} is not a canonical key "
                "(see config/labels/keys.yaml)"
            )
        pattern = compiler.compile((section, key), unique=True)
        if pattern is not None:
            compiled[key] = pattern
    return compiled


def _compile_descriptors(compiler: _Compiler, keys: list[str]) -> dict[str, re.Pattern]:
    data = compiler.source.data.get("descriptors")
    if data is None:
        return {}
    where = compiler.source.where("descriptors")
    if not isinstance(data, dict) or not all(isinstance(value, dict) for value in data.values()):
        raise CxrflowError(f"{where}: expected described key -> {{key -> list of patterns}}")
    canonical = set(keys) | {ANY_FINDING}
    compiled = {}
    for described, by_key in data.items():
        for key in [described, *by_key]:
            if key not in canonical:
                raise CxrflowError(
                    f"{compiler.source.where('descriptors', described)}: key {key!r} is not a canonical key "
                    "(see config/labels/keys.yaml)"
                )
        for key in by_key:
            pattern = compiler.compile(("descriptors", described, key), unique=True)
            if pattern is not None:
                compiled[f"{key}|{described}"] = pattern
    return compiled


def _cue_rules(compiler: _Compiler, section: str) -> tuple[CueRule, ...]:
    data = compiler.source.data.get(section)
    if data is None:
        return ()
    if not isinstance(data, list):
        raise CxrflowError(f"{compiler.source.where(section)}: expected a list of cue rules (direction, window, cues)")
    rules = []
    for number, rule in enumerate(data):
        place = f"{compiler.source.where(section, number)}[{number}]"
        if not isinstance(rule, dict) or "cues" not in rule:
            raise CxrflowError(f"{place}: expected a mapping with 'direction', 'window' and 'cues'")
        unknown = set(rule) - _CUE_RULE_FIELDS
        if unknown:
            raise CxrflowError(f"{place}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_CUE_RULE_FIELDS)}")
        direction = rule.get("direction")
        if direction not in ("before", "after"):
            raise CxrflowError(f"{place}: direction must be 'before' or 'after', got {direction!r}")
        window = rule.get("window")
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
            raise CxrflowError(f"{place}: window must be a positive number of words or null, got {window!r}")
        across_commas = rule.get("across_commas", False)
        if across_commas not in (True, False, "list"):
            raise CxrflowError(f"{place}: across_commas must be true, false or 'list', got {across_commas!r}")
        pattern = compiler.compile((section, number, "cues"))
        if pattern is not None:
            rules.append(CueRule(direction, window, across_commas, pattern))
    return tuple(rules)


def _mapping(source: _Source, section: str) -> dict:
    value = source.data.get(section) or {}
    if not isinstance(value, dict) or not all(
        isinstance(a, str) and a and isinstance(b, str) for a, b in value.items()
    ):
        raise CxrflowError(f"{source.where(section)}: expected a mapping of strings to strings, got {value!r}")
    return value


def _morphology(source: _Source):
    language = source.data.get("morphology")
    if language is None:
        return None
    if language != "ru":
        raise CxrflowError(f"{source.where('morphology')}: only 'ru' (pymorphy3) is supported, got {language!r}")
    import pymorphy3  # the dictionary ships in the pymorphy3-dicts-ru package: nothing is downloaded

    return pymorphy3.MorphAnalyzer(lang="ru")


_STEM = re.compile(r"[^\W\d_]+")


def _stems(patterns: list[str], min_length: int, cues: list[str] = ()) -> tuple[str, ...]:
    """The literal letter runs of the finding patterns, which typos are corrected towards; never a cue's
    ("выявлен" of "не выявлено"): a misspelt negation or hedge stays unread rather than guessed."""
    stems = set()
    for pattern in patterns:
        # An optional group is left out ("гидро(?:пневмо)?торакс" -> "гидроторакс"): its letters are no stem.
        literal = re.sub(r"\((?:\?:)?[^()|]*\)\?", "", pattern)
        literal = re.sub(r"\\.|\[[^\]]*\]|\(\?[:!=<]+|\{[^}]*\}", " ", literal)  # escapes, classes, groups
        stems.update(stem for stem in _STEM.findall(literal) if len(stem) >= min_length)
    cue_text = " ".join(cues)
    return tuple(sorted(stem for stem in stems if stem not in cue_text))


def load_vocabulary(path, keys: list[str]) -> Vocabulary:
    """Read and compile one language's vocabulary YAML; every key must be one of ``keys``."""
    source = _Source(path)
    data = source.data
    if not isinstance(data, dict):
        raise CxrflowError(f"{path}: expected a mapping with sections {sorted(_VOCABULARY_SECTIONS)}")
    unknown = set(data) - _VOCABULARY_SECTIONS
    if unknown:
        raise CxrflowError(
            f"{source.where(sorted(unknown)[0])}: unknown section(s) {sorted(unknown)}; "
            f"allowed: {sorted(_VOCABULARY_SECTIONS)}"
        )
    fold = tuple((a.lower(), b.lower()) for a, b in _mapping(source, "fold").items())
    lookalikes = {a.lower(): b.lower() for a, b in _mapping(source, "lookalikes").items()}
    macros = {name: str(value) for name, value in _mapping(source, "macros").items()}
    compiler = _Compiler(source, fold, macros)
    boundaries = data.get("boundaries") or {}
    if not isinstance(boundaries, dict) or set(boundaries) - _BOUNDARY_LEVELS:
        raise CxrflowError(
            f"{source.where('boundaries')}: expected a mapping with pattern lists under {sorted(_BOUNDARY_LEVELS)}"
        )
    boundary = {level: compiler.compile(("boundaries", level)) for level in _BOUNDARY_LEVELS}

    abbreviations = _mapping(source, "abbreviations")
    expansions = []
    for term in abbreviations:
        place = source.where("abbreviations", term)
        pattern = _lower_pattern(term, fold)
        try:
            compiled = re.compile(pattern)
        except re.error as error:
            raise CxrflowError(f"{place}: bad regex {term!r}: {error}") from error
        if compiled.groups:
            raise CxrflowError(f"{place}: abbreviation {term!r} must not hold a capturing group; use (?:...)")
        expansions.append(pattern)
    abbreviation_pattern = compiler.combine([f"({pattern})" for pattern in expansions], ("abbreviations",))

    morphology = _morphology(source)
    findings = _compile_per_key(compiler, "findings", keys)
    absent = _compile_per_key(compiler, "absent", keys)
    descriptors = _compile_descriptors(compiler, keys)
    normal = compiler.compile(("normal",), unique=True)
    ignore = compiler.compile(("ignore",), unique=True)
    negation = _cue_rules(compiler, "negation")
    uncertainty = _cue_rules(compiler, "uncertainty")

    typos = None
    if data.get("typos") is not None:
        settings = data["typos"]
        if (
            not isinstance(settings, dict)
            or set(settings) - _TYPO_FIELDS
            or not all(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1 for value in settings.values()
            )
        ):
            raise CxrflowError(f"{source.where('typos')}: expected positive whole numbers under {sorted(_TYPO_FIELDS)}")
        min_length, max_distance = settings.get("min_length", 6), settings.get("max_distance", 1)
        terms = list(compiler.terms)  # findings, absent, normal and ignore, lowered
        cues = [rule.pattern.pattern for rule in negation + uncertainty]
        typos = Typos(
            stems=_stems(terms, min_length, cues),
            min_length=min_length,
            max_distance=max_distance,
            protected=re.compile("|".join(f"(?:{cue})" for cue in cues)) if cues else None,
            morphology=morphology,
        )
    return Vocabulary(
        source=str(path),
        fold=fold,
        findings=findings,
        absent=absent,
        negation=negation,
        uncertainty=uncertainty,
        normal=normal,
        ignore=ignore,
        sentence_boundaries=boundary["sentence"],
        clause_boundaries=boundary["clause"],
        soft_boundaries=boundary["soft"],
        list_boundaries=boundary["list"],
        predicate=boundary["predicate"],
        list_any_case=boundary["list_any_case"],
        parenthetical=compiler.compile(("parenthetical",)),
        lookalikes=lookalikes or None,
        abbreviations=abbreviation_pattern,
        abbreviation_texts=tuple(abbreviations.values()),
        abbreviation_words=frozenset(
            word
            for pattern in expansions
            for word in _STEM.findall(
                re.sub(r"\\.", " ", re.sub(r"\[([^\]]*)\]", lambda m: " ".join(m.group(1)), pattern))
            )
        ),
        typos=typos,
        morphology=morphology,
        descriptors=descriptors,
    )


# --- from a note to its units -------------------------------------------------------------------------------------


def _fold_lookalikes(text: str, lookalikes: dict, known=lambda word: False) -> str:
    """Latin letters inside a Cyrillic word, a lone Latin letter standing for a Russian one-letter word, or a
    word of look-alikes only whose Cyrillic twin is ``known`` ("Ao уплотнена", "Аорта he расширена")."""
    if not _LATIN.search(text) or not _CYRILLIC.search(text):
        return text
    table = str.maketrans(lookalikes)

    def fold_word(match):
        word = match.group()
        if len(word) == 1:
            folded = lookalikes.get(word, word)
            return folded if folded in _ONE_LETTER_WORDS else word
        if _CYRILLIC.search(word):
            return word.translate(table) if _LATIN.search(word) else word
        folded = word.translate(table)
        return folded if not _LATIN.search(folded) and known(folded) else word

    return _WORD.sub(fold_word, text)


def normalise(text: str, vocab: Vocabulary) -> str:
    """Lower-case and fold characters, as the patterns were; fold Latin look-alikes in Cyrillic words."""
    text = _fold(text.lower(), vocab.fold)
    if not vocab.lookalikes:
        return text
    return _fold_lookalikes(text, vocab.lookalikes, lambda word: _known_word(word, vocab))


def _known_word(word: str, vocab: Vocabulary) -> bool:
    """Whether ``word`` is an abbreviation of the vocabulary or a word the dictionary knows: only then does a word
    typed wholly in Latin look-alikes read as Cyrillic ("he" as "не"; "status" stays Latin)."""
    if word in vocab.abbreviation_words:
        return True
    return vocab.morphology is not None and bool(_parses(vocab.morphology, word)[0].is_known)


def split_units(text: str, vocab: Vocabulary) -> list[str]:
    """Cut a normalised note after each sentence boundary into the units that cue scopes live in.

    The boundary stays at the end of its unit, so "Пневмония?" keeps its question mark. A boundary that
    ends an abbreviation ("пр.", "т.е.") is none. Units are labelled once each across the whole archive,
    because notes are built from far fewer distinct sentences than there are distinct notes. Keep
    sentence patterns cheap: they run on every note.
    """
    if vocab.sentence_boundaries is None:
        return [text.strip()] if text.strip() else []  # One unit per note, unless sentences are defined.
    units, start = [], 0
    for match in vocab.sentence_boundaries.finditer(text):
        if _inside_abbreviation(text, match.end(), vocab):  # "пр.", "т. е.": no sentence ends inside one
            continue
        units.append(text[start : match.end()])
        start = match.end()
    units.append(text[start:])
    return [unit for unit in map(str.strip, units) if unit]


def _inside_abbreviation(text: str, position: int, vocab: Vocabulary) -> bool:
    """Whether an abbreviation spans ``position``; only the few characters around it are searched, since a
    scan of every note for every abbreviation would cost more than all the rest of the labelling."""
    if vocab.abbreviations is None or text[position - 1 : position] != ".":
        return False
    word = text[max(text.rfind(" ", 0, position - 1), text.rfind(".", 0, position - 1)) + 1 : position - 1]
    if word not in vocab.abbreviation_words:
        return False  # a sentence ends after a word no abbreviation holds ("расширено.")
    window = vocab.abbreviations.finditer(text, max(0, position - 24), min(len(text), position + 24))
    return any(match.start() < position <= match.end() for match in window)


def _expand(unit: str, vocab: Vocabulary) -> tuple[str, list[tuple[str, str]]]:
    """Expand abbreviations and correct typos in one unit; also return the (typo, correction) pairs."""
    if vocab.abbreviations is not None:
        unit = vocab.abbreviations.sub(lambda match: vocab.abbreviation_texts[match.lastindex - 1], unit)
    fixes = []
    if vocab.typos is not None:

        def fix(match):
            word = match.group()
            corrected = vocab.typos.correct(word)
            if corrected is None:
                return word
            fixes.append((word, corrected))
            return corrected

        unit = _LONG_WORD[vocab.typos.min_length].sub(fix, unit)
    return unit, fixes


class _LongWords(dict):
    def __missing__(self, length):
        self[length] = pattern = re.compile(rf"\b[^\W\d_]{{{length},}}\b")
        return pattern


_LONG_WORD = _LongWords()


def _blank(text: str, pattern: re.Pattern | None) -> str:
    # Spaces of equal length keep offsets, word counts and commas where they were.
    return text if pattern is None else pattern.sub(lambda match: " " * len(match.group()), text)


def _unparenthesise(text: str, pattern: re.Pattern | None) -> tuple[str, list[tuple[int, int]]]:
    """ ", по-видимому," -> "  по видимому ": a parenthetical hedge neither splits its finding nor ends a scope.
    Also return the asides' spans."""
    if pattern is None:
        return text, []
    spans = []

    def blank(match):
        spans.append(match.span())
        return re.sub(r"[^\w\s]", " ", match.group())

    return pattern.sub(blank, text), spans


# --- cue scopes ---------------------------------------------------------------------------------------------------


class _Boundaries:
    """Sorted boundary spans in one unit, to cut a cue's scope quickly."""

    def __init__(self, text: str, pattern: re.Pattern | None):
        matches = list(pattern.finditer(text)) if pattern is not None else []
        self.starts = [match.start() for match in matches]
        self.match_ends = [match.end() for match in matches]
        self.ends = sorted(self.match_ends)

    def next_start(self, position: int, default: int) -> int:
        """Start of the first boundary at or after ``position``."""
        index = bisect.bisect_left(self.starts, position)
        return min(self.starts[index], default) if index < len(self.starts) else default

    def next_span(self, position: int, limit: int) -> tuple[int, int] | None:
        """(start, end) of the first boundary at or after ``position`` that starts before ``limit``."""
        index = bisect.bisect_left(self.starts, position)
        if index < len(self.starts) and self.starts[index] < limit:
            return self.starts[index], self.match_ends[index]
        return None

    def previous_end(self, position: int, default: int) -> int:
        """End of the last boundary at or before ``position``."""
        index = bisect.bisect_right(self.ends, position)
        return max(self.ends[index - 1], default) if index else default

    def previous_span(self, position: int, limit: int) -> tuple[int, int] | None:
        """(start, end) of the last boundary ending at or before ``position`` and after ``limit``."""
        index = bisect.bisect_right(self.match_ends, position)
        if index and self.match_ends[index - 1] > limit:
            return self.starts[index - 1], self.match_ends[index - 1]
        return None


class _Segments:
    """Decides whether a comma or "и" segment is a list item (no predicate of its own)."""

    def __init__(self, vocab: Vocabulary):
        self.vocab = vocab

    def is_list_item(self, segment: str, before: str = "") -> bool:
        """Whether ``segment`` continues a list; ``before`` is the clause up to it ("Данных за пневмонию,")."""
        if not segment.strip():
            return True
        if self.vocab.predicate is not None and self.vocab.predicate.search(segment):
            return False
        morph = self.vocab.morphology
        if morph is None:
            return True
        words = [word for word in _WORD.findall(segment) if word.isalpha()]
        if any(_first_pos(morph, word) in _PREDICATE_POS for word in words):
            return False
        content = [word for word in words if len(word) > 2]
        if not content or (self.vocab.list_any_case is not None and self.vocab.list_any_case.search(before)):
            return True
        # A negated Russian noun is genitive ("теней", "эмфиземы"); "сколиоз" after "Пневмонии нет," is not.
        return _can_be_genitive(morph, content[0])


_MORPH_CACHE: dict = {}


def _parses(morph, word: str):
    parses = _MORPH_CACHE.get(word)
    if parses is None:
        _MORPH_CACHE[word] = parses = morph.parse(word)
    return parses


def _first_pos(morph, word: str):
    return _parses(morph, word)[0].tag.POS


def _can_be_genitive(morph, word: str) -> bool:
    return any("gent" in parse.tag and not (_NAME_GRAMMEMES & parse.tag.grammemes) for parse in _parses(morph, word))


def _cue_scopes(
    unit: str,
    rules: tuple[CueRule, ...],
    clause: _Boundaries,
    soft: _Boundaries,
    lists: _Boundaries,
    segments: _Segments,
) -> list[tuple[int, int, int, bool]]:
    """(start, end, cue start, backward) of the spans that a unit's cues cover, each cut at its clause (or comma)
    and window; ``backward`` for a cue that looks back (``direction: after``)."""
    scopes = []
    for rule in rules:
        for cue in rule.pattern.finditer(unit):
            if rule.direction == "before":
                limit = clause.next_start(cue.end(), len(unit))
                if rule.across_commas is not True:
                    boundary = soft if rule.across_commas is False else lists
                    limit = boundary.next_start(cue.end(), limit)
                words = [word.end() for word in _WORD.finditer(unit, cue.end(), limit)]
                end = limit if rule.window is None or len(words) <= rule.window else words[rule.window - 1]
                if rule.across_commas == "list" and end == limit:
                    end = _extend_forward(unit, limit, clause.next_start(cue.end(), len(unit)), lists, segments)
                scopes.append((cue.start(), max(end, cue.end()), cue.start(), False))
            else:
                limit = clause.previous_end(cue.start(), 0)
                if rule.across_commas is not True:
                    boundary = soft if rule.across_commas is False else lists
                    limit = boundary.previous_end(cue.start(), limit)
                words = [word.start() for word in _WORD.finditer(unit, limit, cue.start())]
                start = limit if rule.window is None or len(words) <= rule.window else words[-rule.window]
                if rule.across_commas == "list" and start == limit:
                    start = _extend_backward(unit, limit, clause.previous_end(cue.start(), 0), lists, segments)
                scopes.append((min(start, cue.start()), cue.end(), cue.start(), True))
    return scopes


def _extend_forward(unit: str, position: int, clause_end: int, lists: _Boundaries, segments: _Segments) -> int:
    """Carry a scope over the list items that follow ``position`` ("..., эмфиземы и фиброза")."""
    while position < clause_end:
        span = lists.next_span(position, clause_end)
        if span is None or span[0] != position:
            return position
        following = lists.next_start(span[1], clause_end)
        if not segments.is_list_item(unit[span[1] : following], unit[:position]):
            return position
        position = following
    return position


def _extend_backward(unit: str, position: int, clause_start: int, lists: _Boundaries, segments: _Segments) -> int:
    """Carry a scope back over the list items before ``position`` ("Очаговых теней, инфильтрации ...")."""
    while position > clause_start:
        span = lists.previous_span(position, clause_start)
        if span is None or span[1] != position:
            return position
        preceding = lists.previous_end(span[0], clause_start)
        if not segments.is_list_item(unit[preceding : span[0]], unit[:preceding]):
            return position
        position = preceding
    return position


def _followed(position: int, mention_ends: list[int], clause: _Boundaries, soft: _Boundaries, length: int) -> bool:
    """Whether a mention ends after ``position`` in the same comma segment."""
    limit = soft.next_start(position, clause.next_start(position, length))
    return any(position < end <= limit for end in mention_ends)


def _reaches(mention_end: int, scopes: list[tuple[int, int, int, bool]]) -> bool:
    """Whether a scope holds the mention's last character.

    The last word carries the finding ("сердце не расширено", "heart is not enlarged", "очаговых
    теней"), so "Аорта не уплотнена и развёрнута" negates the compacted aorta but not the unfolded one.
    """
    return any(scope_start < mention_end <= scope_end for scope_start, scope_end, *_ in scopes)


def _unit_mentions(unit: str, vocab: Vocabulary) -> list[Mention]:
    """Every mention of a key in one expanded, normalised unit, with its state."""
    text, asides = _unparenthesise(unit, vocab.parenthetical)
    mentions = []
    if vocab.normal is not None:
        mentions += [
            Mention(NORMAL_KEY, unit, match.start(), match.end(), match.group(), AFFIRMED)
            for match in vocab.normal.finditer(text)
        ]
        text = _blank(text, vocab.normal)
    text = _blank(text, vocab.ignore)
    raw = [(key, match, AFFIRMED) for key, pattern in vocab.findings.items() for match in pattern.finditer(text)]
    raw += [(key, match, AFFIRMED) for key, pattern in vocab.descriptors.items() for match in pattern.finditer(text)]
    raw += [(key, match, NEGATED) for key, pattern in vocab.absent.items() for match in pattern.finditer(text)]
    if not raw:
        return mentions  # Most units ("Синусы свободны.") mention nothing: skip the cue work.
    clause = _Boundaries(text, vocab.clause_boundaries)
    soft = _Boundaries(text, vocab.soft_boundaries)
    lists = _Boundaries(text, vocab.list_boundaries if vocab.list_boundaries is not None else vocab.soft_boundaries)
    segments = _Segments(vocab)
    negation = _cue_scopes(text, vocab.negation, clause, soft, lists, segments)
    uncertainty = _cue_scopes(text, vocab.uncertainty, clause, soft, lists, segments)
    # A hedge inside a negation's scope is negated with it: "No opacity to suggest pneumonia".
    uncertainty = [scope for scope in uncertainty if not any(start < scope[2] < end for start, end, *_ in negation)]
    if asides:
        # A hedge set off by commas between two findings goes with the second: "Корни сосудистые, вероятно,
        # малоструктурны" hedges only "малоструктурны". It reaches back only when no finding follows it.
        uncertainty = [
            scope for scope in uncertainty
            if not (scope[3] and any(start <= scope[2] < end for start, end in asides)
                    and _followed(scope[1], [match.end() for _, match, _ in raw], clause, soft, len(text)))
        ]  # fmt: skip
    found = []
    for key, match, state in raw:
        if state == AFFIRMED:
            if _reaches(match.end(), uncertainty):
                # Uncertainty outranks negation: "нельзя исключить", "cannot be excluded" hold a negation word.
                state = UNCERTAIN
            elif _reaches(match.end(), negation):
                state = NEGATED
        found.append(Mention(key, unit, match.start(), match.end(), unit[match.start() : match.end()], state))
    explained = any(mention.state in (AFFIRMED, UNCERTAIN) and "|" not in mention.key for mention in found)
    for mention in found:
        key, _, described = mention.key.partition("|")
        if described == ANY_FINDING:
            if explained:
                continue
            mention = dataclasses.replace(mention, key=key)
        mentions.append(mention)
    return sorted(mentions, key=lambda mention: (mention.start, mention.key))


def find_mentions(text: str, vocab: Vocabulary) -> list[Mention]:
    """Every mention of a key in a note, unit by unit, with its state: shows why a note got its labels.

    ``Mention.unit`` is the sentence as read (abbreviations expanded, typos corrected). A descriptor mention
    ("повышенная прозрачность" for other_finding) is kept, under its key, only when the note affirms or hedges
    nothing it describes, as in ``label_texts``. A ``normal`` mention is the phrase; whether the note counts as
    normal also depends on its other mentions."""
    units = split_units(normalise(text, vocab), vocab)
    mentions = [mention for unit in units for mention in _unit_mentions(_expand(unit, vocab)[0], vocab)]
    found = {mention.key for mention in mentions if mention.state in (AFFIRMED, UNCERTAIN) and "|" not in mention.key}
    resolved = []
    for mention in mentions:
        key, _, described = mention.key.partition("|")
        if described:
            if described in found:
                continue
            mention = dataclasses.replace(mention, key=key)
        resolved.append(mention)
    return resolved


# --- labelling an archive -----------------------------------------------------------------------------------------


def _unit_states(units, vocab: Vocabulary, keys: list[str]) -> tuple[np.ndarray, dict[str, str], np.ndarray]:
    """State per (unit, key): the strongest of the unit's mentions of that key; and the typos corrected.

    ``keys`` may end with descriptor columns ("other_finding|emphysema")."""
    key_index = {key: index for index, key in enumerate(keys)}
    states = np.zeros((len(units), len(keys)), dtype=np.uint8)
    corrected: dict[str, str] = {}
    fixed = np.zeros(len(units), dtype=bool)
    for row, unit in enumerate(units):
        expanded, fixes = _expand(unit, vocab)
        if fixes:
            fixed[row] = True
            corrected.update(fixes)
        for mention in _unit_mentions(expanded, vocab):
            column = key_index.get(mention.key)
            if column is not None and mention.state > states[row, column]:
                states[row, column] = mention.state
    return states, corrected, fixed


def _note_states(notes, vocab: Vocabulary, keys: list[str], stats: dict | None = None) -> np.ndarray:
    """State per (distinct note, key), from the distinct units of all notes, each labelled once."""
    note_units = [split_units(normalise(note if isinstance(note, str) else str(note), vocab), vocab) for note in notes]
    lengths = np.fromiter(map(len, note_units), dtype=np.int64, count=len(note_units))
    unit_codes, units = pd.factorize(np.array(list(chain.from_iterable(note_units)), dtype=object))
    descriptors = [
        name for name in vocab.descriptors if name.split("|")[0] in keys and not name.endswith(f"|{ANY_FINDING}")
    ]
    unit_states, corrected, fixed = _unit_states(units, vocab, keys + descriptors)
    # A note without a unit is empty or whitespace: nothing was assessed.
    states = np.full((len(note_units), len(keys) + len(descriptors)), NOT_ASSESSED, dtype=np.uint8)
    note_fixed = np.zeros(len(note_units), dtype=bool)
    assessed = lengths > 0
    if assessed.any():
        first_unit = (np.cumsum(lengths) - lengths)[assessed]
        states[assessed] = np.maximum.reduceat(unit_states[unit_codes], first_unit, axis=0)
        note_fixed[assessed] = np.logical_or.reduceat(fixed[unit_codes], first_unit)
    for offset, name in enumerate(descriptors):
        key, described = name.split("|")
        column, described_state = keys.index(key), states[:, keys.index(described)] if described in keys else None
        keep = assessed.copy()
        if described_state is not None:
            keep &= (described_state != AFFIRMED) & (described_state != UNCERTAIN)
        states[keep, column] = np.maximum(states[keep, column], states[keep, len(keys) + offset])
    states = states[:, : len(keys)]
    if NORMAL_KEY in keys:
        column = keys.index(NORMAL_KEY)
        others = np.delete(states, column, axis=1)
        finding = ((others == AFFIRMED) | (others == UNCERTAIN)).any(axis=1)
        normal = states[:, column]
        # A normal-study phrase beside an affirmed or uncertain finding does not make the study normal.
        normal[assessed & finding & (normal == AFFIRMED)] = NEGATED
    if stats is not None:
        stats.update(typo_sentences=int(fixed.sum()), typo_words=corrected, note_fixed=note_fixed)
    return states


def _state_to_code(uncertain: str) -> tuple[np.ndarray, np.ndarray]:
    """Lookup tables from state to label value and to the missing mask, for one uncertain policy."""
    uncertain_value = {"missing": 0, "positive": 1, "negative": 0}[uncertain]
    values = np.array([0, 0, uncertain_value, 1, 0], dtype=np.int8)
    missing = np.array([False, False, uncertain == "missing", False, True])
    return values, missing


def label_texts(texts: pd.Series, vocab: Vocabulary, keys: list[str], uncertain: str = "missing") -> pd.DataFrame:
    """Label every text; the result has ``texts.index``, one ``Int8`` column per key (1 / 0 / <NA>).

    ``uncertain`` says how an uncertain mention is coded: "missing", "positive" (1) or "negative" (0).
    Each distinct text (and each distinct sentence in them) is labelled once, and rows are filled by
    numpy indexing, so a large archive costs about as much as its distinct notes. The result's
    ``attrs["typos"]`` counts how often typo tolerance fired: ``rows`` (notes in ``texts``),
    ``sentences`` (distinct) and ``words`` ({typo: correction}); the same figures are logged.
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise CxrflowError(f"uncertain={uncertain!r} is not one of {list(UNCERTAIN_POLICIES)}")
    if not isinstance(texts, pd.Series):
        raise CxrflowError(f"label_texts expects a pandas Series of texts, got {type(texts).__name__}")
    codes, notes = pd.factorize(texts, use_na_sentinel=True)
    stats: dict = {}
    # One extra last row, all NOT_ASSESSED, serves NaN/None rows, which factorize codes as -1.
    missing_row = np.full((1, len(keys)), NOT_ASSESSED, dtype=np.uint8)
    note_states = np.concatenate([_note_states(notes, vocab, keys, stats), missing_row])
    values, missing = _state_to_code(uncertain)
    # Code the few distinct notes, then gather rows key by key from small contiguous arrays.
    note_values, note_missing = values[note_states].T.copy(), missing[note_states].T.copy()
    columns = {
        key: pd.arrays.IntegerArray(note_values[index][codes], note_missing[index][codes])
        for index, key in enumerate(keys)
    }
    labels = pd.DataFrame(columns, index=texts.index, columns=list(keys), copy=False)
    note_fixed = np.append(stats["note_fixed"], False)
    typos = {"rows": int(note_fixed[codes].sum()), "sentences": stats["typo_sentences"], "words": stats["typo_words"]}
    labels.attrs["typos"] = typos
    if vocab.typos is not None:  # logged at 0 too: the user sees that it ran
        shown = ", ".join(f"{typo}->{fix}" for typo, fix in list(typos["words"].items())[:10])
        log.info(
            "%s: typo tolerance fired on %d rows (%d distinct sentences): %s",
            Path(vocab.source).name, typos["rows"], typos["sentences"], shown,
        )  # fmt: skip
    return labels


def benchmark_label_texts(texts: pd.Series, vocab: Vocabulary, keys: list[str], repeat: int = 20) -> dict:
    """Time ``label_texts`` on ``texts`` tiled ``repeat`` times, to check that duplicates cost nothing."""
    archive = pd.Series(np.tile(texts.to_numpy(dtype=object), repeat))
    started = time.perf_counter()
    label_texts(archive, vocab, keys)
    seconds = time.perf_counter() - started
    return {"rows": len(archive), "distinct": int(archive.nunique()), "seconds": round(seconds, 3)}
