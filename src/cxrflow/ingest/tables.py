"""Reading a source's tables: CSV, TSV (optionally gzipped) or Excel, as string columns; the encoding (UTF-8,
Windows-1251 detected, or source.encoding) and every failure named by file and line, never mojibake."""

from __future__ import annotations

import codecs
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd

from cxrflow.errors import CxrflowError
from cxrflow.table_checks import (RecordLines, bom_codec, check_not_binary, leading_blank_lines, long_record_error,
                                  wide_text_as_utf8)

# Three UTF-8 multi-byte characters in a row: text that a one-byte codec (cp1251, latin-1) would garble.
_UTF8_RUN = re.compile(rb"(?:[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}){3}")


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
