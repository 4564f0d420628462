"""Public datasets' native labels, mapped by a label map (config/labels/<dataset>.yaml, `LabelMap`) that
accounts for every native label: to a canonical key, to `normal` (the dataset's own "normal study" label), to
`other_finding`, to `ignore` (with the reason) or to `quality_tags`. A label the map does not name still counts
as `other_finding` and is named in the summary; `normal` is 1 only when no finding of the image contradicts it."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from cxrflow.errors import CxrflowError
from cxrflow.ingest.fields import count_unrecognized, per_distinct
from cxrflow.ingest.record import Report
from cxrflow.ingest.tables import require_columns
from cxrflow.io import YAML_LOADER
from cxrflow.labels import AFFIRMED, NEGATED, UNCERTAIN, UNMENTIONED
from cxrflow.table_checks import read_text_file

NORMAL_KEY = "normal"  # the source's own affirmation of a normal study (config/labels/keys.yaml)

OTHER_KEY = "other_finding"  # a native finding with no canonical key of its own: never normal, never a negative


@dataclass
class LabelMap:
    """A dataset's native labels, each accounted for once (config/labels/<dataset>.yaml):
    `labels` maps a native label to a canonical key (`normal` for the dataset's own "normal study" label,
    `other_finding` for a finding with no key of its own); `ignore` names labels that carry no finding, each with
    the reason; `quality_tags` names the dataset's own "leave this image out" tags, each with the reason (an image
    carrying one gets catalog column `quality_tag` = 1, which the cohorts' negative rule removes)."""

    path: Path
    labels: dict
    ignore: dict
    quality_tags: dict

    def accounts_for(self, native: str) -> bool:
        return native in self.labels or native in self.ignore or native in self.quality_tags

    def unaccounted(self, natives) -> list[str]:
        return sorted({str(n) for n in natives if not self.accounts_for(str(n))})


def _reasons(data: dict, section: str, path: Path) -> dict:
    """An `ignore:` or `quality_tags:` section: native label -> why (the reason is required)."""
    value = data.get(section) or {}
    if not isinstance(value, dict):
        raise CxrflowError(f"{path}: '{section}:' must map each native label to the reason, e.g. 'unchanged: a "
                           f"comparison with an earlier study, not a finding'")
    bare = [str(k) for k, why in value.items() if not isinstance(why, str) or not why.strip()]
    if bare:
        raise CxrflowError(f"{path}: {section}: {bare[0]!r} needs a reason (native label: why)")
    return {str(k).strip(): str(why) for k, why in value.items()}


def load_label_map(source: dict, base: Path, keys: list[str]) -> LabelMap:
    """The dataset's label map, from the YAML file that source.label_map names."""
    if not source.get("label_map"):
        raise CxrflowError(f"source.label_map: required for source.format {source.get('format')}")
    path = base / source["label_map"]
    if not path.is_file():
        raise CxrflowError(f"source.label_map: no such file: {path}")
    try:
        data = yaml.load(read_text_file(path, "source.label_map"), Loader=YAML_LOADER) or {}
    except yaml.YAMLError as err:
        raise CxrflowError(f"{path}: not valid YAML: {err}") from None
    mapping = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(mapping, dict):
        raise CxrflowError(f"{path}: expected a mapping under 'labels:' (native label -> canonical key)")
    unknown_sections = sorted(set(data) - {"labels", "ignore", "quality_tags"})
    if unknown_sections:
        raise CxrflowError(f"{path}: unknown section(s) {unknown_sections}; a label map has labels, ignore and "
                           f"quality_tags")
    unmapped = [str(native) for native, key in mapping.items() if not key]
    if unmapped:
        raise CxrflowError(f"{path}: labels: {unmapped[0]!r} maps to nothing; map it to a key or to {OTHER_KEY}, "
                           f"or move it to 'ignore:' with the reason")
    mapping = {str(native).strip(): str(key) for native, key in mapping.items()}
    unknown = sorted(set(mapping.values()) - set(keys))
    if unknown:
        raise CxrflowError(f"{path}: label mapping points to unknown canonical key(s) {unknown}")
    label_map = LabelMap(path, mapping, _reasons(data, "ignore", path), _reasons(data, "quality_tags", path))
    sections = [set(label_map.labels), set(label_map.ignore), set(label_map.quality_tags)]
    twice = sorted((sections[0] & sections[1]) | (sections[0] & sections[2]) | (sections[1] & sections[2]))
    if twice:
        raise CxrflowError(f"{path}: {twice[0]!r} is in more than one of labels, ignore and quality_tags")
    return label_map


def refuse_quality_tags(label_map: LabelMap, fmt: str) -> None:
    if label_map.quality_tags:
        raise CxrflowError(f"{label_map.path}: quality_tags: source.format {fmt} has no quality tags to read "
                           f"(they are read from label lists: nih, padchest)")


def int8_columns(values: np.ndarray, missing: np.ndarray, codes: np.ndarray, keys, index) -> pd.DataFrame:
    """Spread a (distinct, key) table of values/missing flags to rows by `codes`, one Int8 column per key."""
    values, missing = values.T.copy(), missing.T.copy()  # contiguous per key: fast row gathers
    columns = {key: pd.arrays.IntegerArray(values[k][codes], missing[k][codes]) for k, key in enumerate(keys)}
    return pd.DataFrame(columns, index=index, columns=list(keys), copy=False)


def contradicted_normal(values: np.ndarray, missing: np.ndarray, keys: list[str]) -> np.ndarray:
    """Rows (of a distinct-rows table) whose normal affirmation a finding on the same image contradicts: any other
    key is 1. Their `normal` is set to 0 in place: the finding wins, and the image is not a normal study."""
    if NORMAL_KEY not in keys:
        return np.zeros(len(values), dtype=bool)
    normal = keys.index(NORMAL_KEY)
    finding = (values == 1) & ~missing
    finding[:, normal] = False
    contradicted = (values[:, normal] == 1) & ~missing[:, normal] & finding.any(axis=1)
    values[contradicted, normal] = 0
    return contradicted


def native_label_matrix(raw: pd.Series, parse, label_map: LabelMap, keys: list[str],
                        report: Report | None = None) -> tuple[pd.DataFrame, pd.Series, pd.Series]:
    """Labels from a column holding a list of native labels per row ("Cardiomegaly|Effusion", "['normal']").

    `parse` turns one distinct value into a list of labels (or None when it cannot). A key is 1 if a mapped
    label is present, 0 if the dataset covers the key but the row lacks it, missing if the dataset has no label
    for the key. A label the map does not account for counts as `other_finding` (and is named in the summary):
    an unknown finding must never make an image look normal. `normal` is 1 only when no other key is 1.
    Returns the label frame, a mask of rows whose value could not be parsed, and a mask of rows carrying one
    of the map's quality tags.
    """
    codes, uniques = pd.factorize(raw, use_na_sentinel=True)
    index = {k: i for i, k in enumerate(keys)}
    mapping = label_map.labels
    covered = sorted({index[k] for k in set(mapping.values())})
    values = np.zeros((len(uniques) + 1, len(keys)), dtype=np.int8)  # last row: a missing value
    missing = np.ones_like(values, dtype=bool)
    missing[:-1, covered] = False
    unparseable = np.zeros(len(uniques) + 1, dtype=bool)
    tagged = np.zeros(len(uniques) + 1, dtype=bool)
    unaccounted = defaultdict(list)  # label -> distinct rows
    for row, value in enumerate(uniques):
        labels = parse(value)
        if labels is None:
            unparseable[row] = True
            missing[row, :] = True
            continue
        for label in labels:
            key = mapping.get(label)
            if key is not None:
                values[row, index[key]] = 1
            elif label in label_map.quality_tags:
                tagged[row] = True
            elif label not in label_map.ignore:
                unaccounted[label].append(row)
                if OTHER_KEY in index:
                    values[row, index[OTHER_KEY]] = 1
    if unaccounted and OTHER_KEY in index:  # the source can say more than the map: other_finding is labelled
        missing[:-1, index[OTHER_KEY]] = unparseable[:-1]
    contradicted = contradicted_normal(values, missing, keys)
    if report is not None:
        rows_per_distinct = np.bincount(codes[codes >= 0], minlength=len(uniques) + 1)
        if unaccounted:
            report.facts["labels_not_in_label_map"] = {
                label: int(rows_per_distinct[rows].sum()) for label, rows in sorted(unaccounted.items())}
        if NORMAL_KEY in index:
            report.facts["normal_contradicted_by_a_finding"] = int(rows_per_distinct[contradicted].sum())
    frame = int8_columns(values, missing, codes, keys, raw.index)
    return frame, pd.Series(unparseable[codes], index=raw.index), pd.Series(tagged[codes], index=raw.index)


def column_label_matrix(table: pd.DataFrame, label_map: LabelMap, keys: list[str], source: dict, path,
                        report: Report, metadata_columns=()) -> tuple[pd.DataFrame, pd.Series]:
    """Labels from one column per native label holding 1 / 0 / -1 (uncertain) / blank (not mentioned), as
    CheXpert and MIMIC-CXR write them. Several native columns on one key: the strongest state wins, as in
    `cxrflow.labels` (affirmed > uncertain > negated > not mentioned). `normal` ("No Finding") is 1 only when no
    other key is 1. Also returns a short text per row naming the positive (and, with '?', the uncertain) native
    labels. Columns of the file that are neither `metadata_columns` nor accounted for by the map are named in
    the summary (labels_not_in_label_map)."""
    mapping = label_map.labels
    refuse_quality_tags(label_map, source.get("format"))
    require_columns(table, list(mapping), f"{path} (columns named in {source['label_map']})")
    in_file = table.attrs.get("columns_in_file", list(table.columns))
    unaccounted = [c for c in label_map.unaccounted(set(in_file) - set(metadata_columns)) if c in in_file]
    if unaccounted:
        report.facts["labels_not_in_label_map"] = unaccounted
    uncertain = source.get("uncertain", "missing")
    unmentioned = source.get("unmentioned", "negative")
    index = {k: i for i, k in enumerate(keys)}
    natives = list(mapping)
    native_states = np.zeros((len(table), len(natives)), dtype=np.uint8)
    state_of = {"1": AFFIRMED, "1.0": AFFIRMED, "-1": UNCERTAIN, "-1.0": UNCERTAIN, "0": NEGATED, "0.0": NEGATED}
    for j, native in enumerate(natives):
        def states(uniques, native=native):
            mapped = uniques.astype("string").str.strip().map(state_of)
            count_unrecognized(uniques, mapped, report, f"label {native!r}")
            return mapped.fillna(UNMENTIONED).astype("UInt8")

        native_states[:, j] = per_distinct(table[native], states).fillna(UNMENTIONED).to_numpy(dtype=np.uint8)
    key_states = np.zeros((len(table), len(keys)), dtype=np.uint8)
    for j, native in enumerate(natives):
        column = index[mapping[native]]
        np.maximum(key_states[:, column], native_states[:, j], out=key_states[:, column])
    # Code the few distinct state rows, then gather.
    distinct, codes = np.unique(key_states, axis=0, return_inverse=True)
    values = np.zeros(distinct.shape, dtype=np.int8)
    values[distinct == AFFIRMED] = 1
    values[distinct == UNCERTAIN] = 1 if uncertain == "positive" else 0
    missing = ((distinct == UNCERTAIN) & (uncertain == "missing")) | (
        (distinct == UNMENTIONED) & (unmentioned == "missing"))
    uncovered = [i for k, i in index.items() if k not in set(mapping.values())]
    missing[:, uncovered] = True
    contradicted = contradicted_normal(values, missing, keys)
    if NORMAL_KEY in index:
        rows = np.bincount(codes.ravel(), minlength=len(distinct))
        report.facts["normal_contradicted_by_a_finding"] = int(rows[contradicted].sum())
    labels = int8_columns(values, missing, codes.ravel(), keys, table.index)

    distinct_native, native_codes = np.unique(native_states, axis=0, return_inverse=True)
    names = []
    for row in distinct_native:
        parts = [n for n, s in zip(natives, row) if s == AFFIRMED]
        parts += [f"{n}?" for n, s in zip(natives, row) if s == UNCERTAIN]
        names.append("|".join(parts) if parts else "no finding")
    text = pd.Series(pd.array(names, dtype="string").take(native_codes.ravel()), index=table.index)
    return labels, text
