"""Decode one chest radiograph file (DICOM, PNG or JPEG) into a grey-level array and its metadata.

Every archive the pipeline ingests ends up here, so this module makes one promise: whatever the
file holds, the caller gets either a `Decoded` (a finite 2-D float32 array in the MONOCHROME2
convention, brighter = more attenuating) or a `DecodeError` with a short snake_case reason that the
ledger can count. No other exception escapes for a bad file, because a shard of two million images
must not stop on the one broken file in it.

DICOM pixels follow the standard display pipeline: stored values (BitsStored-masked by pydicom),
then the Modality LUT or rescale, then the VOI LUT or window, then MONOCHROME1 inversion. Pixel
values stay in those natural units; `meta["value_range"]` gives the nominal (low, high) range of the
output so that later stages can scale to [0, 1] without looking at the data.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from typing import BinaryIO

import numpy as np
import pydicom
from PIL import Image, ImageOps
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

__all__ = [
    "DecodeError",
    "Decoded",
    "decode_image",
    "file_kind",
    "open_regular_file",
    "is_excluded_view",
    "parse_dicom_age",
    "read_dicom_header",
]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8\xff"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_DATA_TAG = 0x7FE00010
_PIXEL_DATA_TAG_BYTES = b"\xe0\x7f\x10\x00"  # (7FE0,0010) as it appears in little-endian files
# Pixel Data, Float Pixel Data, Double Float Pixel Data (little-endian), and Pixel Data in big-endian files.
_PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00", b"\x7f\xe0\x00\x10")
_LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLAT", "RLAT"})
# Substrings, so that "PORT CHEST", "CHEST_PA" or a German "THORAX" all count as chest.
_CHEST_BODY_PARTS = ("CHEST", "THORAX", "THORAC", "TORAX", "LUNG")
# A grey image saved as RGB JPEG comes back with channels a few levels apart, and a burned-in
# coloured marker touches a tiny share of pixels; neither makes the radiograph a colour image.
_COLOUR_LEVEL_TOLERANCE = 0.03
_COLOUR_PIXEL_SHARE = 0.01
_MAX_WARNING_NOTES = 3
# Codecs written in Rust (pylibjpeg-rle) turn a corrupt stream into a pyo3 PanicException, which
# derives from BaseException; so failures are caught as BaseException, except these, which
# mean the process itself is asked to stop.
_NEVER_SWALLOWED = (KeyboardInterrupt, SystemExit, GeneratorExit)


class DecodeError(Exception):
    """A file that cannot become a training image; `reason` is a short snake_case code for the ledger."""

    def __init__(self, reason: str, detail: str = "", path: str | None = None):
        # Passing every field to Exception keeps the error picklable across worker processes.
        super().__init__(reason, detail, path)
        self.reason = reason
        self.detail = detail
        self.path = path

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{where}{self.reason}: {self.detail}" if self.detail else f"{where}{self.reason}"


@dataclass(frozen=True)
class Decoded:
    """A decoded image: `pixels` is 2-D float32, MONOCHROME2; `meta` describes the file and its tags."""

    pixels: np.ndarray
    meta: dict


def decode_image(path: str | os.PathLike) -> Decoded:
    """Decode a DICOM, PNG or JPEG file, recognised by its bytes, into a grey-level `Decoded`.

    Raises `DecodeError` (and nothing else) when the file cannot give a usable grey image.
    """
    with _failures_as_decode_errors(path) as notes, open_regular_file(path) as fp:
        # SHA-1: fast, and no adversary forges duplicates inside an archive (a fingerprint, not a signature).
        content_hash = hashlib.file_digest(fp, lambda: hashlib.sha1(usedforsecurity=False)).hexdigest()
        fp.seek(0)
        decoded = _decode_open_file(fp)
    decoded.meta["notes"].extend(notes)
    decoded.meta["content_hash"] = content_hash
    return decoded


def open_regular_file(path: str | os.PathLike) -> BinaryIO:
    """Open `path` for reading only if it is a regular file (symlinks followed), else raise `DecodeError`.

    The open is non-blocking and the type is checked on the open descriptor: a FIFO is never read (reading one
    blocks until a writer comes), a device never, and a file swapped for a FIFO between a check and the open is
    still caught. Reasons: not_a_file (with the kind), symlink_loop, missing_file, unreadable.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise DecodeError(_open_failure_reason(exc), f"{exc.strerror}", str(path)) from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise DecodeError("not_a_file", file_kind(mode), str(path))
        os.set_blocking(fd, True)
        fp = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    fp.raw.name = os.fspath(path)  # readers (pydicom) quote fp.name in their messages; an fd's name is an int
    return fp


def file_kind(mode: int) -> str:
    """What a non-regular directory entry is, in words, for a ledger or a prediction row."""
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "character_device"),
                       (stat.S_ISBLK, "block_device"), (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symlink")):
        if test(mode):
            return name
    return "special_file"


def _open_failure_reason(exc: OSError) -> str:
    return {errno.ENOENT: "missing_file", errno.ELOOP: "symlink_loop", errno.EISDIR: "not_a_file",
            errno.ENXIO: "not_a_file"}.get(exc.errno, "unreadable")


def read_dicom_header(path: str | os.PathLike) -> dict:
    """Return the same metadata keys as `decode_image` without reading pixel data (fast, for cataloguing).

    `color` here is only a hint from SamplesPerPixel; whether the pixels are truly colour is known
    only after decoding. Raises `DecodeError` for a file that is not DICOM.
    """
    with _failures_as_decode_errors(path) as notes, open_regular_file(path) as fp:
        size, head = _size_and_head(fp)
        fmt = _sniff_format(head)
        if fmt not in ("dicom", "dicom_bare"):
            raise DecodeError("not_dicom", f"format {fmt or 'unknown'}")
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=fmt == "dicom_bare")
        # pydicom stops with the file at the Pixel Data element's tag, if there is one.
        has_pixel_data = fp.read(4) in _PIXEL_DATA_TAGS
        _check_meta_group_complete(ds, size)
        if fmt == "dicom_bare" and not _looks_like_image_dataset(ds):
            raise DecodeError("not_dicom", "bytes parse as DICOM tags but hold no image attributes")
        meta = _dicom_meta(ds)
        meta["color"] = _int_tag(ds, "SamplesPerPixel", 1) > 1
        meta["sop_instance_uid"] = _text_tag(ds, "SOPInstanceUID")
        meta["has_pixel_data"] = has_pixel_data
    meta["notes"].extend(notes)
    return meta


def is_excluded_view(meta: dict) -> str | None:
    """Return why the tags rule the image out ("lateral_view", "not_chest"), or None when it may stay.

    Missing tags never exclude: PNG/JPEG sources carry no tags, and their views come from the
    source's own table instead.
    """
    view = _normalise(meta.get("view"))
    # Lateral decubitus ("LLD"/"RLD") films are frontal projections, so only true laterals go.
    if view and "DECUB" not in view and (view in _LATERAL_VIEWS or "LATERAL" in view):
        return "lateral_view"
    body_part = _normalise(meta.get("body_part"))
    if body_part and not any(part in body_part for part in _CHEST_BODY_PARTS):
        return "not_chest"
    return None


def parse_dicom_age(value: object) -> int | None:
    """Turn a DICOM Age String ("065Y", "030M", "010W", "005D") into whole years, or None."""
    text = _normalise(value)
    if not text:
        return None
    match = re.fullmatch(r"(\d{1,3})\s*([DWMY]?)", text)
    if not match:
        return None
    count, unit = int(match[1]), match[2] or "Y"
    years = {"Y": count, "M": count // 12, "W": count // 52, "D": count // 365}[unit]
    return years if years <= 130 else None


# ---------------------------------------------------------------------------------------------
# Failure handling and format detection


@contextmanager
def _failures_as_decode_errors(path: str | os.PathLike) -> Iterator[list[str]]:
    """Turn every failure inside the block into a `DecodeError` naming `path`; yield warning notes.

    pydicom reports oddities as warnings; recording them as notes makes them countable per file
    instead of flooding the shard log. The list is filled when the block ends. (catch_warnings is
    process-wide: run decoders in processes, not threads, if the notes must stay exact.)
    """
    path_text = str(path)
    notes: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield notes
        notes.extend(_warning_notes(caught))
    except DecodeError as exc:
        if exc.path is None:
            exc.path = path_text
            exc.args = (exc.reason, exc.detail, path_text)
        raise
    except FileNotFoundError as exc:
        raise DecodeError("missing_file", str(exc), path_text) from exc
    except _NEVER_SWALLOWED:
        raise
    except BaseException as exc:  # noqa: BLE001 - the promise is that a bad file never escapes as anything else
        raise DecodeError("unreadable", f"{type(exc).__name__}: {exc}", path_text) from exc


def _size_and_head(fp: BinaryIO) -> tuple[int, bytes]:
    size = os.fstat(fp.fileno()).st_size
    if size == 0:
        raise DecodeError("empty_file", "zero bytes")
    head = fp.read(132)
    fp.seek(0)
    return size, head


def _sniff_format(head: bytes) -> str | None:
    """Name the format from magic bytes; extensions lie too often in archives to be trusted."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head.startswith(_JPEG_SOI):
        return "jpeg"
    if _looks_like_bare_dicom(head):
        return "dicom_bare"
    return None


def _looks_like_bare_dicom(head: bytes) -> bool:
    """True when the bytes open like a DICOM stream without the 128-byte preamble and "DICM".

    pydicom's force=True accepts any bytes, so it is only used when the first element is a
    file-meta (0002) or identifying (0008) tag with a plausible VR or implicit length.
    """
    if len(head) < 8:
        return False
    group, _element = struct.unpack_from("<HH", head)
    if group not in (0x0002, 0x0008):
        return False
    vr = head[4:6]
    if vr.isalpha() and vr.isupper():
        return True
    (implicit_length,) = struct.unpack_from("<I", head, 4)
    return implicit_length < 1024


def _looks_like_image_dataset(ds: Dataset) -> bool:
    return any(keyword in ds for keyword in ("SOPClassUID", "Rows", *_PIXEL_KEYWORDS))


def _decode_open_file(fp: BinaryIO) -> Decoded:
    size, head = _size_and_head(fp)
    fmt = _sniff_format(head)
    if fmt in ("dicom", "dicom_bare"):
        return _decode_dicom(fp, size, bare=fmt == "dicom_bare")
    if fmt in ("png", "jpeg"):
        return _decode_raster(fp, fmt, head)
    # Never quote the bytes: a ledger is shareable, and a file's first bytes can be anything (README, "Privacy").
    raise DecodeError("unknown_format", "the first bytes match no DICOM, PNG or JPEG signature")


# ---------------------------------------------------------------------------------------------
# DICOM


def _decode_dicom(fp: BinaryIO, size: int, bare: bool) -> Decoded:
    try:
        ds = pydicom.dcmread(fp, force=bare)
    except Exception as exc:  # noqa: BLE001 - any parse failure means the same thing to the ledger
        raise DecodeError("unreadable", f"DICOM parse failed: {type(exc).__name__}: {exc}") from exc
    _check_meta_group_complete(ds, size)
    if bare and not _looks_like_image_dataset(ds):
        raise DecodeError("unknown_format", "bytes parse as DICOM tags but hold no image attributes")

    meta = _dicom_meta(ds)
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        if _last_element_cut(ds):
            raise DecodeError("truncated", "file ends inside a data element")
        if _pixel_data_header_in_file(fp):
            # On a missing closing delimiter pydicom drops the dataset read so far, hence the
            # empty case; with image attributes present the pixel data itself was lost.
            if len(ds) == 0 or "Rows" in ds:
                raise DecodeError("truncated", "file ends inside the pixel data")
            raise DecodeError("unreadable", "pixel data present but the dataset around it does not parse")
        sop_class = getattr(ds.get("SOPClassUID"), "name", None) or "unknown SOP class"
        raise DecodeError("no_pixel_data", f"{sop_class} has no Pixel Data")
    if _last_element_cut(ds):
        raise DecodeError("truncated", "file ends inside the pixel data")

    transfer_syntax = _transfer_syntax(ds)
    arr = _first_frame(ds, transfer_syntax)
    notes = meta["notes"]
    meta["bits_overflow"] = _bits_overflow(ds, transfer_syntax, notes)
    if meta["n_frames"] > 1:
        notes.append(f"multi-frame: first frame of {meta['n_frames']} used")

    photometric = meta["photometric"] or ""
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        notes.append("palette colour expanded to RGB")

    if arr.ndim == 3:
        # Colour DICOMs carry no modality or VOI transform for grey levels, so the grey channel is final.
        bits = meta["bits"] if meta["bits"] and photometric != "PALETTE COLOR" else 8 * arr.dtype.itemsize
        grey = _grey_from_channels(arr, notes, full_scale=2**bits - 1)
        pixels = _as_float32(grey)
        meta["value_range"] = (0.0, float(2**bits - 1))
    elif arr.ndim == 2:
        pixels, low, high = _grey_display_pipeline(arr, ds, notes)
        if photometric == "MONOCHROME1":
            # MONOCHROME1 shows low values bright; mirroring inside the nominal range keeps
            # the numbers in the same units while making bone bright, as in MONOCHROME2.
            np.subtract(low + high, pixels, out=pixels)
            notes.append("MONOCHROME1 inverted to MONOCHROME2")
        meta["value_range"] = (min(low, high), max(low, high))
    else:
        raise DecodeError("unexpected_shape", f"first frame has shape {arr.shape}")

    _check_finite(pixels)
    return Decoded(pixels=pixels, meta=meta)


def _bits_overflow(ds: Dataset, transfer_syntax: UID, notes: list[str]) -> float:
    """The share of the first frame's stored values that do not fit in BitsStored.

    pydicom masks every value to BitsStored, so a file whose BitsStored is smaller than its data (a wrong
    header from a converter) would be silently cut to its low bits: bright bone wraps around to black. The raw
    buffer shows it. Only for uncompressed data, where the raw values are at hand; a codec's output is masked
    before it can be seen.
    """
    if transfer_syntax.is_compressed or "PixelData" not in ds:
        return 0.0
    allocated, stored = _int_tag(ds, "BitsAllocated", 0), _int_tag(ds, "BitsStored", 0)
    if allocated not in (8, 16, 32) or not 0 < stored < allocated:
        return 0.0
    signed = _int_tag(ds, "PixelRepresentation", 0) == 1
    count = _int_tag(ds, "Rows", 0) * _int_tag(ds, "Columns", 0) * max(1, _int_tag(ds, "SamplesPerPixel", 1))
    dtype = np.dtype(f"{'<' if ds.original_encoding[1] is not False else '>'}{'i' if signed else 'u'}{allocated // 8}")
    raw = np.frombuffer(ds.PixelData, dtype=dtype, count=min(count, len(ds.PixelData) // dtype.itemsize))
    if raw.size == 0:
        return 0.0
    if signed:
        outside = (raw < -(2 ** (stored - 1))) | (raw > 2 ** (stored - 1) - 1)
    else:
        outside = raw > 2**stored - 1
    share = float(np.count_nonzero(outside)) / raw.size
    if share:
        notes.append(f"{share:.1%} of stored values exceed BitsStored {stored} (masked by the decoder)")
    return share


def _check_meta_group_complete(ds: Dataset, size: int) -> None:
    """Catch files cut inside the file meta group, which pydicom reads as a short, silent header."""
    group_length = ds.file_meta.get("FileMetaInformationGroupLength") if hasattr(ds, "file_meta") else None
    preamble = getattr(ds, "preamble", None)
    start = 132 if preamble is not None else 0
    if isinstance(group_length, int) and start + 12 + group_length > size:
        raise DecodeError("truncated", f"file meta group needs {group_length} bytes, file has {size}")


def _last_element_cut(ds: Dataset) -> bool:
    """True when the last element holds fewer bytes than its header promised.

    pydicom reads a file that ends early without complaint, handing back a short value, so a
    half-copied file would otherwise pass as a valid one.
    """
    if len(ds) == 0:
        return False
    last = ds.get_item(next(reversed(ds.keys())))
    value, length = getattr(last, "value", None), getattr(last, "length", None)
    if not isinstance(value, (bytes, bytearray)) or not isinstance(length, int):
        return False
    if length == 0xFFFFFFFF:
        return not _fragments_end_cleanly(value)
    return len(value) < length


def _pixel_data_header_in_file(fp: BinaryIO) -> bool:
    """True when the bytes hold a Pixel Data element header that pydicom could not read.

    pydicom drops encapsulated Pixel Data whose closing delimiter is missing (a file cut
    mid-stream) with only a warning, which would otherwise look like a non-image object. Only
    runs on that rare path.
    """
    fp.seek(0)
    data = fp.read()
    explicit = (_PIXEL_DATA_TAG_BYTES + vr for vr in (b"OB", b"OW"))
    return any(header in data for header in explicit) or _PIXEL_DATA_TAG_BYTES + b"\xff\xff\xff\xff" in data


def _fragments_end_cleanly(value: bytes) -> bool:
    """True when encapsulated pixel data is a whole run of items, as an intact stream must be.

    pydicom keeps undefined-length Pixel Data only once it meets a sequence delimiter, and drops
    the delimiter itself; walking the items guards against a delimiter pattern met by chance
    inside a cut fragment.
    """
    offset = 0
    while offset + 8 <= len(value):
        tag_group, tag_element, item_length = struct.unpack_from("<HHI", value, offset)
        if (tag_group, tag_element) != (0xFFFE, 0xE000):
            return False
        offset += 8 + item_length
    return offset == len(value)


def _transfer_syntax(ds: Dataset) -> UID:
    """Return the transfer syntax, inferring it for headerless files from how pydicom parsed them."""
    transfer_syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if transfer_syntax:
        return UID(str(transfer_syntax))
    pixel_element = ds.get_item(_PIXEL_DATA_TAG)
    if pixel_element is not None and getattr(pixel_element, "length", None) == 0xFFFFFFFF:
        raise DecodeError("unknown_transfer_syntax", "compressed pixel data but no Transfer Syntax UID")
    is_implicit, is_little = ds.original_encoding
    if is_little is False:
        raise DecodeError("unknown_transfer_syntax", "big-endian data without a Transfer Syntax UID")
    inferred = ImplicitVRLittleEndian if is_implicit else ExplicitVRLittleEndian
    ds.file_meta.TransferSyntaxUID = inferred
    return inferred


def _first_frame(ds: Dataset, transfer_syntax: UID) -> np.ndarray:
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError as exc:
        raise DecodeError("unsupported_transfer_syntax", f"{transfer_syntax} ({transfer_syntax.name})") from exc
    if not decoder.is_available:
        # Not a bad file but a missing plugin: its own reason makes the install gap obvious in the ledger.
        missing = "; ".join(decoder.missing_dependencies) or "no plugin"
        raise DecodeError("no_decoder", f"{transfer_syntax.name}: {missing}")
    try:
        # index=0 decodes only the first frame, so multi-frame files cost one frame of work.
        return pixel_array(ds, index=0)
    except _NEVER_SWALLOWED:
        raise
    except BaseException as exc:  # noqa: BLE001 - codecs raise a zoo of types; Rust ones even panic
        # A file cut inside its pixel data was caught before this; a failure here means a
        # corrupt codestream or image attributes (Rows, BitsAllocated...) that contradict the data.
        raise DecodeError("undecodable", f"{transfer_syntax.name}: {type(exc).__name__}: {exc}") from exc


def _grey_display_pipeline(arr: np.ndarray, ds: Dataset, notes: list[str]) -> tuple[np.ndarray, float, float]:
    """Apply Modality LUT/rescale then VOI LUT/window; return float32 pixels and the nominal output range.

    The two linear steps that nearly every radiograph uses, rescale and a LINEAR window, run here
    in place on one float32 array: pydicom's versions work in float64 with boolean masks and cost
    about ten times the decode of an uncompressed image. Everything else (Modality and VOI LUT
    sequences, SIGMOID windows, odd values) goes through pydicom's `apply_modality_lut` and
    `apply_voi_lut`; the tests hold the fast path to pydicom's results.
    """
    low, high = _stored_range(ds)

    modality_lut = ds.get("ModalityLUTSequence")
    if modality_lut:
        arr = apply_modality_lut(arr, ds)
        low, high = 0.0, float(2 ** int(modality_lut[0].LUTDescriptor[2]) - 1)
    elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = _float_tag(ds, "RescaleSlope", 1.0), _float_tag(ds, "RescaleIntercept", 0.0)
        if (slope, intercept) != (1.0, 0.0):
            arr = _as_float32(arr)
            arr *= slope
            arr += intercept
            low, high = low * slope + intercept, high * slope + intercept

    voi_lut = ds.get("VOILUTSequence")
    uses_voi_lut = bool(voi_lut) and "LUTDescriptor" in voi_lut[0] and "LUTData" in voi_lut[0]
    window = None if uses_voi_lut else _linear_window(ds)
    if window is not None:
        pixels = _as_float32(arr)
        _apply_linear_window(pixels, *window, low, high)
        return pixels, float(low), float(high)
    try:
        arr = apply_voi_lut(arr, ds)
    except Exception as exc:  # noqa: BLE001 - a broken window tag should not cost the image
        notes.append(f"VOI LUT/window ignored: {type(exc).__name__}: {exc}")
    else:
        if uses_voi_lut:
            low, high = 0.0, float(2 ** int(voi_lut[0].LUTDescriptor[2]) - 1)
        # A window maps onto the modality output range (pydicom's y_min..y_max), so low/high hold.
    return _as_float32(arr), float(low), float(high)


def _linear_window(ds: Dataset) -> tuple[float, float] | None:
    """Return (center, width) of a LINEAR/LINEAR_EXACT window already adjusted per PS3.3 C.11.2.1.2,
    or None when there is none or it needs pydicom's general code (or its error for bad values)."""
    function = (_text_tag(ds, "VOILUTFunction") or "LINEAR").upper()
    if function not in ("LINEAR", "LINEAR_EXACT") or _text_tag(ds, "PhotometricInterpretation") not in (
        "MONOCHROME1",
        "MONOCHROME2",
    ):
        return None
    try:
        center, width = (_first_value(ds.get(keyword)) for keyword in ("WindowCenter", "WindowWidth"))
        center, width = float(center), float(width)
    except (TypeError, ValueError):
        return None
    if function == "LINEAR":
        center, width = center - 0.5, width - 1.0
    # A zero width is a step function (or an error) that pydicom's code handles as the standard says.
    return (center, width) if width > 0 and np.isfinite(center) and np.isfinite(width) else None


def _apply_linear_window(pixels: np.ndarray, center: float, width: float, low: float, high: float) -> None:
    """Map [center - width/2, center + width/2] linearly onto [low, high], clipping outside; in place."""
    pixels -= center
    pixels /= width
    pixels += 0.5
    np.clip(pixels, 0.0, 1.0, out=pixels)
    pixels *= high - low
    pixels += low


def _first_value(value: object) -> object:
    return value[0] if isinstance(value, (list, tuple, MultiValue)) else value


def _stored_range(ds: Dataset) -> tuple[float, float]:
    bits = _int_tag(ds, "BitsStored", _int_tag(ds, "BitsAllocated", 16))
    if _int_tag(ds, "PixelRepresentation", 0) == 1:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def _dicom_meta(ds: Dataset) -> dict:
    bits = _int_tag(ds, "BitsStored", _int_tag(ds, "BitsAllocated", 0))
    return {
        "format": "dicom",
        "bits": bits,
        "photometric": _text_tag(ds, "PhotometricInterpretation"),
        "n_frames": max(1, _int_tag(ds, "NumberOfFrames", 1)),
        "color": False,
        "notes": [],
        "value_range": None,
        "patient_id": _text_tag(ds, "PatientID"),
        "sex": _sex(_text_tag(ds, "PatientSex")),
        "age": _age(ds),
        "view": _text_tag(ds, "ViewPosition"),
        "body_part": _text_tag(ds, "BodyPartExamined"),
        "study_date": _text_tag(ds, "StudyDate"),
        "modality": _text_tag(ds, "Modality"),
        # Text burned into the pixels (names, dates) is an identifier no tag removal reaches (DICOM PS3.15 E).
        "burned_in": 1.0 if (_text_tag(ds, "BurnedInAnnotation") or "").upper() == "YES" else 0.0,
    }


def _age(ds: Dataset) -> int | None:
    age = parse_dicom_age(_text_tag(ds, "PatientAge"))
    if age is not None:
        return age
    # Many exports drop PatientAge but keep both dates; the difference is the same fact.
    birth, study = _dicom_date(_text_tag(ds, "PatientBirthDate")), _dicom_date(_text_tag(ds, "StudyDate"))
    if birth is None or study is None or study < birth:
        return None
    years = study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day))
    return years if years <= 130 else None


def _dicom_date(text: str | None) -> date | None:
    if not text or not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _sex(text: str | None) -> str | None:
    return text if text in ("F", "M") else None


def _text_tag(ds: Dataset, keyword: str) -> str | None:
    """Read a tag as stripped upper-case-preserving text; a malformed value counts as absent."""
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed tag must not cost the whole file
        return None
    if value is None:
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        if not value:
            return None
        value = value[0]
    text = str(value).strip()
    if keyword in ("PatientSex", "ViewPosition", "BodyPartExamined", "PhotometricInterpretation", "Modality"):
        text = text.upper()
    return text or None


def _int_tag(ds: Dataset, keyword: str, default: int) -> int:
    try:
        value = ds.get(keyword)
        return default if value in (None, "") else int(value)
    except Exception:  # noqa: BLE001 - a malformed number means "not given"
        return default


def _float_tag(ds: Dataset, keyword: str, default: float) -> float:
    try:
        value = ds.get(keyword)
        return default if value in (None, "") else float(value)
    except Exception:  # noqa: BLE001 - a malformed number means "not given"
        return default


# ---------------------------------------------------------------------------------------------
# PNG and JPEG


def _decode_raster(fp: BinaryIO, fmt: str, head: bytes) -> Decoded:
    notes: list[str] = []
    try:
        with Image.open(fp, formats=[fmt.upper()]) as img:
            n_frames = int(getattr(img, "n_frames", 1) or 1)
            # load() forces the full decode here, so a cut file fails now and not in a later stage.
            img.load()
            img = _apply_exif_orientation(img, notes)
            png_bit_depth = head[24] if fmt == "png" and len(head) > 24 else 8
            arr, bits = _raster_array(img, png_bit_depth, notes)
    except DecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError... for bad data
        message = str(exc)
        reason = "truncated" if "truncated" in message else "unreadable"
        raise DecodeError(reason, f"{fmt.upper()}: {type(exc).__name__}: {message}") from exc

    if n_frames > 1:
        notes.append(f"multi-frame: first frame of {n_frames} used")
    pixels = _as_float32(arr)
    _check_finite(pixels)
    meta = {
        "format": fmt,
        "bits": bits,
        "photometric": None,
        "n_frames": n_frames,
        "color": False,
        "notes": notes,
        "value_range": (0.0, float(2**bits - 1)),
        "patient_id": None,
        "sex": None,
        "age": None,
        "view": None,
        "body_part": None,
        "study_date": None,
        "modality": None,
    }
    return Decoded(pixels=pixels, meta=meta)


def _apply_exif_orientation(img: Image.Image, notes: list[str]) -> Image.Image:
    orientation = img.getexif().get(0x0112, 1)
    if orientation in (None, 1):
        return img
    notes.append(f"EXIF orientation {orientation} applied")
    return ImageOps.exif_transpose(img)


def _raster_array(img: Image.Image, png_bit_depth: int, notes: list[str]) -> tuple[np.ndarray, int]:
    """Return a 2-D grey array and its effective bit depth for any Pillow mode a radiograph may use."""
    mode = img.mode
    if mode == "1":
        return np.asarray(img.convert("L")), 8
    if mode in ("L", "LA", "La"):
        # Pillow scales 1/2/4-bit grey PNG up to 0..255, so "L" is always 8-bit in value.
        if mode != "L":
            notes.append("alpha channel dropped")
            return np.asarray(img)[..., 0], 8
        return np.asarray(img), 8
    if mode in ("I;16", "I;16L", "I;16B"):
        # Pillow keeps 16-bit grey PNG as I;16, so the full precision reaches the array.
        arr = np.asarray(img)
        return arr, _bits_in_use(arr, 16, notes)
    if mode in ("I", "F"):
        arr = np.asarray(img)
        return arr, _bits_in_use(arr, 16, notes) if png_bit_depth == 16 else 32
    bits = png_bit_depth
    if mode in ("P", "PA"):
        notes.append("palette image expanded to RGB")
        img = img.convert("RGB")
        mode, bits = "RGB", 8
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        notes.append(f"{mode} converted to RGB")
        img = img.convert("RGB")
        mode, bits = "RGB", 8
    if mode in ("RGB", "RGBA", "RGBX", "RGBa"):
        if bits > 8:
            # Pillow reads 16-bit colour PNG at 8 bits per channel; say so rather than pretend.
            notes.append(f"{bits}-bit colour PNG read at 8 bits per channel")
            bits = 8
        arr = np.asarray(img)
        if mode != "RGB":
            notes.append("alpha channel dropped")
        return _grey_from_channels(arr[..., :3], notes, full_scale=255), bits
    raise DecodeError("unsupported_mode", f"Pillow mode {mode}")


def _bits_in_use(arr: np.ndarray, container_bits: int, notes: list[str]) -> int:
    """The bit depth a 16-bit grey PNG really uses: 10, 12 or 14 when its values fill that depth, else 16.

    Detector exports often store 12-bit data in a 16-bit PNG without saying so; judged against 0..65535 such an
    image has its median near 0.03 and would be rejected as too dark. A depth is taken as the nominal range when the
    largest value fits it and reaches its top quarter, as the brightest pixels of an exposed radiograph (bone, lead
    markers) do. An underexposed 16-bit film has no such bright pixels (the synthetic archive's dark films peak near
    4% of 65535, inside 12 bits but well under 3/4 of them), so it stays judged against 0..65535 and QC calls it too
    dark; tests/test_workflow.py checks exactly that.
    """
    top = int(arr.max()) if arr.size else 0
    for bits in (10, 12, 14):
        if bits < container_bits and 3 * 2 ** (bits - 2) <= top < 2**bits:
            notes.append(f"{container_bits}-bit PNG uses {bits} bits: scaled by 0..{2**bits - 1}")
            return bits
    return container_bits


# ---------------------------------------------------------------------------------------------
# Shared pixel helpers


def _grey_from_channels(arr: np.ndarray, notes: list[str], full_scale: float) -> np.ndarray:
    """Collapse an RGB array to grey, or raise `truly_colour` when the colour carries content.

    `full_scale` is the largest value the channels can hold (255 for 8-bit), which sets how far
    apart channels may drift, through lossy compression, and still count as one grey level.
    """
    red, green, blue = arr[..., 0], arr[..., 1], arr[..., 2]
    if np.array_equal(red, green) and np.array_equal(red, blue):
        notes.append("RGB with equal channels converted to gray")
        return red
    rgb = arr[..., :3]
    spread = rgb.max(axis=-1) - rgb.min(axis=-1)
    coloured_share = float(np.count_nonzero(spread > _COLOUR_LEVEL_TOLERANCE * full_scale)) / spread.size
    if coloured_share > _COLOUR_PIXEL_SHARE:
        raise DecodeError("truly_colour", f"{coloured_share:.1%} of pixels have distinct channels")
    notes.append("RGB with near-equal channels averaged to gray")
    return rgb.mean(axis=-1, dtype=np.float32)


def _as_float32(arr: np.ndarray) -> np.ndarray:
    """Cast once to a writeable, C-contiguous float32 array; no copy when it is one already."""
    out = arr.astype(np.float32, order="C", copy=False)
    return out if out.flags.writeable else out.copy()


def _check_finite(pixels: np.ndarray) -> None:
    if pixels.ndim != 2 or min(pixels.shape) < 1:
        raise DecodeError("unexpected_shape", f"pixels have shape {pixels.shape}")
    # min/max propagate NaN and show +-inf without allocating a full boolean mask (1 ms instead of 5 on 2k)
    if not (np.isfinite(pixels.min()) and np.isfinite(pixels.max())):
        raise DecodeError("non_finite", "pixel values include NaN or infinity")


def _normalise(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip().upper()
    return text or None


def _warning_notes(caught: list[warnings.WarningMessage]) -> list[str]:
    unique: list[str] = []
    for item in caught:
        text = f"warning: {str(item.message)[:200]}"
        if text not in unique:
            unique.append(text)
    return unique[:_MAX_WARNING_NOTES]
