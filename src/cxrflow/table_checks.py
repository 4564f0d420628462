"""What a table file is before it is parsed, and where its records start: the checks that turn a hospital export's
oddities into one line naming the file and the cause, instead of a parser's traceback.

- A binary file posing as a table (an .xlsx, .xls, PDF or ZIP renamed .csv) is named as what it is.
- UTF-16 and UTF-32 are recognized by their byte-order mark; UTF-16 without one by its zero bytes.
- Blank lines before the header are skipped.
- A record longer than the parser's block (a 16 MB note, nearly always an unclosed quote) is named by its line.
- A table's "line N" is the file's line, also when quoted notes hold line breaks or blank lines separate records.
- A configuration text file (vocabulary, label map, keys) that cannot be read is one line, not a traceback.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrflow.errors import CxrflowError

# (leading bytes, what the file is, what to do). Checked before any decoding: no text table starts so.
_SIGNATURES = [
    (b"PK\x03\x04", "a ZIP archive (an Excel .xlsx, OpenDocument .ods or Word file?)",
     "save it as CSV (UTF-8), or name it .xlsx to read it as a spreadsheet"),
    (b"PK\x05\x06", "an empty ZIP archive", "export the table again"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an old Office file (Excel .xls or Word .doc?)",
     "save it as CSV (UTF-8), or name it .xls to read it as a spreadsheet"),
    (b"%PDF", "a PDF document", "export the table itself as CSV"),
    (b"\x1f\x8b", "gzip-compressed", "name it .csv.gz (or .tsv.gz) to have it decompressed"),
    (b"PAR1", "a Parquet file", "export it as CSV"),
    (b"SQLite format 3\x00", "an SQLite database", "export the table as CSV"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image", "point source.annotations at the table"),
    (b"\xff\xd8\xff", "a JPEG image", "point source.annotations at the table"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", "unpack it first"),
    (b"Rar!\x1a\x07", "a RAR archive", "unpack it first"),
    (b"{\\rtf", "an RTF document", "save the table as CSV"),
]
# Longest first: the UTF-32 little-endian mark begins with the UTF-16 one.
_BOMS = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")]


# Codecs in which every byte below 0x80 is the ASCII character: a line break and a quote can be found in the bytes.
_ASCII_SAFE = {"utf-8", "utf-8-sig", "cp1251", "koi8-r", "cp866", "iso8859-5", "latin-1", "iso8859-1", "cp1252",
               "iso8859-15", "ascii"}


def bom_codec(head: bytes) -> str | None:
    """The codec a byte-order mark announces ('utf-8-sig', 'utf-16', 'utf-32'), or None."""
    for bom, codec in _BOMS:
        if head.startswith(bom):
            return codec
    return None


def check_not_binary(head: bytes, path: Path, codec: str = "auto") -> None:
    """Refuse a file whose first bytes show it is no text table, naming what it is. `codec` is the configured
    source.encoding ('auto' or a codec name): UTF-16/32 text has zero bytes, anything else must not."""
    for magic, what, todo in _SIGNATURES:
        if head.startswith(magic) and not (magic == b"\x1f\x8b" and path.suffix.lower() == ".gz"):
            raise CxrflowError(f"{path}: the file is {what}, not a CSV/TSV text table; {todo}")
    if len(head) >= 132 and head[128:132] == b"DICM":
        raise CxrflowError(f"{path}: the file is a DICOM object, not a CSV/TSV text table; point source.annotations "
                           "at the table (source.format dicom reads a folder of DICOM files)")
    wide = bom_codec(head) in ("utf-16", "utf-32") or codec.replace("_", "-").lower().startswith(("utf-16", "utf-32",
                                                                                               "utf16", "utf32"))
    if wide or b"\x00" not in head[:65536]:
        return
    sample = head[:65536]
    zeros_even, zeros_odd = sample[0::2].count(0), sample[1::2].count(0)
    half = max(len(sample) // 2, 1)
    if max(zeros_even, zeros_odd) > 0.3 * half and min(zeros_even, zeros_odd) < 0.05 * half:
        order = "le" if zeros_odd > zeros_even else "be"
        raise CxrflowError(f"{path}: the text looks like UTF-16 without a byte-order mark; set source.encoding: "
                           f"utf-16-{order}")
    raise CxrflowError(f"{path}: the file holds zero bytes (first at byte {head.index(0)}): a binary file, not a "
                       "CSV/TSV text table")


def wide_text_as_utf8(raw: bytes, path: Path, encoding: str) -> bytes | None:
    """UTF-16/32 text announced by its byte-order mark, re-encoded as UTF-8; None when there is no such mark.
    A mark that contradicts source.encoding is an error: the file says what it is."""
    codec = bom_codec(raw[:4])
    if codec not in ("utf-16", "utf-32"):
        return None
    named = encoding.replace("_", "-").lower()
    if named != "auto" and not named.startswith(codec):
        raise CxrflowError(f"{path}: the file starts with a {codec.upper()} byte-order mark but source.encoding is "
                           f"{encoding!r}; set source.encoding: auto")
    try:
        return raw.decode(codec).encode("utf-8")
    except UnicodeDecodeError as err:
        raise CxrflowError(f"{path}: the file starts with a {codec.upper()} byte-order mark but byte {err.start} is "
                           f"not {codec.upper()}: {err.reason}") from None


def leading_blank_lines(head: bytes) -> tuple[int, int]:
    """(number of blank lines before the header, bytes they take, with a UTF-8 byte-order mark before them)."""
    start = len(codecs.BOM_UTF8) if head.startswith(codecs.BOM_UTF8) else 0
    lines, offset = 0, start
    while True:
        end = head.find(b"\n", offset)
        if end < 0 or head[offset:end].strip(b" \t\r\x0b\x0c"):
            break
        lines, offset = lines + 1, end + 1
    return (lines, offset) if lines else (0, 0)


@dataclass
class RecordLines:
    """Where each record of a parsed table starts in its file, computed only when a ledger needs it: reading the
    file again costs one pass, paid for tables that have rows to report."""

    path: Path | None  # None: one line per record, as a spreadsheet's rows
    codec: str  # how the file's bytes were read: utf-8, cp1251, utf-16, ...
    sep: str
    header_line: int  # 1-based: 1 unless blank lines came first
    records: int

    def of(self, positions) -> np.ndarray:
        """1-based file line of each record position (0 = the first record after the header)."""
        positions = np.asarray(positions, dtype=np.int64)
        if not len(positions) or self.path is None:
            return positions + self.header_line + 1
        raw = self._utf8()
        newlines = raw.count(b"\n") + (0 if raw.endswith(b"\n") else 1)
        if newlines == self.header_line + self.records:  # one line per record: no break in a note, no blank line
            return positions + self.header_line + 1
        starts = quote_parity_starts(raw, self.header_line, self.records)
        if starts is None:  # a quote inside an unquoted field fools the parity: read as the parser reads
            starts = record_starts(raw.decode("utf-8", errors="replace"), self.sep, self.header_line)
        return np.asarray(starts, dtype=np.int64)[positions]

    def _utf8(self) -> bytes:
        """The file's bytes, as UTF-8 unless its codec writes a line break and a quote as UTF-8 does."""
        opener = gzip.open if self.path.suffix.lower() == ".gz" else open
        with opener(self.path, "rb") as fp:
            raw = fp.read()
        if codecs.lookup(self.codec if self.codec != "auto" else "utf-8").name not in _ASCII_SAFE:
            raw = raw.decode(self.codec, errors="replace").encode("utf-8")
        return raw


def quote_parity_starts(raw: bytes, header_line: int, records: int) -> np.ndarray | None:
    """Record start lines from the bytes alone: a line break ends a record when an even number of quotes comes
    before it. Empty lines are no records. None unless it finds exactly `records` records after the header (a quote
    inside an unquoted field, which the parser takes literally, would shift the parity)."""
    data = np.frombuffer(raw, dtype=np.uint8)
    breaks = np.flatnonzero(data == 10)
    quotes = np.flatnonzero(data == 34)
    ends = np.flatnonzero(np.searchsorted(quotes, breaks) % 2 == 0)  # indices into `breaks`
    start_bytes = np.concatenate([[0], breaks[ends] + 1])
    end_bytes = np.concatenate([breaks[ends], [len(data)]])
    start_lines = np.concatenate([[1], ends + 2])
    length = end_bytes - start_bytes
    lone_return = (length == 1) & (data[np.minimum(start_bytes, len(data) - 1)] == 13)
    filled = (length > 0) & ~lone_return
    lines = start_lines[filled]
    if len(lines) != records + 1 or lines[0] != header_line:
        return None
    return lines[1:]


def record_starts(text: str, sep: str, header_line: int) -> list[int]:
    """The 1-based line on which each record after the header starts, read the way the table parser reads: quoted
    fields may hold line breaks, empty lines are no records."""
    csv.field_size_limit(sys.maxsize)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, strict=False)
    starts, consumed = [], 0
    for row in reader:
        start, consumed = consumed + 1, reader.line_num
        if start <= header_line or not row:
            continue
        starts.append(start)
    return starts


def long_record_error(text: str, path: Path, sep: str, limit: int, skipped_lines: int = 0) -> CxrflowError:
    """The one-line error for a table the parser refuses because a record exceeds its block of `limit` bytes.
    `text` starts at the header; `skipped_lines` blank lines came before it in the file."""
    csv.field_size_limit(sys.maxsize)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, strict=False)
    consumed = 0
    for row in reader:
        start, consumed = consumed + 1, reader.line_num
        if start == 1 or not row:
            continue
        if sum(len(field) for field in row) * 4 <= limit:  # a character takes at most four bytes
            continue
        size = sum(len(field.encode("utf-8")) for field in row) + len(row)
        if size > limit:
            first, line = row[0][:40], start + skipped_lines
            return CxrflowError(
                f"{path}: line {line} (first field {first!r}) starts a record of {size / 2**20:.1f} MB running to line "
                f"{consumed + skipped_lines}, over the {limit / 2**20:.0f} MB a record may hold; a note this long is "
                f"nearly always an unclosed quote: check the quoting on line {line}")
    return CxrflowError(f"{path}: a record is longer than the {limit / 2**20:.0f} MB the table reader takes in one "
                        "piece; check for an unclosed quote")


def read_text_file(path: Path, what: str) -> str:
    """A configuration file's UTF-8 text (vocabulary, label map, label keys), or one line saying why not."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise CxrflowError(f"{what}: {path} is a folder, not a file") from None
    except FileNotFoundError:
        raise CxrflowError(f"{what}: no such file: {path}") from None
    except OSError as err:
        raise CxrflowError(f"{what}: cannot read {path}: {err.strerror or type(err).__name__}") from None
    wide = bom_codec(raw[:4])
    if wide in ("utf-16", "utf-32"):
        raise CxrflowError(f"{what}: {path} is {wide.upper()} text; save it as UTF-8")
    if b"\x00" in raw[:65536]:
        raise CxrflowError(f"{what}: {path} is a binary file, not YAML text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise CxrflowError(f"{what}: {path} is not UTF-8 text (line {line}, byte {err.start}: {err.reason}); "
                           "save it as UTF-8") from None
