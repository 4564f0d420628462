"""How far the free-text labeler reaches into an archive, and sheets for a doctor to check what it says.

Free-text sources only (a source with a ``vocabulary``): a native label map has no wording to cover or audit.

- ``scan_archive`` labels each distinct sentence of the archive once (``labels.find_mentions``) and keeps, per
  distinct note and key, the strongest state: affirmed > uncertain > negated > not mentioned (the labeler's rule).
- ``coverage_table`` is shareable (counts and shares only). ``unmatched_text`` (the most frequent notes and
  sentences that matched nothing) and ``near_miss_words`` (words a few edits from a word the labeler accepted
  elsewhere, but never accepted themselves) hold note text: they belong under ``results/private/``.
- ``audit_sheets``: a seeded sample of distinct notes per key and state, the key's mentions marked [[like this]],
  and an empty ``verdict`` column for a doctor. ``read_verdicts`` and ``precision_table`` read the filled sheets
  back; each proportion comes with a Wilson 95% interval.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from difflib import SequenceMatcher
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from cxrflow.errors import CxrflowError
from cxrflow.labels import AFFIRMED, NEGATED, UNCERTAIN, Mention, find_mentions, normalise, split_units

# Strength of a mention's state: a note's state for a key is the strongest of its mentions (0: not mentioned).
RANK = {NEGATED: 1, UNCERTAIN: 2, AFFIRMED: 3}
STATES = {"affirmed": 3, "uncertain": 2, "negated": 1, "unmentioned": 0}
STATE_OF_RANK = {rank: name for name, rank in STATES.items()}
# The key for "normal study" phrases, when the vocabulary has one; it is not a finding.
NORMAL_KEY = "normal"
SHEET_COLUMNS = ["key", "state", "images", "note", "mentions", "verdict", "comment"]
VERDICTS = {"correct": True, "incorrect": False, "верно": True, "неверно": False}
Z95 = 1.959963984540054  # the 97.5% point of the standard normal
_WORD = re.compile(r"[^\W\d_]+")


@dataclass(frozen=True)
class ArchiveScan:
    """Each distinct note and distinct sentence of an archive, labelled once, with how many images carry it."""

    keys: list[str]
    rows: int  # images (catalog rows)
    empty_rows: int  # images whose note is missing or blank: nothing to label
    notes: np.ndarray  # distinct notes, original text (object array)
    note_images: np.ndarray  # images per distinct note
    note_states: np.ndarray  # (notes, keys): the strongest state's rank, 0 when not mentioned
    note_lengths: np.ndarray  # sentences per distinct note (0: a blank note)
    unit_codes: np.ndarray  # the notes' sentences one after another, as indices into `units`
    units: np.ndarray  # distinct sentences, normalised (lower-cased, folded), as the labeler sees them
    unit_mentions: list[list[Mention]]
    unit_normal_spans: list[list[tuple[int, int]]]  # "normal study" phrases in each sentence
    unit_images: np.ndarray  # occurrences of each sentence over all images
    unit_notes: np.ndarray  # distinct notes holding each sentence

    @cached_property
    def unit_finding(self) -> np.ndarray:
        return np.array([any(m.key != NORMAL_KEY for m in ms) for ms in self.unit_mentions], dtype=bool)

    @cached_property
    def unit_normal(self) -> np.ndarray:
        return np.array([bool(spans) or any(m.key == NORMAL_KEY for m in ms)
                         for ms, spans in zip(self.unit_mentions, self.unit_normal_spans)], dtype=bool)

    @property
    def assessed(self) -> np.ndarray:
        """Distinct notes with at least one sentence."""
        return self.note_lengths > 0

    def per_note(self, unit_flags: np.ndarray) -> np.ndarray:
        """Whether any sentence of each distinct note has the flag."""
        flags = np.zeros(len(self.notes), dtype=bool)
        if self.assessed.any():
            first = (np.cumsum(self.note_lengths) - self.note_lengths)[self.assessed]
            flags[self.assessed] = np.maximum.reduceat(unit_flags[self.unit_codes].astype(np.uint8), first) > 0
        return flags


def _normal_spans(unit: str, vocab) -> list[tuple[int, int]]:
    # The vocabulary's "normal study" phrases, when it keeps them as a pattern rather than as a key.
    pattern = getattr(vocab, "normal", None)
    return [match.span() for match in pattern.finditer(unit)] if isinstance(pattern, re.Pattern) else []


def scan_archive(texts: pd.Series, vocab, keys: list[str]) -> ArchiveScan:
    """Label each distinct sentence of ``texts`` once; count images per distinct note and sentence."""
    codes, uniques = pd.factorize(texts, use_na_sentinel=True)
    images = np.bincount(codes[codes >= 0], minlength=len(uniques))
    return scan_distinct_notes(np.asarray(uniques, dtype=object), images, len(texts), vocab, keys)


def read_distinct_notes(catalog_path, column: str = "text") -> tuple[np.ndarray, np.ndarray, int]:
    """(distinct notes, images per note, images) of a parquet catalog, without hashing millions of strings:
    parquet keeps a column's distinct values as a dictionary, and arrow reads it as one."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    chunked = pq.read_table(catalog_path, columns=[column], read_dictionary=[column]).column(column)
    if pa.types.is_null(chunked.type):  # no row has a note
        return np.array([], dtype=object), np.array([], dtype=np.int64), len(chunked)
    if not pa.types.is_dictionary(chunked.type):
        chunked = pc.dictionary_encode(chunked)
    chunks = chunked.unify_dictionaries().chunks  # one dictionary for all row groups
    if not chunks:
        return np.array([], dtype=object), np.array([], dtype=np.int64), 0
    images = np.zeros(len(chunks[0].dictionary), dtype=np.int64)
    for chunk in chunks:
        indices = chunk.indices.to_numpy(zero_copy_only=False)
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        images += np.bincount(indices[valid].astype(np.int64), minlength=len(images))
    used = images > 0  # the dictionary may hold values no row uses
    return np.asarray(chunks[0].dictionary.to_pylist(), dtype=object)[used], images[used], len(chunked)


def scan_distinct_notes(notes: np.ndarray, note_images: np.ndarray, rows: int, vocab, keys: list[str]) -> ArchiveScan:
    """``scan_archive`` on distinct notes already counted: ``note_images[i]`` images carry ``notes[i]``, out of
    ``rows`` images in all (those without a note make up the difference)."""
    notes = np.asarray(notes, dtype=object)
    note_images = np.asarray(note_images, dtype=np.int64)
    note_unit_text = [split_units(normalise(str(note), vocab), vocab) for note in notes]
    lengths = np.fromiter(map(len, note_unit_text), dtype=np.int64, count=len(notes))
    flat = np.empty(int(lengths.sum()), dtype=object)
    flat[:] = [unit for units in note_unit_text for unit in units]
    unit_codes, unit_index = pd.factorize(flat)
    units = np.asarray(unit_index, dtype=object)
    unit_mentions = [find_mentions(unit, vocab) for unit in units]  # a sentence is its own only unit
    key_index = {key: column for column, key in enumerate(keys)}
    unit_states = np.zeros((len(units), len(keys)), dtype=np.uint8)
    for row, mentions in enumerate(unit_mentions):
        for mention in mentions:
            column, rank = key_index.get(mention.key), RANK.get(mention.state, 0)
            if column is not None and rank > unit_states[row, column]:
                unit_states[row, column] = rank
    note_states = np.zeros((len(notes), len(keys)), dtype=np.uint8)
    assessed = lengths > 0
    if assessed.any():
        first = (np.cumsum(lengths) - lengths)[assessed]
        note_states[assessed] = np.maximum.reduceat(unit_states[unit_codes], first, axis=0)
    note_of_unit = np.repeat(np.arange(len(notes)), lengths)
    pairs = np.unique(note_of_unit * max(len(units), 1) + unit_codes)
    return ArchiveScan(
        keys=list(keys),
        rows=int(rows),
        empty_rows=int(rows - note_images[assessed].sum()),
        notes=notes,
        note_images=note_images,
        note_states=note_states,
        note_lengths=lengths,
        unit_codes=unit_codes,
        units=units,
        unit_mentions=unit_mentions,
        unit_normal_spans=[_normal_spans(unit, vocab) for unit in units],
        unit_images=np.bincount(unit_codes, weights=note_images[note_of_unit], minlength=len(units)).astype(np.int64),
        unit_notes=np.bincount(pairs % max(len(units), 1), minlength=len(units)),
    )


# --- coverage ------------------------------------------------------------------------------------------------

def coverage_table(scan: ArchiveScan) -> pd.DataFrame:
    """Counts and shares only, no text. ``count`` is images (or, for sentences, their occurrences over all
    images); ``distinct`` is distinct notes (or sentences). Shares are of the notes (or sentences) there are."""
    assessed = scan.assessed
    images, distinct = scan.note_images[assessed], int(assessed.sum())
    total_images = int(images.sum())
    finding, normal = scan.per_note(scan.unit_finding)[assessed], scan.per_note(scan.unit_normal)[assessed]
    unit_matched = scan.unit_finding | scan.unit_normal
    rows = []

    def add(measure, key, mask, weights, total, total_distinct):
        count = int(weights[mask].sum())
        hits = int(mask.sum())
        rows.append({"measure": measure, "key": key, "count": count, "share": _share(count, total),
                     "distinct": hits, "distinct_share": _share(hits, total_distinct)})

    rows.append({"measure": "images", "key": "", "count": scan.rows, "share": 1.0, "distinct": np.nan,
                 "distinct_share": np.nan})
    rows.append({"measure": "images_without_note", "key": "", "count": scan.empty_rows,
                 "share": _share(scan.empty_rows, scan.rows), "distinct": np.nan, "distinct_share": np.nan})
    everything = np.ones(distinct, dtype=bool)
    add("notes", "", everything, images, total_images, distinct)
    add("notes_matched", "", finding | normal, images, total_images, distinct)
    add("notes_with_finding", "", finding, images, total_images, distinct)
    add("notes_with_normal_phrase", "", normal, images, total_images, distinct)
    add("notes_unmatched", "", ~(finding | normal), images, total_images, distinct)
    total_units = int(scan.unit_images.sum())
    add("sentences", "", np.ones(len(scan.units), dtype=bool), scan.unit_images, total_units, len(scan.units))
    add("sentences_matched", "", unit_matched, scan.unit_images, total_units, len(scan.units))
    add("sentences_unmatched", "", ~unit_matched, scan.unit_images, total_units, len(scan.units))
    states = scan.note_states[assessed]
    for column, key in enumerate(scan.keys):
        for state in ("affirmed", "uncertain", "negated"):
            add(state, key, states[:, column] == STATES[state], images, total_images, distinct)
    return pd.DataFrame(rows).astype({"count": "int64", "distinct": "Int64"})


def _share(count: int, total: int) -> float:
    return round(count / total, 6) if total else float("nan")


def unmatched_text(scan: ArchiveScan, top: int) -> pd.DataFrame:
    """The ``top`` most frequent notes, and sentences, in which the labeler found neither a finding nor a
    "normal study" phrase: what a user reads to extend the vocabulary. Holds note text (private)."""
    unit_matched = scan.unit_finding | scan.unit_normal
    note_matched = scan.per_note(unit_matched)
    assessed = scan.assessed
    notes = pd.DataFrame({"kind": "note", "text": scan.notes, "images": scan.note_images,
                          "distinct_notes": 1})[assessed & ~note_matched]
    sentences = pd.DataFrame({"kind": "sentence", "text": scan.units, "images": scan.unit_images,
                              "distinct_notes": scan.unit_notes})[~unit_matched]
    frames = [frame.sort_values(["images", "text"], ascending=[False, True], kind="stable").head(top)
              for frame in (notes, sentences)]
    return pd.concat(frames, ignore_index=True).astype({"images": "int64", "distinct_notes": "int64"})


def _whole_words(text: str, start: int, end: int) -> str:
    """text[start:end] widened to whole words, so that a span cut inside a word does not count half of it."""
    while start > 0 and text[start - 1].isalpha():
        start -= 1
    while end < len(text) and text[end].isalpha():
        end += 1
    return text[start:end]


def allowed_distance(word: str, max_distance: int) -> int:
    """Edits a near miss may be from a term: one for words under 8 letters, up to ``max_distance`` for longer."""
    return min(max_distance, 1) if len(word) < 8 else max_distance


def near_miss_words(scan: ArchiveScan, max_distance: int = 2, min_length: int = 5, top: int = 200) -> pd.DataFrame:
    """Words within a few edits (optimal string alignment: a transposition is one edit) of a *term*, a word that
    occurs inside a matched span somewhere in the archive, that are never inside one themselves. Counted over
    images; the ``top`` most frequent. Holds words and an example sentence from the notes (private)."""
    from rapidfuzz.distance import OSA
    from rapidfuzz.process import cdist

    term_keys: dict[str, set[str]] = {}
    term_images: dict[str, int] = {}
    for unit, mentions, normal, images in zip(scan.units, scan.unit_mentions, scan.unit_normal_spans,
                                              scan.unit_images):
        # The words as written (a typo the labeler corrected is accepted) and as the labeler read them.
        spans = [(m.key, m.text) for m in mentions] + [(NORMAL_KEY, unit[a:b]) for a, b in normal]
        spans += [(m.key, _whole_words(unit, a, b)) for m, (a, b) in zip(mentions, original_spans(unit, mentions))]
        for key, text in spans:
            for word in _WORD.findall(text):
                term_keys.setdefault(word, set()).add(key)
                term_images[word] = term_images.get(word, 0) + int(images)
    word_images: dict[str, int] = {}
    word_sentences: dict[str, int] = {}
    example: dict[str, str] = {}
    for unit, images in zip(scan.units, scan.unit_images):
        for word in set(_WORD.findall(unit)):
            if len(word) >= min_length and word not in term_keys:
                word_images[word] = word_images.get(word, 0) + int(images)
                word_sentences[word] = word_sentences.get(word, 0) + 1
                example.setdefault(word, unit)
    columns = ["word", "images", "sentences", "term", "distance", "keys", "example"]
    if not word_images or not term_keys or max_distance < 1:
        return pd.DataFrame(columns=columns)
    # The most frequent term first, so that among equally close terms the common one is named.
    terms = sorted(term_keys, key=lambda term: (-term_images[term], term))
    words = sorted(word_images)
    found = []
    for start in range(0, len(words), 2000):  # chunks keep the distance matrix small on a large archive
        chunk = words[start:start + 2000]
        distances = cdist(chunk, terms, scorer=OSA.distance, score_cutoff=max_distance, dtype=np.int32)
        best = distances.argmin(axis=1)
        for word, column, row in zip(chunk, best, distances):
            distance = int(row[column])
            if 0 < distance <= allowed_distance(word, max_distance):
                term = terms[column]
                found.append({"word": word, "images": word_images[word], "sentences": word_sentences[word],
                              "term": term, "distance": distance, "keys": ";".join(sorted(term_keys[term])),
                              "example": example[word]})
    table = pd.DataFrame(found, columns=columns)
    table = table.sort_values(["images", "word"], ascending=[False, True], kind="stable")
    return table.head(top).reset_index(drop=True)


# --- audit sheets --------------------------------------------------------------------------------------------

def original_spans(unit: str, mentions: list[Mention]) -> list[tuple[int, int]]:
    """Each mention's span in ``unit``, the sentence as it was cut from the note. The labeler may read a sentence
    with abbreviations expanded and typos corrected (``Mention.unit``); its offsets are then carried back through an
    alignment of the two texts, so that a corrected word counts as inside the span."""
    spans, opcodes = [], {}
    for mention in mentions:
        if mention.unit == unit:
            spans.append((mention.start, mention.end))
            continue
        if mention.unit not in opcodes:
            opcodes[mention.unit] = SequenceMatcher(None, unit, mention.unit, autojunk=False).get_opcodes()
        spans.append(_carry_back(opcodes[mention.unit], mention.start, mention.end))
    return spans


def _carry_back(opcodes, start: int, end: int) -> tuple[int, int]:
    """A span of the second text of an alignment, in the first text's offsets (an edited stretch counts whole)."""
    new_start, new_end = None, None
    for tag, i1, i2, j1, j2 in opcodes:
        if new_start is None and (j1 <= start < j2 or (start == j2 == j1)):
            new_start = i1 + (start - j1) if tag == "equal" else i1
        if j1 < end <= j2 or (end == j1 == j2):
            new_end = i1 + (end - j1) if tag == "equal" else i2
            break
    return (new_start if new_start is not None else 0), (new_end if new_end is not None else opcodes[-1][2])


def mark_mentions(note: str, key: str, vocab) -> str:
    """The note with each span where the labeler found ``key`` wrapped in [[ ]]: in the note's own letters when
    normalising kept its length (the usual case), else in the normalised text the labeler read."""
    normalised = normalise(note, vocab)
    text = note if len(normalised) == len(note) else normalised
    spans, cursor = [], 0
    for unit in split_units(normalised, vocab):
        position = normalised.find(unit, cursor)
        if position < 0:
            continue
        cursor = position + len(unit)
        mentions = [mention for mention in find_mentions(unit, vocab) if mention.key == key]
        spans += [(position + a, position + b) for a, b in original_spans(unit, mentions)]
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    for start, end in reversed(merged):
        text = f"{text[:start]}[[{text[start:end]}]]{text[end:]}"
    return text


def audit_sheets(scan: ArchiveScan, vocab, per_state: dict[str, int], seed: int) -> dict[str, pd.DataFrame]:
    """Per key, ``per_state[state]`` distinct notes drawn at random (seeded per key and state, so that adding a key
    changes no other sheet) from the notes whose strongest mention of the key has that state."""
    assessed = scan.assessed
    sheets = {}
    for column, key in enumerate(scan.keys):
        rows = []
        for state, wanted in per_state.items():
            if state not in STATES:
                raise CxrflowError(f"labels.audit_per_key: unknown state {state!r}; choose from {list(STATES)}")
            candidates = np.flatnonzero(assessed & (scan.note_states[:, column] == STATES[state]))
            rng = np.random.default_rng([seed, zlib.crc32(key.encode()), STATES[state]])
            picked = np.sort(rng.choice(candidates, size=min(int(wanted), len(candidates)), replace=False))
            for note_index in picked:
                note = str(scan.notes[note_index])
                mentions = [m for m in find_mentions(note, vocab) if m.key == key]
                rows.append({"key": key, "state": state, "images": int(scan.note_images[note_index]),
                             "note": mark_mentions(note, key, vocab),
                             "mentions": "; ".join(f"{m.text} ({STATE_OF_RANK[RANK.get(m.state, 0)]})"
                                                   for m in mentions),
                             "verdict": "", "comment": ""})
        sheets[key] = pd.DataFrame(rows, columns=SHEET_COLUMNS)
    return sheets


# --- verdicts and precision ----------------------------------------------------------------------------------

def wilson_interval(correct, judged, z: float = Z95):
    """Wilson score interval for a binomial proportion (Wilson 1927; Newcombe 1998, method 3), no continuity
    correction. Works on scalars and numpy arrays; an empty sample gives (nan, nan)."""
    k, n = np.asarray(correct, dtype=float), np.asarray(judged, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


def _separator(path: Path) -> str | None:
    """A spreadsheet in a Russian locale saves CSV with ';' between fields."""
    if path.suffix.lower() != ".csv":
        return None
    head = path.read_bytes()[:4096].split(b"\n", 1)[0]
    return ";" if head.count(b";") > head.count(b",") else ","


def read_verdicts(files, keys: list[str]) -> pd.DataFrame:
    """The judged rows of filled audit sheets (CSV, with ',' or ';', UTF-8 or Windows-1251, or Excel): one row
    per verdict, with the sheet's key and state. Blank verdicts are skipped; anything else is an error."""
    from cxrflow.ingest import read_table

    frames = []
    for path in map(Path, files):
        table = read_table(path, sep=_separator(path))
        table.columns = [str(column).strip().lstrip("\ufeff") for column in table.columns]
        missing = [column for column in ("key", "state", "verdict") if column not in table.columns]
        if missing:
            raise CxrflowError(f"{path}: missing column(s) {missing}; a filled audit sheet keeps the columns it was "
                               f"written with")
        for row, (key, state, verdict) in enumerate(zip(table["key"], table["state"], table["verdict"]), start=2):
            verdict = "" if pd.isna(verdict) else str(verdict).strip().lower()
            if not verdict:
                continue
            if verdict not in VERDICTS:
                raise CxrflowError(f"{path}: row {row}: verdict {verdict!r} is not one of {list(VERDICTS)} "
                                   f"(or blank for not judged)")
            if key not in keys:
                raise CxrflowError(f"{path}: row {row}: key {key!r} is not a canonical label key")
            if state not in STATES:
                raise CxrflowError(f"{path}: row {row}: state {state!r} is not one of {list(STATES)}")
            frames.append({"key": key, "state": state, "correct": VERDICTS[verdict]})
    return pd.DataFrame(frames, columns=["key", "state", "correct"])


def precision_table(verdicts: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per key and state with a verdict: judged, correct, the proportion correct and its Wilson 95% interval.
    On the affirmed rows that proportion is the key's precision (positive predictive value)."""
    columns = ["key", "state", "judged", "correct", "proportion_correct", "ci_low", "ci_high"]
    if verdicts.empty:
        return pd.DataFrame(columns=columns)
    counts = verdicts.groupby(["key", "state"], sort=False)["correct"].agg(judged="size", correct="sum").reset_index()
    counts["correct"] = counts["correct"].astype(int)
    low, high = wilson_interval(counts["correct"].to_numpy(), counts["judged"].to_numpy())
    counts["proportion_correct"] = (counts["correct"] / counts["judged"]).round(4)
    counts["ci_low"], counts["ci_high"] = np.round(low, 4), np.round(high, 4)
    order = {key: index for index, key in enumerate(keys)}
    counts = counts.sort_values(["key", "state"], key=lambda s: s.map(order) if s.name == "key" else -s.map(STATES))
    return counts[columns].reset_index(drop=True)
