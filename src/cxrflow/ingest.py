"""Ingest: one source (a free-text archive or a public dataset's table) -> one catalog row per image + a ledger.

Every source adapter returns the same frame: image_id, patient_id, sex, age, view, path, text, and one
1/0/missing column per canonical label key. What the adapters have in common (duplicate ids, missing files,
missing patients, sex conflicts, pseudonymization, the ledger) happens once, in `build_catalog`.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from cxrflow.errors import CxrflowError
from cxrflow.labels import label_texts, load_keys, load_vocabulary
from cxrflow.privacy import pseudonym_key, pseudonymize

CATALOG_COLUMNS = ["image_id", "patient_id", "sex", "age", "view", "path", "text"]
LEDGER_COLUMNS = ["stage", "item", "reason", "detail"]

SEX_VALUES = {
    "F": {"f", "female", "w", "woman", "ж", "жен", "женский", "женщина", "2"},
    "M": {"m", "male", "man", "м", "муж", "мужской", "мужчина", "1"},
}


@dataclass
class Ingested:
    catalog: pd.DataFrame
    ledger: pd.DataFrame
    summary: dict


def ledger_rows(items, reason: str, detail="", stage: str = "ingest") -> pd.DataFrame:
    items = pd.Series(items, dtype="string").reset_index(drop=True)
    detail = pd.Series(detail, index=items.index, dtype="string") if np.isscalar(detail) else pd.Series(detail, dtype="string").reset_index(drop=True)
    return pd.DataFrame({"stage": stage, "item": items, "reason": reason, "detail": detail}, columns=LEDGER_COLUMNS)


# --- reading tables -------------------------------------------------------------------------------------------

def detect_encoding(raw: bytes, path: Path) -> str:
    """UTF-8 (with or without BOM) or Windows-1251. Anything else is refused rather than read as mojibake."""
    if raw.startswith(b"\xef\xbb\xbf"):
        return "utf-8-sig"
    try:
        raw.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError as err:
        utf8_error = err
    text = raw.decode("cp1251", errors="replace")
    letters = [c for c in text if c.isalpha()]
    cyrillic = sum("\u0400" <= c <= "\u04ff" for c in letters)
    if letters and cyrillic / len(letters) > 0.3 and "\ufffd" not in text:
        return "cp1251"
    raise CxrflowError(
        f"{path}: text is neither UTF-8 (byte {utf8_error.start}: {utf8_error.reason}) nor Windows-1251 Russian; "
        "set source.encoding in the config"
    )


def read_table(path: str | Path, encoding: str = "auto", sep: str | None = None) -> pd.DataFrame:
    """Read a CSV, TSV (optionally gzipped) or Excel table as strings, with a clear error for every failure."""
    path = Path(path)
    if not path.is_file():
        raise CxrflowError(f"{path}: annotation table not found")
    suffixes = [s.lower() for s in path.suffixes]
    try:
        if suffixes and suffixes[-1] in {".xlsx", ".xls"}:
            table = pd.read_excel(path, dtype=str)
        else:
            raw = path.read_bytes()
            if suffixes and suffixes[-1] == ".gz":
                import gzip

                raw = gzip.decompress(raw)
                suffixes = suffixes[:-1]
            if not raw.strip():
                raise CxrflowError(f"{path}: the table is empty")
            if encoding == "auto":
                encoding = detect_encoding(raw, path)
            else:
                try:
                    raw.decode(encoding)
                except (UnicodeDecodeError, LookupError) as err:
                    raise CxrflowError(f"{path}: cannot decode as source.encoding={encoding!r}: {err}") from None
            if sep is None:
                sep = "\t" if suffixes and suffixes[-1] in {".tsv", ".tab"} else ","
            import io

            table = pd.read_csv(io.BytesIO(raw), sep=sep, dtype=str, encoding=encoding, keep_default_na=False,
                                na_values=[""], engine="c")
    except CxrflowError:
        raise
    except Exception as err:  # pandas raises many types for malformed tables
        raise CxrflowError(f"{path}: cannot read the table: {err}") from None
    if table.empty:
        raise CxrflowError(f"{path}: the table has a header but no rows")
    table.columns = [str(c).strip() for c in table.columns]
    return table


def require_columns(table: pd.DataFrame, columns, path) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise CxrflowError(f"{path}: missing required column(s) {missing}; the table has {list(table.columns)}")


# --- normalizing demographic fields -------------------------------------------------------------------------------

def normalize_sex(values: pd.Series) -> pd.Series:
    lowered = values.astype("string").str.strip().str.lower()
    out = pd.Series(pd.NA, index=values.index, dtype="string")
    for code, spellings in SEX_VALUES.items():
        out = out.mask(lowered.isin(spellings), code)
    return out


def normalize_age(values: pd.Series) -> pd.Series:
    """Ages in years from numbers or DICOM age strings ('065Y', '018M', '003W', '010D')."""
    text = values.astype("string").str.strip().str.upper()
    parts = text.str.extract(r"^(\d+(?:\.\d+)?)\s*([YMWD]?)$")
    number = pd.to_numeric(parts[0], errors="coerce")
    divisor = parts[1].map({"": 1, "Y": 1, "M": 12, "W": 52, "D": 365}).astype("float")
    years = np.floor(number / divisor)
    years = years.where((years >= 0) & (years <= 130))
    return years.astype("Int16")


def normalize_view(values: pd.Series) -> pd.Series:
    view = values.astype("string").str.strip().str.upper()
    return view.replace({"POSTEROANTERIOR": "PA", "ANTEROPOSTERIOR": "AP", "LATERAL": "LAT", "LL": "LAT", "RL": "LAT", "L": "LAT"})


# --- adapters ------------------------------------------------------------------------------------------------

def adapt_freetext(source: dict, keys: list[str], base: Path) -> pd.DataFrame:
    path = base / source["annotations"]
    table = read_table(path, source.get("encoding", "auto"), source.get("sep"))
    columns = source["columns"]
    required = [columns["image_id"], columns["text"]] + ([columns["file"]] if source.get("check_files", True) else [])
    require_columns(table, required, path)

    def column(name):
        mapped = columns.get(name)
        if mapped is None:
            return pd.Series(pd.NA, index=table.index, dtype="string")
        if mapped not in table.columns:
            raise CxrflowError(f"{path}: column {mapped!r} (source.columns.{name}) is not in the table; it has {list(table.columns)}")
        return table[mapped]

    frame = pd.DataFrame({
        "image_id": column("image_id").astype("string").str.strip(),
        "patient_id": column("patient_id").astype("string").str.strip(),
        "sex": normalize_sex(column("sex")),
        "age": normalize_age(column("age")),
        "view": normalize_view(column("view")),
        "path": column("file").astype("string"),
        "text": column("text").astype("string"),
    })
    vocab = load_vocabulary(base / source["vocabulary"], keys)
    labels = label_texts(frame["text"], vocab, keys, uncertain=source.get("uncertain", "missing"))
    return pd.concat([frame, labels], axis=1)


def native_label_matrix(label_lists: pd.Series, mapping: dict, keys: list[str], path) -> pd.DataFrame:
    """Map lists of a dataset's native labels onto canonical keys: 1 if any mapped label is present, 0 if the
    dataset covers the key but the image lacks it, missing if the dataset has no label for that key."""
    unknown = sorted(set(mapping.values()) - set(keys))
    if unknown:
        raise CxrflowError(f"{path}: label mapping points to unknown canonical key(s) {unknown}")
    codes, uniques = pd.factorize(label_lists.map(lambda labels: tuple(sorted(labels)) if isinstance(labels, (list, tuple)) else None))
    covered = set(mapping.values())
    table = np.full((len(uniques), len(keys)), -1, dtype=np.int8)
    index = {k: i for i, k in enumerate(keys)}
    for k in covered:
        table[:, index[k]] = 0
    for row, labels in enumerate(uniques):
        if labels is None:
            table[row, :] = -1
            continue
        for label in labels:
            key = mapping.get(label)
            if key is not None:
                table[row, index[key]] = 1
    values = np.where(codes[:, None] >= 0, table[np.maximum(codes, 0)], -1)
    frame = pd.DataFrame(values, index=label_lists.index, columns=keys).astype("Int8")
    return frame.mask(frame == -1)


def load_mapping(source: dict, base: Path) -> dict:
    path = base / source["label_map"]
    if not path.is_file():
        raise CxrflowError(f"source.label_map: no such file: {path}")
    mapping = yaml.safe_load(path.read_text(encoding="utf-8")).get("labels") or {}
    return {str(native).strip(): key for native, key in mapping.items() if key}


def adapt_nih(source: dict, keys: list[str], base: Path) -> pd.DataFrame:
    path = base / source["annotations"]
    table = read_table(path)
    require_columns(table, ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position"], path)
    mapping = load_mapping(source, base)
    labels = table["Finding Labels"].str.split("|").map(lambda ls: [] if ls == ["No Finding"] else ls)
    frame = pd.DataFrame({
        "image_id": table["Image Index"].astype("string"),
        "patient_id": table["Patient ID"].astype("string"),
        "sex": normalize_sex(table["Patient Gender"]),
        "age": normalize_age(table["Patient Age"]),
        "view": normalize_view(table["View Position"]),
        "path": table["Image Index"].astype("string"),
        "text": table["Finding Labels"].astype("string"),
    })
    return pd.concat([frame, native_label_matrix(labels, mapping, keys, path)], axis=1)


def parse_padchest_labels(value):
    """PadChest writes labels as a Python list literal with stray spaces; None when it cannot be parsed."""
    if not isinstance(value, str):
        return None
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(parsed, list):
        return None
    return [str(label).strip() for label in parsed if str(label).strip()]


def adapt_padchest(source: dict, keys: list[str], base: Path) -> pd.DataFrame:
    path = base / source["annotations"]
    table = read_table(path)
    require_columns(table, ["ImageID", "PatientID", "PatientSex_DICOM", "Projection", "Labels"], path)
    mapping = load_mapping(source, base)
    codes, uniques = pd.factorize(table["Labels"])
    parsed = [parse_padchest_labels(u) for u in uniques]
    labels = pd.Series([parsed[c] if c >= 0 else None for c in codes], index=table.index, dtype=object)
    birth = pd.to_numeric(table.get("PatientBirth"), errors="coerce")
    study_year = pd.to_numeric(table.get("StudyDate_DICOM", pd.Series(index=table.index, dtype=str)).str[:4], errors="coerce")
    image_dir = table["ImageDir"].astype("string") + "/" if "ImageDir" in table.columns else ""
    frame = pd.DataFrame({
        "image_id": table["ImageID"].astype("string"),
        "patient_id": table["PatientID"].astype("string"),
        "sex": normalize_sex(table["PatientSex_DICOM"]),
        "age": normalize_age((study_year - birth).astype("string")),
        "view": normalize_view(table["Projection"]),
        "path": (image_dir + table["ImageID"]).astype("string"),
        "text": table["Report"].astype("string") if "Report" in table.columns else pd.Series(pd.NA, index=table.index, dtype="string"),
    })
    frame["_unparseable_labels"] = labels.isna() & table["Labels"].notna() | table["Labels"].isna()
    return pd.concat([frame, native_label_matrix(labels, mapping, keys, path)], axis=1)


ADAPTERS = {"freetext": adapt_freetext, "nih": adapt_nih, "padchest": adapt_padchest}


# --- the shared part -------------------------------------------------------------------------------------------

def build_catalog(source: dict, keys_file: str | Path, base: str | Path = ".", privacy: dict | None = None) -> Ingested:
    """Run the configured adapter, then apply the rules every source shares, counting every row left out."""
    base = Path(base)
    fmt = source.get("format")
    if fmt not in ADAPTERS:
        raise CxrflowError(f"source.format: unknown format {fmt!r}; choose one of {sorted(ADAPTERS)}")
    keys = load_keys(base / keys_file)
    frame = ADAPTERS[fmt](source, keys, base).reset_index(drop=True)
    n_read = len(frame)
    ledgers = []

    def leave_out(mask: pd.Series, reason: str, detail=""):
        nonlocal frame
        mask = mask.fillna(False).astype(bool)
        if mask.any():
            d = detail[mask] if isinstance(detail, pd.Series) else detail
            ledgers.append(ledger_rows(frame.loc[mask, "image_id"], reason, d))
            frame = frame.loc[~mask].reset_index(drop=True)

    row_numbers = pd.Series(frame.index + 2, index=frame.index).astype("string")  # +2: header line, 1-based rows
    frame["image_id"] = frame["image_id"].fillna("<row " + row_numbers + ">")
    leave_out(frame["image_id"].str.startswith("<row "), "no_image_id", "row " + row_numbers)
    if "_unparseable_labels" in frame.columns:
        leave_out(frame["_unparseable_labels"], "unparseable_labels")
        frame = frame.drop(columns="_unparseable_labels")
    leave_out(frame["image_id"].duplicated(keep="first"), "duplicate_image_id", "a previous row has this image id")
    leave_out(frame["patient_id"].isna() | (frame["patient_id"] == ""), "no_patient_id")

    if source.get("check_files", True):
        if not source.get("images"):
            raise CxrflowError("source.images: the image folder is required unless source.check_files is false")
        root = base / source["images"]
        frame["path"] = frame["path"].map(lambda p: str(root / p) if isinstance(p, str) and p else pd.NA).astype("string")
        exists = frame["path"].map(lambda p: isinstance(p, str) and Path(p).is_file())
        leave_out(~exists, "missing_file", frame["path"].fillna("no file named in the table"))

    conflict_policy = source.get("sex_conflict", "drop_patient")
    sexes = frame.dropna(subset=["sex"]).groupby("patient_id")["sex"].nunique()
    conflicted = frame["patient_id"].isin(sexes.index[sexes > 1])
    if conflicted.any():
        if conflict_policy == "drop_patient":
            leave_out(conflicted, "sex_conflict", "the patient's images disagree on sex")
        elif conflict_policy == "unknown":
            ledgers.append(ledger_rows(frame.loc[conflicted, "image_id"], "sex_conflict_flagged", "kept with sex set to missing"))
            frame.loc[conflicted, "sex"] = pd.NA

    privacy = privacy or {}
    frame["patient_id"] = pseudonymize(frame["patient_id"], pseudonym_key(privacy.get("demo_key", False)))
    ledger = pd.concat(ledgers, ignore_index=True) if ledgers else pd.DataFrame(columns=LEDGER_COLUMNS)
    # Sex-conflict flags keep their row, so they are not "left out".
    left_out = int((ledger["reason"] != "sex_conflict_flagged").sum())
    summary = {
        "format": fmt,
        "rows_read": n_read,
        "kept": len(frame),
        "left_out": left_out,
        "left_out_by_reason": ledger["reason"].value_counts().to_dict(),
        "patients": int(frame["patient_id"].nunique()),
        "positives_by_key": {k: int((frame[k] == 1).sum()) for k in keys},
    }
    if summary["kept"] + summary["left_out"] != n_read:
        raise AssertionError(f"ingest counts do not add up: {summary}")
    return Ingested(frame[CATALOG_COLUMNS + keys], ledger, summary)
