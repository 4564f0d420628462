"""Normalizing demographic fields (sex, age, view, study date) to one spelling each. Anything that needs Python
per value runs once per *distinct* value and is spread back to the rows with `take`, so a two-million-row
archive costs about as much as its distinct values. A value written but not read is counted, never dropped
unnoticed."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxrflow.ingest.record import Report

SEX_VALUES = {
    "F": {"f", "female", "w", "woman", "ж", "жен", "женский", "женщина", "2"},
    "M": {"m", "male", "man", "м", "муж", "мужской", "мужчина", "1"},
}

# Written down as "not known": missing, but not an unrecognized value worth reporting.
UNKNOWN_VALUES = {"", "u", "o", "unknown", "other", "-", "?", "n/a", "na", "none", "нет данных", "неизвестно"}

VIEW_SYNONYMS = {
    "POSTEROANTERIOR": "PA", "ANTEROPOSTERIOR": "AP", "LATERAL": "LAT", "LL": "LAT", "RL": "LAT", "L": "LAT",
    "XTABLE LATERAL": "LAT", "LLAT": "LAT", "RLAT": "LAT",
}  # fmt: skip

# Tried in order when source.date_format is not given; day-first only with dots (the Russian way), so that
# 01/02/2020 is never guessed.
DATE_FORMATS = ("%Y-%m-%d", "%Y%m%d", "%d.%m.%Y", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%d.%m.%Y %H:%M",
                "%d.%m.%Y %H:%M:%S", "%Y.%m.%d")


def per_distinct(values: pd.Series, normalize) -> pd.Series:
    """Apply `normalize` (Series of distinct values -> Series of results) once per distinct value."""
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    result = normalize(pd.Series(uniques, dtype=values.dtype)).reset_index(drop=True)
    if not len(result):  # every value missing
        return pd.Series(pd.array([pd.NA] * len(values), dtype=result.dtype), index=values.index, name=values.name)
    return pd.Series(result.array.take(codes, allow_fill=True), index=values.index, name=values.name)


def count_unrecognized(raw: pd.Series, parsed: pd.Series, report: Report | None, name: str) -> pd.Series:
    """Count values that were written but could not be read, so that no field turns missing unnoticed."""
    if report is None:
        return parsed
    text = raw.astype("string").str.strip()
    bad = parsed.isna() & text.notna() & ~text.str.lower().isin(UNKNOWN_VALUES)
    if bad.any():
        counts = text[bad].value_counts()
        entry = report.unrecognized.setdefault(name, {"rows": 0, "examples": {}})
        entry["rows"] += int(counts.sum())
        entry["examples"].update({str(k): int(v) for k, v in counts.head(5).items()})
    return parsed


def normalize_sex(values: pd.Series, report: Report | None = None) -> pd.Series:
    def distinct(uniques: pd.Series) -> pd.Series:
        lowered = uniques.astype("string").str.strip().str.lower().str.rstrip(".")
        out = pd.Series(pd.NA, index=uniques.index, dtype="string")
        for code, spellings in SEX_VALUES.items():
            out = out.mask(lowered.isin(spellings), code)
        return count_unrecognized(uniques, out, report, "sex")

    return per_distinct(values.astype("string"), distinct)


def normalize_age(values: pd.Series, report: Report | None = None) -> pd.Series:
    """Ages in whole years from numbers or DICOM age strings ('065Y', '018M', '003W', '010D')."""

    def distinct(uniques: pd.Series) -> pd.Series:
        text = uniques.astype("string").str.strip().str.upper()
        parts = text.str.extract(r"^(\d+(?:[.,]\d+)?)\s*([YMWD]?)$")
        number = pd.to_numeric(parts[0].str.replace(",", "."), errors="coerce")
        divisor = parts[1].map({"": 1, "Y": 1, "M": 12, "W": 52, "D": 365}).astype("float")
        years = np.floor(number / divisor)
        years = years.where((years >= 0) & (years <= 130)).astype("Int16")
        return count_unrecognized(uniques, years, report, "age")

    return per_distinct(values.astype("string"), distinct)


def normalize_view(values: pd.Series, report: Report | None = None) -> pd.Series:
    def distinct(uniques: pd.Series) -> pd.Series:
        view = uniques.astype("string").str.strip().str.upper().str.replace(r"\s+", " ", regex=True)
        return view.replace(VIEW_SYNONYMS).replace("", pd.NA)

    return per_distinct(values.astype("string"), distinct)


def normalize_date(values: pd.Series, date_format: str | None = None, report: Report | None = None) -> pd.Series:
    """Study dates (day resolution). Without `date_format` a few unambiguous layouts are tried in turn."""

    def distinct(uniques: pd.Series) -> pd.Series:
        text = uniques.astype("string").str.strip()
        out = pd.Series(pd.NaT, index=uniques.index, dtype="datetime64[s]")
        for fmt in [date_format] if date_format else DATE_FORMATS:
            todo = out.isna() & text.notna()
            if not todo.any():
                break
            parsed = pd.to_datetime(text[todo].astype(object), format=fmt, errors="coerce")
            out[todo] = parsed.dt.floor("D").astype("datetime64[s]")
        return count_unrecognized(uniques, out, report, "study_date")

    return per_distinct(values.astype("string"), distinct)


def whole_years(values: pd.Series) -> pd.Series:
    """Numeric ages (possibly fractional or missing) as whole years in 0..130, else missing."""
    years = np.floor(pd.to_numeric(values, errors="coerce").astype("float64"))
    return years.where((years >= 0) & (years <= 130)).astype("Int16")


def stripped(values) -> pd.Series:
    return pd.Series(values, dtype="string").str.strip().replace("", pd.NA)


def missing_text(index) -> pd.Series:
    return pd.Series(pd.NA, index=index, dtype="string")
