"""Label free-text chest X-ray notes with the canonical keys: 1 (present), 0 (absent), missing.

The method is rule-based, in the way of NegEx and the CheXpert labeler. Every pattern lives in a
vocabulary YAML file per language (``config/labels/ru.yaml``, ``en.yaml``); this module holds no label
mapping.

1. A note is lower-cased and folded (Russian "ё" -> "е"; patterns are folded the same way) and cut
   into sentences (``boundaries.sentence``). Scopes never leave a sentence, so each distinct sentence
   is labelled once per archive and a note's labels combine its sentences'.
2. In a sentence, phrases under ``ignore`` ("subcutaneous emphysema", "без динамики") and ``normal``
   ("No acute cardiopulmonary process", "Без патологических изменений") are blanked, so they fire
   neither a finding nor a cue. Every match of a key's ``findings`` patterns is a *mention*.
3. Negation and uncertainty *cues* have a scope: ``window`` words after the cue (``direction: before``,
   "Без признаков кардиомегалии") or before it (``direction: after``, "Пневмонии нет"). A scope stops
   at a clause boundary (``boundaries.clause``: ";", "но", "but") and at a comma (``boundaries.soft``)
   unless the cue rule says ``across_commas`` ("No effusion, pneumothorax, or consolidation"). The
   comma rule keeps "Сердце не расширено, аорта уплотнена" from negating the aorta.
4. A mention is uncertain if an uncertainty scope reaches its last word, else negated if a negation
   scope does (a cue inside the mention counts: "сердце не расширено"), else affirmed. A match of a
   key's ``absent`` patterns ("Heart size is normal") is a negated mention.
5. Per note and key the strongest mention wins: affirmed > uncertain > negated > not mentioned. A key
   the note does not mention is 0, since a radiologist's note lists what it finds; a note marked
   normal therefore needs no special rule. An empty note is missing for every key: nothing was assessed.
"""

from __future__ import annotations

import bisect
import re
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import pandas as pd
import yaml


from cxrflow.errors import CxrflowError
from cxrflow.io import YAML_LOADER

UNCERTAIN_POLICIES = ("missing", "positive", "negative")

# Mention states, ordered so that the maximum over a note's mentions is the label rule.
UNMENTIONED, NEGATED, UNCERTAIN, AFFIRMED, NOT_ASSESSED = 0, 1, 2, 3, 4
STATE_NAMES = {UNMENTIONED: "unmentioned", NEGATED: "negated", UNCERTAIN: "uncertain", AFFIRMED: "affirmed"}

_VOCABULARY_SECTIONS = {"fold", "boundaries", "ignore", "normal", "findings", "absent", "negation", "uncertainty"}
_BOUNDARY_LEVELS = {"sentence", "clause", "soft"}
_CUE_RULE_FIELDS = {"direction", "window", "across_commas", "cues"}
_WORD = re.compile(r"\w+")
_ESCAPE_OR_TEXT = re.compile(r"\\.|[^\\]+", re.DOTALL)


@dataclass(frozen=True)
class CueRule:
    """Cues sharing one scope: ``window`` words after (``before``) or before (``after``) the cue."""

    direction: str
    window: int | None
    across_commas: bool
    pattern: re.Pattern


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


@dataclass(frozen=True)
class Mention:
    """One match of a key's pattern in a unit (sentence or clause) of a normalised note, with its state."""

    key: str
    unit: str
    start: int
    end: int
    text: str
    state: int


def _read_yaml(path) -> object:
    path = Path(path)
    if not path.is_file():
        raise CxrflowError(f"{path}: file not found")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=YAML_LOADER)
    except yaml.YAMLError as error:
        raise CxrflowError(f"{path}: not valid YAML: {error}") from error


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


def _combine(patterns: list[str], where: str) -> re.Pattern | None:
    """One alternation, so that a text is scanned once for all of them."""
    if not patterns:
        return None
    try:
        return re.compile("|".join(f"(?:{pattern})" for pattern in patterns))
    except re.error as error:
        # Happens when patterns clash once combined, e.g. two define the same named group.
        raise CxrflowError(f"{where}: patterns {patterns!r} do not combine into one regex: {error}") from error


def _compile(patterns: list[str], fold: tuple[tuple[str, str], ...], where: str) -> re.Pattern | None:
    """Compile each pattern alone (to name the bad one), then all as one alternation."""
    lowered = [_lower_pattern(pattern, fold) for pattern in patterns]
    for original, pattern in zip(patterns, lowered):
        try:
            re.compile(pattern)
        except re.error as error:
            raise CxrflowError(f"{where}: bad regex {original!r}: {error}") from error
    return _combine(lowered, where)


def _compile_per_key(section, keys: list[str], fold: tuple[tuple[str, str], ...], where: str) -> dict[str, re.Pattern]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise CxrflowError(f"{where}: expected a mapping of canonical key -> list of patterns")
    canonical = set(keys)
    compiled = {}
    for key, patterns in section.items():
        if key not in canonical:
            raise CxrflowError(f"{where}: key {key!r} is not a canonical key (see config/labels/keys.yaml)")
        pattern = _compile(_pattern_list(patterns, f"{where}.{key}"), fold, f"{where}.{key}")
        if pattern is not None:
            compiled[key] = pattern
    return compiled


def _cue_rules(section, fold: tuple[tuple[str, str], ...], where: str) -> tuple[CueRule, ...]:
    if section is None:
        return ()
    if not isinstance(section, list):
        raise CxrflowError(f"{where}: expected a list of cue rules (direction, window, cues)")
    rules = []
    for number, rule in enumerate(section):
        place = f"{where}[{number}]"
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
        if not isinstance(across_commas, bool):
            raise CxrflowError(f"{place}: across_commas must be true or false, got {across_commas!r}")
        pattern = _compile(_pattern_list(rule["cues"], f"{place}.cues"), fold, f"{place}.cues")
        if pattern is not None:
            rules.append(CueRule(direction, window, across_commas, pattern))
    return tuple(rules)


def load_vocabulary(path, keys: list[str]) -> Vocabulary:
    """Read and compile one language's vocabulary YAML; every key must be one of ``keys``."""
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise CxrflowError(f"{path}: expected a mapping with sections {sorted(_VOCABULARY_SECTIONS)}")
    unknown = set(data) - _VOCABULARY_SECTIONS
    if unknown:
        raise CxrflowError(f"{path}: unknown section(s) {sorted(unknown)}; allowed: {sorted(_VOCABULARY_SECTIONS)}")
    fold_map = data.get("fold") or {}
    if not isinstance(fold_map, dict) or not all(
        isinstance(a, str) and a and isinstance(b, str) for a, b in fold_map.items()
    ):
        raise CxrflowError(f"{path}: fold: expected a mapping of strings to strings, got {fold_map!r}")
    fold = tuple((a.lower(), b.lower()) for a, b in fold_map.items())
    boundaries = data.get("boundaries") or {}
    if not isinstance(boundaries, dict) or set(boundaries) - _BOUNDARY_LEVELS:
        raise CxrflowError(
            f"{path}: boundaries: expected a mapping with pattern lists under {sorted(_BOUNDARY_LEVELS)}"
        )
    boundary = {
        level: _compile(
            _pattern_list(boundaries.get(level) or [], f"{path}: boundaries.{level}"),
            fold,
            f"{path}: boundaries.{level}",
        )
        for level in _BOUNDARY_LEVELS
    }
    return Vocabulary(
        source=str(path),
        fold=fold,
        findings=_compile_per_key(data.get("findings"), keys, fold, f"{path}: findings"),
        absent=_compile_per_key(data.get("absent"), keys, fold, f"{path}: absent"),
        negation=_cue_rules(data.get("negation"), fold, f"{path}: negation"),
        uncertainty=_cue_rules(data.get("uncertainty"), fold, f"{path}: uncertainty"),
        normal=_compile(_pattern_list(data.get("normal") or [], f"{path}: normal"), fold, f"{path}: normal"),
        ignore=_compile(_pattern_list(data.get("ignore") or [], f"{path}: ignore"), fold, f"{path}: ignore"),
        sentence_boundaries=boundary["sentence"],
        clause_boundaries=boundary["clause"],
        soft_boundaries=boundary["soft"],
    )


def normalise(text: str, vocab: Vocabulary) -> str:
    """Lower-case and fold characters, as the patterns were."""
    return _fold(text.lower(), vocab.fold)


def split_units(text: str, vocab: Vocabulary) -> list[str]:
    """Cut a normalised note after each sentence boundary into the units that cue scopes live in.

    The boundary stays at the end of its unit, so "Пневмония?" keeps its question mark. Units are
    labelled once each across the whole archive, because notes are built from far fewer distinct
    sentences than there are distinct notes. Keep sentence patterns cheap: they run on every note.
    """
    if vocab.sentence_boundaries is None:
        return [text.strip()] if text.strip() else []  # One unit per note, unless sentences are defined.
    units, start = [], 0
    for match in vocab.sentence_boundaries.finditer(text):
        units.append(text[start : match.end()])
        start = match.end()
    units.append(text[start:])
    return [unit for unit in map(str.strip, units) if unit]


def _blank(text: str, pattern: re.Pattern | None) -> str:
    # Spaces of equal length keep offsets, word counts and commas where they were.
    return text if pattern is None else pattern.sub(lambda match: " " * len(match.group()), text)


class _Boundaries:
    """Sorted boundary offsets in one unit, to cut a cue's scope quickly."""

    def __init__(self, text: str, pattern: re.Pattern | None):
        matches = list(pattern.finditer(text)) if pattern is not None else []
        self.starts = [match.start() for match in matches]
        self.ends = sorted(match.end() for match in matches)

    def next_start(self, position: int, default: int) -> int:
        """Start of the first boundary at or after ``position``."""
        index = bisect.bisect_left(self.starts, position)
        return min(self.starts[index], default) if index < len(self.starts) else default

    def previous_end(self, position: int, default: int) -> int:
        """End of the last boundary at or before ``position``."""
        index = bisect.bisect_right(self.ends, position)
        return max(self.ends[index - 1], default) if index else default


def _cue_scopes(unit: str, rules: tuple[CueRule, ...], clause: _Boundaries, soft: _Boundaries) -> list[tuple[int, int]]:
    """The character spans that a unit's cues cover, each cut at its clause (or comma) and word window."""
    scopes = []
    for rule in rules:
        for cue in rule.pattern.finditer(unit):
            if rule.direction == "before":
                limit = clause.next_start(cue.end(), len(unit))
                if not rule.across_commas:
                    limit = soft.next_start(cue.end(), limit)
                words = [word.end() for word in _WORD.finditer(unit, cue.end(), limit)]
                end = limit if rule.window is None else (words[: rule.window] or [cue.end()])[-1]
                scopes.append((cue.start(), max(end, cue.end())))
            else:
                limit = clause.previous_end(cue.start(), 0)
                if not rule.across_commas:
                    limit = soft.previous_end(cue.start(), limit)
                words = [word.start() for word in _WORD.finditer(unit, limit, cue.start())]
                start = limit if rule.window is None else (words[-rule.window :] or [cue.start()])[0]
                scopes.append((min(start, cue.start()), cue.end()))
    return scopes


def _reaches(mention_end: int, scopes: list[tuple[int, int]]) -> bool:
    """Whether a scope holds the mention's last character.

    The last word carries the finding ("сердце не расширено", "heart is not enlarged", "очаговых
    теней"), so "Аорта не уплотнена и развёрнута" negates the compacted aorta but not the unfolded one.
    """
    return any(scope_start < mention_end <= scope_end for scope_start, scope_end in scopes)


def _unit_mentions(unit: str, vocab: Vocabulary) -> list[Mention]:
    """Every mention of a key in one normalised unit, with its state."""
    text = _blank(_blank(unit, vocab.ignore), vocab.normal)
    raw = [(key, match, AFFIRMED) for key, pattern in vocab.findings.items() for match in pattern.finditer(text)]
    raw += [(key, match, NEGATED) for key, pattern in vocab.absent.items() for match in pattern.finditer(text)]
    if not raw:
        return []  # Most units ("Синусы свободны.") mention nothing: skip the cue work.
    clause = _Boundaries(text, vocab.clause_boundaries)
    soft = _Boundaries(text, vocab.soft_boundaries)
    negation = _cue_scopes(text, vocab.negation, clause, soft)
    uncertainty = _cue_scopes(text, vocab.uncertainty, clause, soft)
    mentions = []
    for key, match, state in raw:
        if state == AFFIRMED:
            if _reaches(match.end(), uncertainty):
                # Uncertainty outranks negation: "нельзя исключить", "cannot be excluded" hold a negation word.
                state = UNCERTAIN
            elif _reaches(match.end(), negation):
                state = NEGATED
        mentions.append(Mention(key, unit, match.start(), match.end(), match.group(), state))
    return sorted(mentions, key=lambda mention: (mention.start, mention.key))


def find_mentions(text: str, vocab: Vocabulary) -> list[Mention]:
    """Every mention of a key in a note, unit by unit, with its state: shows why a note got its labels."""
    units = split_units(normalise(text, vocab), vocab)
    return [mention for unit in units for mention in _unit_mentions(unit, vocab)]


def _unit_states(units, vocab: Vocabulary, keys: list[str]) -> np.ndarray:
    """State per (unit, key): the strongest of the unit's mentions of that key."""
    key_index = {key: index for index, key in enumerate(keys)}
    states = np.zeros((len(units), len(keys)), dtype=np.uint8)
    for row, unit in enumerate(units):
        for mention in _unit_mentions(unit, vocab):
            column = key_index.get(mention.key)
            if column is not None and mention.state > states[row, column]:
                states[row, column] = mention.state
    return states


def _note_states(notes, vocab: Vocabulary, keys: list[str]) -> np.ndarray:
    """State per (distinct note, key), from the distinct units of all notes, each labelled once."""
    note_units = [split_units(normalise(note if isinstance(note, str) else str(note), vocab), vocab) for note in notes]
    lengths = np.fromiter(map(len, note_units), dtype=np.int64, count=len(note_units))
    unit_codes, units = pd.factorize(np.array(list(chain.from_iterable(note_units)), dtype=object))
    unit_states = _unit_states(units, vocab, keys)
    # A note without a unit is empty or whitespace: nothing was assessed.
    states = np.full((len(note_units), len(keys)), NOT_ASSESSED, dtype=np.uint8)
    assessed = lengths > 0
    if assessed.any():
        first_unit = (np.cumsum(lengths) - lengths)[assessed]
        states[assessed] = np.maximum.reduceat(unit_states[unit_codes], first_unit, axis=0)
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
    numpy indexing, so a large archive costs about as much as its distinct notes.
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise CxrflowError(f"uncertain={uncertain!r} is not one of {list(UNCERTAIN_POLICIES)}")
    if not isinstance(texts, pd.Series):
        raise CxrflowError(f"label_texts expects a pandas Series of texts, got {type(texts).__name__}")
    codes, notes = pd.factorize(texts, use_na_sentinel=True)
    # One extra last row, all NOT_ASSESSED, serves NaN/None rows, which factorize codes as -1.
    missing_row = np.full((1, len(keys)), NOT_ASSESSED, dtype=np.uint8)
    note_states = np.concatenate([_note_states(notes, vocab, keys), missing_row])
    values, missing = _state_to_code(uncertain)
    # Code the few distinct notes, then gather rows key by key from small contiguous arrays.
    note_values, note_missing = values[note_states].T.copy(), missing[note_states].T.copy()
    columns = {
        key: pd.arrays.IntegerArray(note_values[index][codes], note_missing[index][codes])
        for index, key in enumerate(keys)
    }
    return pd.DataFrame(columns, index=texts.index, columns=list(keys), copy=False)


def benchmark_label_texts(texts: pd.Series, vocab: Vocabulary, keys: list[str], repeat: int = 20) -> dict:
    """Time ``label_texts`` on ``texts`` tiled ``repeat`` times, to check that duplicates cost nothing."""
    archive = pd.Series(np.tile(texts.to_numpy(dtype=object), repeat))
    started = time.perf_counter()
    label_texts(archive, vocab, keys)
    seconds = time.perf_counter() - started
    return {"rows": len(archive), "distinct": int(archive.nunique()), "seconds": round(seconds, 3)}
