"""Ingest: one source (a free-text archive, a DICOM folder or a public dataset's tables) -> one catalog row per
image + a ledger of every input row that did not become one.

`source.format` picks one adapter per format. Every adapter returns the same frame: the columns of
`CATALOG_COLUMNS` (`quality_tag` may be left out: it is then 0) and one 1/0/missing column per canonical label
key, plus optionally `_reason`/`_detail` for rows the adapter itself has to refuse (a file that is not DICOM, a
PadChest label list that does not parse).

Public datasets' native labels are mapped by a label map (config/labels/<dataset>.yaml, `LabelMap`) that
accounts for every native label: to a canonical key, to `normal` (the dataset's own "normal study" label), to
`other_finding`, to `ignore` (with the reason) or to `quality_tags`. A label the map does not name still counts
as `other_finding` and is named in the summary; `normal` is 1 only when no finding of the image contradicts it.
What the adapters have in common (missing ids, duplicate ids, missing files, sex conflicts, pseudonymization,
the ledger, the counts) happens once, in `build_catalog`.

The summary's counts add up over images: rows_read = kept + left_out. The ledger also holds rows that are not
images left out, each under a reason of its own: images kept but flagged (sex_conflict_flagged) and input
rows that name no image of the source (annotation_without_image, duplicate_annotation, labels_without_image,
duplicate_label_row; an annotation row without image_id for VinDr). The summary counts them apart.

Every step works on whole columns. Anything that needs Python per value (parsing an age, a date, a label
list, a free-text note, hashing a patient id) runs once per *distinct* value and is spread back to the rows
with `take`, so a two-million-row archive costs about as much as its distinct values.
"""

from __future__ import annotations

import ast
import codecs
import functools
import io
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml


from cxrflow.archive import MIN_FOUND_FRACTION, check_paths, found_fraction_check, image_folder, list_archive
from cxrflow.errors import CxrflowError
from cxrflow.io import YAML_LOADER
from cxrflow.table_checks import (RecordLines, bom_codec, check_not_binary, leading_blank_lines, long_record_error,
                                  read_text_file, wide_text_as_utf8)
from cxrflow.labels import AFFIRMED, NEGATED, UNCERTAIN, UNMENTIONED, label_texts, load_keys, load_vocabulary
from cxrflow.privacy import pseudonymize, source_key

# quality_tag: 1 when the dataset itself tags the image to be left out (a label map's `quality_tags`, e.g.
# PadChest 'exclude', 'suboptimal study'); 0 otherwise, and for sources that have no such tags.
CATALOG_COLUMNS = ["image_id", "patient_id", "sex", "age", "view", "study_date", "path", "text", "quality_tag"]
LEDGER_COLUMNS = ["stage", "source", "item", "reason", "detail"]

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
# Three UTF-8 multi-byte characters in a row: text that a one-byte codec (cp1251, latin-1) would garble.
_UTF8_RUN = re.compile(rb"(?:[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}){3}")


@dataclass
class Ingested:
    catalog: pd.DataFrame
    ledger: pd.DataFrame
    summary: dict


@dataclass
class Report:
    """What an adapter tells `build_catalog` beyond the frame: input rows that are not images (so that they
    reach the ledger without counting as images left out), values it could not read, and plain facts. The one
    thing it brings the adapter is how many worker processes it may use."""

    source: str
    ledger: list = field(default_factory=list)
    unrecognized: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)
    line_numbers: RecordLines | None = None  # the table's record -> file line (frame row i is record i)
    workers: int = 1  # processes an adapter may use (the ingest rule's threads); only the DICOM folder reader does

    def unmatched(self, items, reason: str, detail="") -> None:
        self.ledger.append(ledger_rows(items, reason, detail, source=self.source))


def ledger_rows(items, reason, detail="", stage: str = "ingest", source: str = "") -> pd.DataFrame:
    items = pd.Series(items, dtype="string").reset_index(drop=True)

    def column(value):
        if isinstance(value, (pd.Series, np.ndarray, list)):
            return pd.Series(value, dtype="string").reset_index(drop=True)
        return pd.Series(value, index=items.index, dtype="string")

    return pd.DataFrame({"stage": stage, "source": source, "item": items, "reason": column(reason),
                         "detail": column(detail)}, columns=LEDGER_COLUMNS)


# --- reading tables -------------------------------------------------------------------------------------------

def _line_of(raw: bytes, offset: int) -> int:
    return raw.count(b"\n", 0, offset) + 1


def _check_cp1251(raw: bytes, path: Path, utf8_error: UnicodeDecodeError) -> str:
    """Decode bytes that are not UTF-8 as Windows-1251, only when the result is plainly Russian text."""
    where = f"line {_line_of(raw, utf8_error.start)}, byte {utf8_error.start}"
    refuse = (f"{path}: text is neither UTF-8 ({where}: {utf8_error.reason}) nor Windows-1251 Russian; "
              "set source.encoding in the config")
    try:
        text = raw.decode("cp1251")
    except UnicodeDecodeError:
        raise CxrflowError(refuse) from None
    sample = text[:2_000_000]
    letters = len(re.findall(r"[^\W\d_]", sample))
    cyrillic = len(re.findall("[\u0400-\u04ff]", sample))
    if not letters or cyrillic / letters <= 0.3:
        raise CxrflowError(refuse)
    mixed = _UTF8_RUN.search(raw)
    if mixed:
        raise CxrflowError(
            f"{path}: the file mixes encodings: {where} is not UTF-8, but line {_line_of(raw, mixed.start())} is "
            f"UTF-8 text; reading either way would garble the other. Re-save the file in one encoding")
    return text


def _codec(encoding: str, path: Path) -> str:
    """The codec's canonical name ('utf8' -> 'utf-8'), or 'auto'."""
    if encoding == "auto":
        return encoding
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise CxrflowError(f"{path}: source.encoding={encoding!r} is not a known codec") from None


def _as_utf8(raw: bytes, path: Path, encoding: str) -> tuple[bytes, str]:
    """The table's bytes as UTF-8, and the encoding they were read from. Never returns mojibake silently."""
    codec = _codec(encoding, path)
    if raw.startswith(b"\xef\xbb\xbf"):
        if codec not in ("auto", "utf-8", "utf-8-sig"):
            raise CxrflowError(f"{path}: the file starts with a UTF-8 byte-order mark but source.encoding is "
                               f"{encoding!r}; set source.encoding: auto")
        return raw[3:], "utf-8-sig"
    if codec in ("auto", "utf-8", "utf-8-sig"):
        return raw, "utf-8"  # pyarrow validates UTF-8 as it parses
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as err:
        raise CxrflowError(f"{path}: cannot decode as source.encoding={encoding!r}: line {_line_of(raw, err.start)}: "
                           f"{err.reason}") from None
    utf8 = _UTF8_RUN.search(raw) if not codec.startswith("utf-") else None
    if utf8:
        raise CxrflowError(f"{path}: line {_line_of(raw, utf8.start())} is UTF-8 text, but source.encoding is "
                           f"{encoding!r}: reading it so would produce mojibake. Set source.encoding: auto")
    return text.encode("utf-8"), encoding


def _parse_csv(data, path: Path, sep: str, head: bytes, usecols=None) -> pd.DataFrame:
    """Parse UTF-8 CSV (bytes, or the file itself) into string columns, pd.NA for empty cells. pyarrow does this
    several times faster than pandas' own parser, validates UTF-8 as it goes, and every column stays text, so
    that '007' keeps its zeros."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    blank, offset = leading_blank_lines(head)
    if blank:  # blank lines before the header: parse from the header on (rare: the bytes come into memory)
        raw = data if isinstance(data, bytes) else _read_bytes(Path(data), Path(data).suffix.lower() == ".gz")
        data, head = raw[offset:], head[offset:]
    end = head.find(b"\n")
    header = pacsv.read_csv(io.BytesIO(head[: end if end >= 0 else len(head)] + b"\n"),
                            parse_options=pacsv.ParseOptions(delimiter=sep),
                            read_options=pacsv.ReadOptions(autogenerate_column_names=True)).to_pylist()
    names = [str(v).strip() for v in header[0].values()] if header else []
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise CxrflowError(f"{path}: column name(s) {duplicated} appear more than once in the header")
    bad_rows = []

    def remember(row):
        bad_rows.append(row)
        return "error"

    try:
        table = pacsv.read_csv(
            io.BytesIO(data) if isinstance(data, bytes) else str(data),  # a path: pyarrow decompresses .gz itself
            # Threads pay off only on large tables; on small ones they cost more CPU than they save.
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1, block_size=16 << 20,
                                           use_threads=_size(data) > 64 << 20),
            parse_options=pacsv.ParseOptions(delimiter=sep, newlines_in_values=True, invalid_row_handler=remember),
            # large_string: 64-bit offsets, so that a column of notes may pass 2 GB and still be one chunk.
            convert_options=pacsv.ConvertOptions(column_types={n: pa.large_string() for n in names}, null_values=[""],
                                                 strings_can_be_null=True, quoted_strings_can_be_null=True,
                                                 include_columns=None if usecols is None else
                                                 [n for n in names if n in set(usecols)]))
    except pa.ArrowInvalid as err:
        message = str(err)
        if "invalid UTF8" in message:
            raise _Utf8Error from None
        if bad_rows:
            row = bad_rows[0]
            raw = data if isinstance(data, bytes) else _read_bytes(Path(data), Path(data).suffix.lower() == ".gz")
            offset = raw.find(row.text.encode("utf-8")) if row.text else -1
            line = f"line {_line_of(raw, offset) + blank}" if offset >= 0 else "a row"
            raise CxrflowError(f"{path}: {line} has {row.actual_columns} fields, the header has "
                               f"{row.expected_columns}: {row.text[:120]!r}") from None
        if "straddl" in message:  # one record is longer than a block: name it rather than pyarrow's block
            raw = data if isinstance(data, bytes) else _read_bytes(Path(data), Path(data).suffix.lower() == ".gz")
            raise long_record_error(raw.decode("utf-8", errors="replace"), path, sep, 16 << 20, blank) from None
        raise CxrflowError(f"{path}: cannot read the table: {message}") from None
    # One chunk per column: pandas filters, takes and factorizes a chunked column several times slower.
    table = table.combine_chunks()
    frame = table.to_pandas(types_mapper={pa.large_string(): pd.StringDtype("pyarrow")}.get)
    frame.attrs["columns_in_file"] = names
    frame.attrs["header_line"] = 1 + blank
    return frame


def _size(data) -> int:
    """Bytes of text to parse: a gzipped file counts about five times its size."""
    if isinstance(data, bytes):
        return len(data)
    size = Path(data).stat().st_size
    return 5 * size if str(data).lower().endswith(".gz") else size


class _Utf8Error(Exception):
    pass


def read_table(path: str | Path, encoding: str = "auto", sep: str | None = None, usecols=None) -> pd.DataFrame:
    """Read a CSV, TSV (optionally gzipped) or Excel table as string columns, with a clear error for every
    failure. Text is UTF-8 or Windows-1251 (detected), or the codec that source.encoding names. `usecols`
    (column names) skips converting the others; a name the table lacks is simply not there."""
    path = Path(path)
    if not path.is_file():
        raise CxrflowError(f"{path}: table not found")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in {".xlsx", ".xlsm", ".xls", ".ods"}:
        table = _read_excel(path)
        table.attrs["record_lines"] = RecordLines(None, "", "", 1, len(table))  # row i is sheet row i + 2
    else:
        gzipped = bool(suffixes) and suffixes[-1] == ".gz"
        if gzipped:
            suffixes = suffixes[:-1]
        if sep is None:
            sep = "\t" if suffixes and suffixes[-1] in {".tsv", ".tab"} else ","
        codec = _codec(encoding, path)
        if codec not in ("auto", "utf-8"):
            raw = _read_bytes(path, gzipped)
            check_not_binary(raw[:65536], path, codec)
            wide = wide_text_as_utf8(raw, path, encoding)
            data, codec = (wide, bom_codec(raw[:4])) if wide is not None else _as_utf8(raw, path, encoding)
            head = data[: 1 << 20]
        else:
            # UTF-8 (or so we hope): pyarrow reads and decompresses the file itself, in step with parsing, and
            # checks the UTF-8 on the way; only a failure brings the bytes into Python.
            import gzip
            import zlib

            try:
                with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as fp:
                    head = fp.read(1 << 20)
            except (OSError, EOFError, zlib.error) as err:
                raise CxrflowError(f"{path}: not a readable gzip file: {err}") from None
            if not head.strip() and len(head) < 1 << 20:
                raise CxrflowError(f"{path}: the table is empty")
            check_not_binary(head, path)
            data, raw = path, None
            if bom_codec(head[:4]) in ("utf-16", "utf-32"):  # as the byte-order mark says, whatever the name
                raw = _read_bytes(path, gzipped)
                data, codec = wide_text_as_utf8(raw, path, encoding), bom_codec(raw[:4])
                head, raw = data[: 1 << 20], None
        try:
            table = _parse_csv(data, path, sep, head, usecols)
        except _Utf8Error:
            raw = raw if raw is not None else _read_bytes(path, gzipped)
            try:
                raw.decode("utf-8")
                raise CxrflowError(f"{path}: pyarrow refused the text as UTF-8; set source.encoding")
            except UnicodeDecodeError as err:
                if encoding != "auto":
                    raise CxrflowError(f"{path}: cannot decode as UTF-8 (line {_line_of(raw, err.start)}: "
                                       f"{err.reason}); set source.encoding") from None
                text = _check_cp1251(raw, path, err)
            del raw, data
            data = text.encode("utf-8")
            del text
            codec = "cp1251"
            table = _parse_csv(data, path, sep, data[: 1 << 20], usecols)
    if table.empty:
        raise CxrflowError(f"{path}: the table has a header but no rows")
    if "header_line" in table.attrs:  # a text table (an Excel sheet's rows are its records)
        table.attrs["record_lines"] = RecordLines(path, codec, sep, table.attrs.pop("header_line"), len(table))
    table.columns = [str(c).strip() for c in table.columns]
    in_file = table.attrs.get("columns_in_file") or list(table.columns)
    if usecols is not None:
        table = table[[c for c in table.columns if c in set(usecols)]]
    table.attrs["columns_in_file"] = in_file  # for error messages: what the file has, not what was read
    return table


def record_lines(table: pd.DataFrame, positions) -> pd.Series:
    """'line N' (the file's line) of each record position of a table that read_table returned."""
    positions = np.asarray(positions, dtype=np.int64)
    lines = table.attrs.get("record_lines")
    numbers = lines.of(positions) if lines is not None else positions + 2
    return "line " + pd.Series(numbers, dtype="int64").astype(str)


def _read_bytes(path: Path, gzipped: bool) -> bytes:
    raw = path.read_bytes()
    if gzipped:
        import gzip
        import zlib

        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise CxrflowError(f"{path}: not a readable gzip file: {err}") from None
    if not raw or raw.isspace():
        raise CxrflowError(f"{path}: the table is empty")
    return raw


def _read_excel(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_excel(path, dtype=str)
    except ImportError as err:
        raise CxrflowError(f"{path}: reading this spreadsheet needs a package that is not installed: {err}") from None
    except Exception as err:  # noqa: BLE001 - openpyxl/xlrd raise many types for a damaged file
        raise CxrflowError(f"{path}: cannot read the spreadsheet: {type(err).__name__}: {err}") from None
    if table.columns.empty:
        raise CxrflowError(f"{path}: the table is empty")
    names = [str(c).strip() for c in table.columns]
    # pandas renames a repeated header "note" to "note.1".
    stems = {name: name.rsplit(".", 1)[0] for name in names if re.fullmatch(r".+\.\d+", name)}
    duplicated = sorted({stem for stem in stems.values() if stem in names})
    if duplicated:
        raise CxrflowError(f"{path}: column name(s) {duplicated} appear more than once in the header")
    return table.astype("string")


def require_columns(table: pd.DataFrame, columns, path) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise CxrflowError(f"{path}: missing required column(s) {missing}; the table has "
                           f"{table.attrs.get('columns_in_file', list(table.columns))}")


def require_keys(source: dict, names, fmt: str) -> None:
    missing = [n for n in names if not source.get(n)]
    if missing:
        raise CxrflowError(f"source.{missing[0]}: required for source.format {fmt}")


# --- normalizing demographic fields, once per distinct value ----------------------------------------------------

def per_distinct(values: pd.Series, normalize) -> pd.Series:
    """Apply `normalize` (Series of distinct values -> Series of results) once per distinct value."""
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    result = normalize(pd.Series(uniques, dtype=values.dtype)).reset_index(drop=True)
    if not len(result):  # every value missing
        return pd.Series(pd.array([pd.NA] * len(values), dtype=result.dtype), index=values.index, name=values.name)
    return pd.Series(result.array.take(codes, allow_fill=True), index=values.index, name=values.name)


def _unrecognized(raw: pd.Series, parsed: pd.Series, report: Report | None, name: str) -> pd.Series:
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
        return _unrecognized(uniques, out, report, "sex")

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
        return _unrecognized(uniques, years, report, "age")

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
        return _unrecognized(uniques, out, report, "study_date")

    return per_distinct(values.astype("string"), distinct)


def whole_years(values: pd.Series) -> pd.Series:
    """Numeric ages (possibly fractional or missing) as whole years in 0..130, else missing."""
    years = np.floor(pd.to_numeric(values, errors="coerce").astype("float64"))
    return years.where((years >= 0) & (years <= 130)).astype("Int16")


def _strings(values) -> pd.Series:
    return pd.Series(values, dtype="string").str.strip().replace("", pd.NA)


def _missing(index) -> pd.Series:
    return pd.Series(pd.NA, index=index, dtype="string")


# --- labels from native label sets ------------------------------------------------------------------------------

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


def _no_quality_tags(label_map: LabelMap, fmt: str) -> None:
    if label_map.quality_tags:
        raise CxrflowError(f"{label_map.path}: quality_tags: source.format {fmt} has no quality tags to read "
                           f"(they are read from label lists: nih, padchest)")


def _int8_columns(values: np.ndarray, missing: np.ndarray, codes: np.ndarray, keys, index) -> pd.DataFrame:
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
    frame = _int8_columns(values, missing, codes, keys, raw.index)
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
    _no_quality_tags(label_map, source.get("format"))
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
            _unrecognized(uniques, mapped, report, f"label {native!r}")
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
    labels = _int8_columns(values, missing, codes.ravel(), keys, table.index)

    distinct_native, native_codes = np.unique(native_states, axis=0, return_inverse=True)
    names = []
    for row in distinct_native:
        parts = [n for n, s in zip(natives, row) if s == AFFIRMED]
        parts += [f"{n}?" for n, s in zip(natives, row) if s == UNCERTAIN]
        names.append("|".join(parts) if parts else "no finding")
    text = pd.Series(pd.array(names, dtype="string").take(native_codes.ravel()), index=table.index)
    return labels, text


# --- adapters: one per source.format, each returning CATALOG_COLUMNS + one column per key ----------------------

def adapt_freetext(source: dict, keys: list[str], base: Path, report: Report) -> pd.DataFrame:
    """A table with one row per image and a free-text annotation, labelled by a vocabulary (config/labels/ru.yaml)."""
    require_keys(source, ["annotations", "columns", "vocabulary"], "freetext")
    path = base / source["annotations"]
    report.source = str(path)
    read_text_file(base / source["vocabulary"], "source.vocabulary")  # unreadable: one line, not a traceback
    vocab = load_vocabulary(base / source["vocabulary"], keys)  # before the table: a config error comes first
    columns = source["columns"]
    for name in ("image_id", "text"):
        if not columns.get(name):
            raise CxrflowError(f"source.columns.{name}: required for source.format freetext")
    required = [columns["image_id"], columns["text"]]
    if source.get("check_files", True):
        if not columns.get("file"):
            raise CxrflowError("source.columns.file: required unless source.check_files is false")
        required.append(columns["file"])
    table = read_table(path, source.get("encoding", "auto"), source.get("sep"),
                       usecols=[c for c in columns.values() if c])
    report.line_numbers = table.attrs.get("record_lines")
    require_columns(table, required, path)

    def column(name):
        mapped = columns.get(name)
        if mapped is None:
            return _missing(table.index)
        if mapped not in table.columns:
            optional = ("" if name in ("image_id", "text", "file")
                        else f"; set source.columns.{name}: null if it has none")
            raise CxrflowError(f"{path}: column {mapped!r} (source.columns.{name}) is not in the table; "
                               f"it has {table.attrs.get('columns_in_file', list(table.columns))}{optional}")
        return table[mapped]

    image_id = _strings(column("image_id"))
    if columns.get("patient_id"):
        patient_id = _strings(column("patient_id"))
    else:
        patient_id = image_id  # no patient column: each image is its own patient, and the summary says so
        report.facts["patient_id"] = "not given: each image counts as its own patient"
    frame = pd.DataFrame({
        "image_id": image_id,
        "patient_id": patient_id,
        "sex": normalize_sex(column("sex"), report),
        "age": normalize_age(column("age"), report),
        "view": normalize_view(column("view"), report),
        "study_date": normalize_date(column("date"), source.get("date_format"), report),
        "path": _strings(column("file")),
        "text": column("text").astype("string"),
    })
    del table
    labels = label_texts(frame["text"], vocab, keys, uncertain=source.get("uncertain", "missing"))
    return pd.concat([frame, labels], axis=1)


def adapt_dicom(source: dict, keys: list[str], base: Path, report: Report) -> pd.DataFrame:
    """A folder of DICOM files (searched recursively) and no table: id, sex, age, view and date come from the
    tags, read without pixel data. An optional side table (source.annotations) brings the free text, joined
    on the SOPInstanceUID or the file name stem (source.join_on)."""
    require_keys(source, ["images"], "dicom")
    root = base / source["images"]
    report.source = str(root)
    if not root.is_dir():
        raise CxrflowError(f"source.images: no such folder: {root}")
    join_on = source.get("join_on", "sop_instance_uid")
    vocab = None
    if source.get("annotations"):
        require_keys(source, ["vocabulary"], "dicom with source.annotations")
        read_text_file(base / source["vocabulary"], "source.vocabulary")
        vocab = load_vocabulary(base / source["vocabulary"], keys)
    entries = list_archive(root)  # links are judged by where they lead; one bad entry costs only its row
    files = [root / name for name, reason, _ in entries if not reason]
    if not entries:
        raise CxrflowError(f"source.images: {root} holds no files")
    rows = _read_headers(files, root, report.workers)
    rows += [[None, Path(name).stem, None, None, None, None, None, name, reason, detail]
             for name, reason, detail in entries if reason]
    frame = pd.DataFrame(rows, columns=["image_id", "stem", "patient_id", "sex", "age", "view", "study_date", "path",
                                        "_reason", "_detail"])
    if join_on == "file_stem":
        frame["image_id"] = frame["stem"]
    elif join_on != "sop_instance_uid":
        raise CxrflowError(f"source.join_on: {join_on!r} is not one of ['sop_instance_uid', 'file_stem']")
    no_uid = frame["image_id"].isna() & frame["_reason"].isna()
    frame.loc[no_uid, ["_reason", "_detail"]] = ["no_image_id", "the header has no SOPInstanceUID"]
    # A file left out is named by its path, so that the ledger points at it.
    frame["image_id"] = frame["image_id"].where(frame["_reason"].isna(), frame["path"])
    frame = frame.drop(columns="stem")
    for name in ("image_id", "patient_id", "sex", "view", "path", "_reason", "_detail"):
        frame[name] = _strings(frame[name])
    frame["age"] = pd.array(frame["age"], dtype="Int16")
    frame["study_date"] = normalize_date(frame["study_date"], "%Y%m%d", report)
    frame["view"] = normalize_view(frame["view"])
    report.facts["files"] = len(entries)

    text = _missing(frame.index)
    if vocab is not None:
        path = base / source["annotations"]
        table = read_table(path, source.get("encoding", "auto"), source.get("sep"))
        columns = source.get("columns") or {}
        id_column, text_column = columns.get("image_id", "image_id"), columns.get("text", "text")
        require_columns(table, [id_column, text_column], path)
        notes = pd.DataFrame({"id": _strings(table[id_column]), "text": table[text_column].astype("string")})
        notes["line"] = record_lines(table, notes.index).to_numpy()
        repeated = notes["id"].duplicated(keep="first") & notes["id"].notna()
        report.unmatched(notes.loc[repeated, "id"], "duplicate_annotation", notes.loc[repeated, "line"]
                         + ": an earlier line annotates this image")
        notes = notes[~repeated & notes["id"].notna()]
        orphan = ~notes["id"].isin(frame["image_id"])
        report.unmatched(notes.loc[orphan, "id"], "annotation_without_image",
                         notes.loc[orphan, "line"] + f": no DICOM file has this {join_on}")
        text = frame["image_id"].map(notes.set_index("id")["text"]).astype("string")
        report.facts["images_without_annotation"] = int(text.isna().sum())
    frame["text"] = text
    if vocab is not None:
        labels = label_texts(frame["text"], vocab, keys, uncertain=source.get("uncertain", "missing"))
    else:
        labels = pd.DataFrame({k: pd.array([pd.NA] * len(frame), dtype="Int8") for k in keys}, index=frame.index)
    return pd.concat([frame, labels], axis=1)


def _read_headers(files: list[Path], root: Path, workers: int) -> list[list]:
    """One catalog row per DICOM file, in the order of `files`. Header parsing is Python-bound, so a large folder
    is read by `workers` processes; a few hundred files are not worth their start-up."""
    if workers <= 1 or len(files) < 512:
        return [_dicom_row(path, root) for path in files]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(functools.partial(_dicom_row, root=root), files, chunksize=256))


def _dicom_row(path: Path, root: Path) -> list:
    from cxrflow.decode import DecodeError, read_dicom_header

    relative = path.relative_to(root).as_posix()
    try:
        meta = read_dicom_header(path)
    except DecodeError as err:
        return [None, path.stem, None, None, None, None, None, relative, err.reason, err.detail or str(err)]
    except Exception as err:  # noqa: BLE001 - a file that breaks pydicom belongs in the ledger
        return [None, path.stem, None, None, None, None, None, relative, "unreadable", f"{type(err).__name__}: {err}"]
    has_pixels = meta["has_pixel_data"]
    reason, detail = (None, None) if has_pixels else ("no_pixel_data", "the header holds no Pixel Data element")
    return [meta["sop_instance_uid"], path.stem, meta.get("patient_id"), meta.get("sex"), meta.get("age"),
            meta.get("view"), meta.get("study_date"), relative, reason, detail]


def adapt_nih(source: dict, keys: list[str], base: Path, report: Report) -> pd.DataFrame:
    """NIH ChestX-ray14 `Data_Entry_2017*.csv`: "Finding Labels" split on "|", "No Finding" meaning none."""
    require_keys(source, ["annotations"], "nih")
    path = base / source["annotations"]
    report.source = str(path)
    label_map = load_label_map(source, base, keys)
    table = read_table(path, usecols=["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender",
                                      "Patient Sex", "View Position"])
    report.line_numbers = table.attrs.get("record_lines")
    if "Patient Gender" not in table.columns and "Patient Sex" in table.columns:
        table = table.rename(columns={"Patient Sex": "Patient Gender"})  # the column's name in some releases
    require_columns(table, ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender",
                            "View Position"], path)
    labels, _, tagged = native_label_matrix(table["Finding Labels"], parse_nih_labels, label_map, keys, report)
    image_id = _strings(table["Image Index"])
    frame = pd.DataFrame({
        "image_id": image_id,
        "patient_id": _strings(table["Patient ID"]),
        "sex": normalize_sex(table["Patient Gender"], report),
        "age": normalize_age(table["Patient Age"], report),
        "view": normalize_view(table["View Position"], report),
        "study_date": pd.Series(pd.NaT, index=table.index, dtype="datetime64[s]"),  # NIH publishes no dates
        "path": image_id,
        "text": table["Finding Labels"].astype("string"),
        "quality_tag": _flag(tagged),
    })
    return pd.concat([frame, labels], axis=1)


def parse_nih_labels(value: str) -> list[str]:
    """"Cardiomegaly|Effusion" -> its labels; "No Finding" is a label too (the map sends it to `normal`)."""
    return [label.strip() for label in value.split("|") if label.strip()]


def _flag(mask: pd.Series) -> pd.Series:
    return pd.Series(mask.to_numpy(dtype=np.int8), index=mask.index, dtype="Int8")


def adapt_chexpert(source: dict, keys: list[str], base: Path, report: Report) -> pd.DataFrame:
    """CheXpert `train.csv` / `valid.csv`: one column per observation (1, 0, -1 uncertain, blank); the patient
    is the `patientNNNNN` part of `Path`; the view comes from "Frontal/Lateral" and "AP/PA"."""
    require_keys(source, ["annotations"], "chexpert")
    path = base / source["annotations"]
    report.source = str(path)
    label_map = load_label_map(source, base, keys)
    metadata = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]
    table = read_table(path, usecols=[*metadata, *label_map.labels])
    report.line_numbers = table.attrs.get("record_lines")
    require_columns(table, ["Path", "Sex", "Age", "Frontal/Lateral"], path)
    labels, text = column_label_matrix(table, label_map, keys, source, path, report, metadata)
    image_path = _strings(table["Path"])
    lateral = table["Frontal/Lateral"].str.strip().str.lower().eq("lateral").fillna(False)
    frontal_view = normalize_view(table["AP/PA"], report) if "AP/PA" in table.columns else _missing(table.index)
    frame = pd.DataFrame({
        "image_id": image_path,
        "patient_id": image_path.str.extract(r"(?:^|/)(patient\d+)(?:/|$)", expand=False).astype("string"),
        "sex": normalize_sex(table["Sex"], report),
        "age": normalize_age(table["Age"], report),
        "view": frontal_view.mask(lateral, "LAT"),
        "study_date": pd.Series(pd.NaT, index=table.index, dtype="datetime64[s]"),  # CheXpert publishes no dates
        "path": image_path,
        "text": text,
    })
    return pd.concat([frame, labels], axis=1)


def adapt_padchest(source: dict, keys: list[str], base: Path, report: Report) -> pd.DataFrame:
    """PadChest's label table: `Labels` is a Python-list string; the rows where it does not parse are ledgered."""
    require_keys(source, ["annotations"], "padchest")
    path = base / source["annotations"]
    report.source = str(path)
    label_map = load_label_map(source, base, keys)
    table = read_table(path, usecols=["ImageID", "ImageDir", "StudyDate_DICOM", "PatientID", "PatientBirth",
                                      "PatientSex_DICOM", "Projection", "Labels", "Report"])
    report.line_numbers = table.attrs.get("record_lines")
    require_columns(table, ["ImageID", "PatientID", "PatientSex_DICOM", "Projection", "Labels"], path)
    labels, unparseable, tagged = native_label_matrix(table["Labels"], parse_padchest_labels, label_map, keys, report)
    study_date = (normalize_date(table["StudyDate_DICOM"], "%Y%m%d", report) if "StudyDate_DICOM" in table.columns
                  else pd.Series(pd.NaT, index=table.index, dtype="datetime64[s]"))
    birth = pd.to_numeric(table["PatientBirth"], errors="coerce") if "PatientBirth" in table.columns else np.nan
    image_dir = table["ImageDir"].astype("string") + "/" if "ImageDir" in table.columns else ""
    image_id = _strings(table["ImageID"])
    frame = pd.DataFrame({
        "image_id": image_id,
        "patient_id": _strings(table["PatientID"]),
        "sex": normalize_sex(table["PatientSex_DICOM"], report),
        "age": whole_years(study_date.dt.year - birth),
        "view": normalize_view(table["Projection"], report),
        "study_date": study_date,
        "path": (image_dir + image_id).astype("string"),
        "text": table["Report"].astype("string") if "Report" in table.columns else _missing(table.index),
        "quality_tag": _flag(tagged),
    })
    frame["_reason"] = pd.Series(pd.NA, index=frame.index, dtype="string").mask(unparseable | table["Labels"].isna(),
                                                                                "unparseable_labels")
    frame["_detail"] = ("Labels = " + table["Labels"].fillna("(empty)").str.slice(0, 80)).where(
        frame["_reason"].notna())
    return pd.concat([frame, labels], axis=1)


_QUOTED_LIST = re.compile(r"\[\s*(?:'[^'\\]*'\s*(?:,\s*'[^'\\]*'\s*)*)?\]")
_QUOTED = re.compile(r"'([^'\\]*)'")


def parse_padchest_labels(value):
    """PadChest writes labels as a Python list literal with stray spaces; None when it cannot be parsed."""
    if not isinstance(value, str):
        return None
    if _QUOTED_LIST.fullmatch(value):  # the common, escape-free case: what literal_eval gives, 10x faster
        return [label.strip() for label in _QUOTED.findall(value) if label.strip()]
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None
    if not isinstance(parsed, list):
        return None
    return [str(label).strip() for label in parsed if str(label).strip()]


def adapt_vindr(source: dict, keys: list[str], base: Path, report: Report) -> pd.DataFrame:
    """VinDr-CXR: the box annotations (source.annotations: `image_id`, `rad_id`, `class_name`; one row per
    radiologist per box, or one "No finding" row: the Kaggle VinBigData table or PhysioNet's
    annotations_train.csv) and, when given, PhysioNet's image-level labels (source.labels:
    image_labels_train.csv, one row per image and radiologist, one 0/1 column per label, the global labels COPD,
    Lung tumor, Pneumonia, Tuberculosis and Other diseases included). Each radiologist's labels from both tables
    are one vote per key; source.combine turns an image's votes into its label: "any" radiologist, or a
    "majority" of those who read it. `normal` ("No finding") is 1 only when no finding won.

    A key is labelled only where the tables hold a class that maps to it: a class the box table never names,
    and that the image-level table has no column for, leaves its key missing for every image (the Kaggle table
    has no Emphysema, Rib fracture, Edema, Clavicle fracture or global labels)."""
    require_keys(source, ["annotations"], "vindr")
    path = base / source["annotations"]
    report.source = str(path)
    label_map = load_label_map(source, base, keys)
    _no_quality_tags(label_map, "vindr")
    combine = source.get("combine", "majority")
    if combine not in ("any", "majority"):
        raise CxrflowError(f"source.combine: {combine!r} is not one of ['any', 'majority']")
    table = read_table(path, source.get("encoding", "auto"), source.get("sep"))
    require_columns(table, ["image_id", "class_name"], path)
    image_id, reader = _vindr_ids(table, path, report)
    class_name = _strings(table["class_name"])[image_id.notna()]
    report.facts["annotation_rows"] = len(table)
    rows = pd.DataFrame({"image": image_id.dropna(), "reader": reader[image_id.notna()], "class": class_name})
    classes_held = set(class_name.dropna())
    if source.get("labels"):
        image_level, held = _vindr_image_labels(base / source["labels"], source, report)
        rows = pd.concat([rows, image_level], ignore_index=True)
        classes_held |= held

    image_codes, images = pd.factorize(rows["image"])
    reader_codes, _ = pd.factorize(rows["reader"])
    pairs = np.unique(np.stack([image_codes, reader_codes], axis=1), axis=0)
    n_readers = np.bincount(pairs[:, 0], minlength=len(images))
    key_index = {k: i for i, k in enumerate(keys)}
    mapping = label_map.labels
    unaccounted = label_map.unaccounted(classes_held)
    if unaccounted:  # an unknown class is a finding all the same: it must never make an image look normal
        counts = rows["class"][rows["class"].isin(unaccounted)].value_counts()
        report.facts["labels_not_in_label_map"] = {str(k): int(v) for k, v in counts.items()}
        mapping = mapping | dict.fromkeys(unaccounted, OTHER_KEY) if OTHER_KEY in key_index else mapping
    class_codes, classes = pd.factorize(rows["class"], use_na_sentinel=True)
    class_key = np.array([key_index[mapping[c]] if c in mapping else -1 for c in classes] + [-1], dtype=np.int64)
    row_key = class_key[class_codes]
    # One vote per (image, radiologist, key), however many boxes the radiologist drew.
    votes = np.unique(np.stack([image_codes, reader_codes, row_key], axis=1)[row_key >= 0], axis=0)
    counts = np.zeros((len(images), len(keys)), dtype=np.int32)
    np.add.at(counts, (votes[:, 0], votes[:, 2]), 1)
    positive = counts >= 1 if combine == "any" else 2 * counts > n_readers[:, None]
    values = positive.astype(np.int8)
    missing = np.ones_like(values, dtype=bool)
    missing[:, sorted({key_index[mapping[c]] for c in classes_held if c in mapping})] = False
    report.facts["normal_contradicted_by_a_finding"] = int(contradicted_normal(values, missing, keys).sum())
    labels = _int8_columns(values, missing, np.arange(len(images)), keys, pd.RangeIndex(len(images)))

    named = pd.DataFrame({"image": image_codes, "class": rows["class"].to_numpy()}).dropna().drop_duplicates()
    text = named.sort_values("class").groupby("image")["class"].agg("|".join)
    images = pd.Series(images, dtype="string")
    frame = pd.DataFrame({
        # VinDr-CXR publishes no patient ids: each image counts as its own patient.
        "image_id": images,
        "patient_id": images,
        # Neither table holds sex, age or view: missing unless the DICOM headers are read (check_files).
        "sex": _missing(images.index),
        "age": pd.array([pd.NA] * len(images), dtype="Int16"),
        "view": _missing(images.index),
        "study_date": pd.Series(pd.NaT, index=images.index, dtype="datetime64[s]"),
        "path": (images + ".dicom").astype("string"),
        "text": pd.Series(text.reindex(range(len(images))).to_numpy(), dtype="string"),
    })
    report.facts["patient_id"] = "VinDr-CXR has none: each image counts as its own patient"
    if source.get("check_files", True) and source.get("images"):
        _demographics_from_headers(frame, base / source["images"], report)
    return pd.concat([frame, labels], axis=1)


def _vindr_ids(table: pd.DataFrame, path: Path, report: Report) -> tuple[pd.Series, pd.Series]:
    """Image ids (rows without one go to the ledger) and reader ids (`rad_id` or `rad_ID`; absent: one reader)."""
    image_id = _strings(table["image_id"])
    no_id = image_id.isna()
    report.unmatched("<" + record_lines(table, table.index[no_id.to_numpy()]) + ">", "no_image_id",
                     f"a row of {path.name} without image_id")
    rad = next((c for c in table.columns if c.lower() == "rad_id"), None)
    reader = (_strings(table[rad]).fillna("consensus") if rad else
              pd.Series("consensus", index=table.index, dtype="string"))
    return image_id, reader


def _vindr_image_labels(path: Path, source: dict, report: Report) -> tuple[pd.DataFrame, set]:
    """PhysioNet's image_labels_train.csv as (image, reader, class) rows, one per label a reader marked 1, and
    the classes the table has columns for."""
    wide = read_table(path, source.get("encoding", "auto"), source.get("sep"))
    require_columns(wide, ["image_id"], path)
    image_id, reader = _vindr_ids(wide, path, report)
    known = image_id.notna()
    label_columns = [c for c in wide.columns if c != "image_id" and c.lower() != "rad_id"]
    parts = [pd.DataFrame({"image": image_id[known], "reader": reader[known],
                           "class": pd.Series(pd.NA, index=wide.index, dtype="string")[known]})]  # who read what
    for name in label_columns:
        def states(uniques, name=name):
            mapped = uniques.astype("string").str.strip().map({"1": 1, "1.0": 1, "0": 0, "0.0": 0}).astype("Int8")
            return _unrecognized(uniques, mapped, report, f"label {name!r} in {path.name}")

        marked = per_distinct(wide[name], states).eq(1).fillna(False).to_numpy(dtype=bool) & known.to_numpy()
        parts.append(pd.DataFrame({"image": image_id[marked], "reader": reader[marked],
                                   "class": pd.Series(name, index=wide.index, dtype="string")[marked]}))
    report.facts["image_label_rows"] = len(wide)
    return pd.concat(parts, ignore_index=True), set(label_columns)


def _demographics_from_headers(frame: pd.DataFrame, root: Path, report: Report) -> None:
    """Fill sex, age, view and date from the DICOM headers of the files that exist (tags only)."""
    from cxrflow.decode import DecodeError, read_dicom_header

    found = {"sex": [], "age": [], "view": [], "study_date": []}
    usable = check_paths(frame["path"], root)  # nothing outside source.images is opened, not even its header
    for path, ok in zip(usable.path, usable.ok):
        try:
            meta = read_dicom_header(path) if ok else {}
        except DecodeError:
            meta = {}  # a missing or broken file is the missing-file check's and the decoder's business
        for name in found:
            found[name].append(meta.get(name))
    frame["sex"] = _strings(found["sex"])
    frame["age"] = pd.array(found["age"], dtype="Int16")
    frame["view"] = normalize_view(pd.Series(found["view"], index=frame.index, dtype="string"))
    frame["study_date"] = normalize_date(pd.Series(found["study_date"], index=frame.index, dtype="string"), "%Y%m%d",
                                         report)
    report.facts["headers_read"] = int(frame["sex"].notna().sum())


def adapt_mimic(source: dict, keys: list[str], base: Path, report: Report) -> pd.DataFrame:
    """MIMIC-CXR-JPG: the metadata table (source.annotations: one row per image) joined with the CheXpert-style
    label table (source.labels: one row per study) on subject_id and study_id. MIMIC-CXR holds no sex or age;
    MIMIC-IV's patients table (source.patients: subject_id, gender, anchor_age, anchor_year) adds them."""
    require_keys(source, ["annotations", "labels"], "mimic")
    path, labels_path = base / source["annotations"], base / source["labels"]
    report.source = str(path)
    label_map = load_label_map(source, base, keys)
    table = read_table(path, usecols=["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate"])
    report.line_numbers = table.attrs.get("record_lines")
    require_columns(table, ["dicom_id", "subject_id", "study_id", "ViewPosition"], path)
    studies = read_table(labels_path, usecols=["subject_id", "study_id", *label_map.labels])
    columns_in_labels = studies.attrs["columns_in_file"]  # for the labels the map does not account for
    require_columns(studies, ["subject_id", "study_id"], labels_path)
    study_key = ["subject_id", "study_id"]
    for frame_ in (table, studies):
        for name in study_key:
            frame_[name] = _strings(frame_[name])
    repeated = studies.duplicated(study_key, keep="first")
    report.unmatched("s" + studies.loc[repeated, "study_id"], "duplicate_label_row",
                     record_lines(studies, studies.index[repeated]) + f" of {labels_path.name}")
    studies = studies[~repeated]
    imaged = pd.MultiIndex.from_frame(table[study_key])
    labelled = pd.MultiIndex.from_frame(studies[study_key])
    orphan = ~labelled.isin(imaged)
    report.unmatched("s" + studies.loc[orphan, "study_id"], "labels_without_image",
                     f"a row of {labels_path.name} whose study has no image in {path.name}")
    # Each image takes its study's row: a positional join through the study index.
    position = labelled.get_indexer(imaged)
    studies = studies.reset_index(drop=True)
    studies.attrs["columns_in_file"] = columns_in_labels
    study_labels, study_text = column_label_matrix(studies, label_map, keys, source, labels_path, report,
                                                   study_key)
    unlabelled = position < 0
    take = np.where(unlabelled, 0, position)
    labels = study_labels.iloc[take].reset_index(drop=True).set_axis(table.index)
    if unlabelled.any():
        labels.loc[unlabelled, :] = pd.NA
    report.facts["images_without_label_row"] = int(unlabelled.sum())
    text = pd.Series(study_text.array.take(take), index=table.index).mask(unlabelled, pd.NA)

    study_date = (normalize_date(table["StudyDate"], "%Y%m%d", report) if "StudyDate" in table.columns
                  else pd.Series(pd.NaT, index=table.index, dtype="datetime64[s]"))
    sex, age = _missing(table.index), pd.Series(pd.NA, index=table.index, dtype="Int16")
    if source.get("patients"):
        patients_path = base / source["patients"]
        patients = read_table(patients_path, usecols=["subject_id", "gender", "anchor_age", "anchor_year"])
        require_columns(patients, ["subject_id", "gender", "anchor_age", "anchor_year"], patients_path)
        patients = patients.assign(subject_id=_strings(patients["subject_id"])).drop_duplicates("subject_id")
        row = pd.Index(patients["subject_id"]).get_indexer(table["subject_id"])
        known = row >= 0
        report.facts["images_without_patient_row"] = int((~known).sum())
        pick = patients.iloc[np.where(known, row, 0)].reset_index(drop=True).set_axis(table.index)
        sex = normalize_sex(pick["gender"], report).mask(~known, pd.NA)
        anchor_age = pd.to_numeric(pick["anchor_age"], errors="coerce")
        anchor_year = pd.to_numeric(pick["anchor_year"], errors="coerce")
        # MIMIC shifts dates and anchor_year alike, so their difference is real time.
        age = whole_years((anchor_age + (study_date.dt.year - anchor_year).fillna(0)).where(known))
    subject, study = table["subject_id"], table["study_id"]
    frame = pd.DataFrame({
        "image_id": _strings(table["dicom_id"]),
        "patient_id": subject,
        "sex": sex,
        "age": age,
        "view": normalize_view(table["ViewPosition"], report),
        "study_date": study_date,
        "path": ("files/p" + subject.str.slice(0, 2) + "/p" + subject + "/s" + study + "/" + table["dicom_id"]
                 + ".jpg").astype("string"),
        "text": text.astype("string"),
    })
    return pd.concat([frame, labels], axis=1)


ADAPTERS = {
    "freetext": adapt_freetext,
    "dicom": adapt_dicom,
    "nih": adapt_nih,
    "chexpert": adapt_chexpert,
    "padchest": adapt_padchest,
    "vindr": adapt_vindr,
    "mimic": adapt_mimic,
}


# --- the shared part -------------------------------------------------------------------------------------------

def build_catalog(source: dict, keys_file: str | Path, base: str | Path = ".", workers: int = 1) -> Ingested:
    """Run the configured adapter, then apply the rules every source shares, counting every row left out."""
    base = Path(base)
    fmt = source.get("format")
    if fmt not in ADAPTERS:
        raise CxrflowError(f"source.format: unknown format {fmt!r}; choose one of {list(ADAPTERS)}")
    keys = load_keys(base / keys_file)
    key = source_key(source, base)  # the demo key only for the built-in synthetic archive; fail early without one
    report = Report(source=str(source.get("annotations") or source.get("images") or ""), workers=workers)
    frame = ADAPTERS[fmt](source, keys, base, report).reset_index(drop=True)
    n_read = len(frame)
    if n_read == 0:
        raise CxrflowError(f"{report.source}: the source holds no images")
    if "quality_tag" not in frame.columns:
        frame["quality_tag"] = pd.Series(0, index=frame.index, dtype="Int8")

    # Each rule marks rows; the frame is cut once at the end (cutting 40 columns of 2M rows costs seconds).
    keep = np.ones(n_read, dtype=bool)
    left_out = []  # (positions, reason(s), detail(s))

    def leave_out(mask, reason, detail=""):
        mask = np.asarray(mask, dtype=bool) & keep
        if mask.any():
            positions = np.flatnonzero(mask)
            pick = lambda v: v.iloc[positions].to_numpy() if isinstance(v, pd.Series) else v  # noqa: E731
            left_out.append((positions, pick(reason), pick(detail)))
            keep[positions] = False

    def row_label(positions):
        if report.line_numbers is not None:
            return "line " + pd.Series(report.line_numbers.of(positions), dtype="int64").astype(str)
        return "record " + pd.Series(positions + 1).astype(str)

    if "_reason" in frame.columns:
        reason = frame.pop("_reason")
        detail = frame.pop("_detail").fillna("")
        leave_out(reason.notna().to_numpy(), reason, detail)
    no_id = frame["image_id"].isna().to_numpy()
    if no_id.any():
        frame.loc[no_id, "image_id"] = ("<" + row_label(np.flatnonzero(no_id)) + ">").to_numpy()
        leave_out(no_id, "no_image_id")
    image_ids = frame["image_id"] if keep.all() else frame["image_id"].where(pd.Series(keep))
    leave_out(image_ids.duplicated(keep="first").to_numpy() & keep, "duplicate_image_id",
              "an earlier row has this image id")
    leave_out(frame["patient_id"].isna().to_numpy(), "no_patient_id")

    if source.get("check_files", True):
        root = image_folder(source, base)
        checked = check_paths(frame["path"].where(pd.Series(keep)), root)  # nothing is opened
        frame["path"] = checked.path
        found_fraction_check(checked, keep & frame["path"].notna().to_numpy(), root,
                             source.get("min_found_fraction", MIN_FOUND_FRACTION))
        leave_out(~checked.ok, pd.Series(checked.reason), pd.Series(checked.detail))

    flagged = []
    patient_codes, patients = pd.factorize(frame["patient_id"], use_na_sentinel=True)
    sex = frame["sex"]
    sex_codes = np.where(sex.eq("F").to_numpy(dtype=bool, na_value=False), 0,
                         np.where(sex.eq("M").to_numpy(dtype=bool, na_value=False), 1, -1))
    considered = keep & (patient_codes >= 0) & (sex_codes >= 0)
    sexes = np.zeros((len(patients) + 1, 2), dtype=bool)
    sexes[patient_codes[considered], sex_codes[considered]] = True
    conflicted = keep & (patient_codes >= 0) & sexes.all(axis=1)[patient_codes]
    if conflicted.any():
        policy = source.get("sex_conflict", "drop_patient")
        if policy == "drop_patient":
            leave_out(conflicted, "sex_conflict", "the patient's images disagree on sex")
        else:
            what = "kept with sex set to missing" if policy == "unknown" else "kept with sex as recorded"
            flagged.append(ledger_rows(frame["image_id"][conflicted],
                                       "sex_conflict_flagged", f"the patient's images disagree on sex; {what}",
                                       source=report.source))
            if policy == "unknown":
                frame.loc[conflicted, "sex"] = pd.NA

    ledger_parts = []
    for positions, reason, detail in left_out:
        detail = pd.Series([detail] * len(positions) if np.isscalar(detail) else detail, dtype="string").fillna("")
        detail = (row_label(positions) + ": " + detail).str.rstrip(": ")
        ledger_parts.append(ledger_rows(frame["image_id"].iloc[positions], reason, detail, source=report.source))
    n_left_out = int(sum(len(p) for p, _, _ in left_out))

    frame = _rows(frame[CATALOG_COLUMNS + keys], keep)
    kept_codes = patient_codes[keep]
    # Each distinct patient is hashed once, then spread to its images.
    hashed = pseudonymize(pd.Series(patients, dtype="string"), key).array
    frame["patient_id"] = pd.Series(hashed.take(kept_codes), index=frame.index)
    catalog = frame.astype(
        {"image_id": "string", "patient_id": "string", "sex": "string", "age": "Int16", "view": "string",
         "study_date": "datetime64[s]", "path": "string", "text": "string", "quality_tag": "Int8"}
        | dict.fromkeys(keys, "Int8"))
    parts = [p for p in ledger_parts + flagged + report.ledger if len(p)]
    ledger = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=LEDGER_COLUMNS, dtype="string")

    def counts(frames):
        if not frames:
            return {}
        return {str(k): int(v) for k, v in pd.concat([p["reason"] for p in frames]).value_counts().items()}

    summary = {
        "format": fmt,
        "source": report.source,
        "rows_read": n_read,
        "kept": len(catalog),
        "left_out": n_left_out,
        "left_out_by_reason": counts(ledger_parts),
        "flagged": counts(flagged),
        "other_input_rows_in_ledger": counts(report.ledger),
        "patients": int(np.count_nonzero(np.bincount(kept_codes[kept_codes >= 0], minlength=1))),
        "unrecognized_values": report.unrecognized,
        **report.facts,
        "quality_tagged": int(catalog["quality_tag"].eq(1).sum()),
        "positives_by_key": {k: int(catalog[k].eq(1).sum()) for k in keys},
    }
    if summary["kept"] + summary["left_out"] != n_read:
        raise AssertionError(f"ingest counts do not add up: {summary}")
    if summary["kept"] == 0:
        # Row numbers only: ids and paths may name patients, and this message goes to a shareable log.
        examples = ledger.drop_duplicates("reason").head(5)
        where = [str(r.detail).split(":")[0] if str(r.detail).startswith(("line ", "record ")) else "?"
                 for r in examples.itertuples()]
        raise CxrflowError(
            f"{report.source}: no image survived ingest ({n_read} read; left out by reason: "
            f"{summary['left_out_by_reason']}); first of each: "
            + "; ".join(f"{r.reason} at {w}" for r, w in zip(examples.itertuples(), where)))
    return Ingested(catalog, ledger, summary)


def _rows(frame: pd.DataFrame, keep: np.ndarray) -> pd.DataFrame:
    """frame[keep], column by column: Arrow-backed text through pyarrow's filter, the rest through numpy."""
    if keep.all():
        return frame.reset_index(drop=True)
    import pyarrow as pa

    mask = pa.array(keep)
    columns = {}
    for name, column in frame.items():
        values = column.array
        if isinstance(values, pd.arrays.ArrowStringArray):
            columns[name] = pd.array(values.__arrow_array__().filter(mask), dtype=values.dtype)
        else:
            columns[name] = values[keep]
    return pd.DataFrame(columns, columns=frame.columns, copy=False)
