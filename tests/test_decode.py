"""Tests for cxrflow.decode: every file is written here, in every transfer syntax the archives use.

JPEG Lossless SV1 has no common Python encoder, so a minimal one (process 14, predictor 1, one
fixed Huffman table) lives below; decoding always goes through pydicom and its plugins.
"""

from __future__ import annotations

import io
import pickle
import struct

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from cxrflow.decode import (
    DecodeError,
    Decoded,
    decode_image,
    is_excluded_view,
    parse_dicom_age,
    read_dicom_header,
)

RNG = np.random.default_rng(20240611)


# ---------------------------------------------------------------------------------------------
# File writers


def make_dataset(
    arr: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    frames: int = 1,
    **tags,
) -> Dataset:
    """A DX dataset describing `arr` (rows, cols[, 3]) or (frames, rows, cols), without Pixel Data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = "P0001"
    ds.PatientSex = "F"
    ds.PatientAge = "065Y"
    ds.ViewPosition = "PA"
    ds.BodyPartExamined = "CHEST"
    ds.StudyDate = "20200102"
    shape = arr.shape[1:] if frames > 1 else arr.shape
    ds.Rows, ds.Columns = shape[:2]
    ds.SamplesPerPixel = 3 if len(shape) == 3 else 1
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if np.issubdtype(arr.dtype, np.signedinteger) else 0
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def write_dicom(path, arr: np.ndarray, **kwargs) -> None:
    """Write `arr` uncompressed (Explicit VR Little Endian)."""
    ds = make_dataset(arr, **kwargs)
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_encapsulated(path, arr: np.ndarray, frame: bytes, transfer_syntax: UID, **kwargs) -> None:
    """Write one already-compressed frame under `transfer_syntax` (for codecs pydicom cannot encode)."""
    ds = make_dataset(arr, **kwargs)
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def encode_jpeg_lossless_sv1(arr: np.ndarray, precision: int) -> bytes:
    """Encode a 2-D unsigned array as JPEG Lossless, Non-Hierarchical, First-Order Prediction (SV1).

    Process 14 with selection value 1: every sample is predicted by its left neighbour (the first
    column by the sample above, the very first sample by 2**(P-1)), and the difference category
    is coded with one fixed Huffman table where every category 0..16 gets a 5-bit code.
    """
    x = arr.astype(np.int64)
    rows, cols = x.shape
    predicted = np.empty_like(x)
    predicted[0, 0] = 1 << (precision - 1)
    predicted[0, 1:] = x[0, :-1]
    predicted[1:, 0] = x[:-1, 0]
    predicted[1:, 1:] = x[1:, :-1]
    diffs = (x - predicted) % 65536
    diffs = np.where(diffs >= 32768, diffs - 65536, diffs)

    bits: list[str] = []
    for diff in diffs.ravel().tolist():
        category = 16 if diff == -32768 else abs(diff).bit_length()
        bits.append(format(category, "05b"))
        if 0 < category < 16:
            extra = diff if diff > 0 else diff + (1 << category) - 1
            bits.append(format(extra, f"0{category}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)  # pad with 1-bits, as the standard asks
    entropy = int(stream, 2).to_bytes(len(stream) // 8, "big") if stream else b""
    entropy = entropy.replace(b"\xff", b"\xff\x00")  # byte stuffing

    counts = [0] * 16
    counts[4] = 17  # seventeen 5-bit codes 00000..10000; none is all ones
    sof3 = b"\xff\xc3" + (11).to_bytes(2, "big") + bytes([precision]) + rows.to_bytes(2, "big")
    sof3 += cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    dht = b"\xff\xc4" + (3 + 16 + 17).to_bytes(2, "big") + b"\x00" + bytes(counts) + bytes(range(17))
    sos = b"\xff\xda" + (8).to_bytes(2, "big") + bytes([1, 1, 0x00, 1, 0, 0])
    return b"\xff\xd8" + sof3 + dht + sos + entropy + b"\xff\xd9"


def encode_pillow(arr: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def smooth_image(rows: int = 48, cols: int = 64, high: int = 255) -> np.ndarray:
    """A gradient with mild texture: realistic enough that lossy JPEG stays close to it."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    base = 0.5 + 0.3 * np.sin(xx / 9.0) * np.cos(yy / 7.0) + 0.1 * (xx / cols)
    return np.clip(base * high, 0, high)


# ---------------------------------------------------------------------------------------------
# DICOM: transfer syntaxes


def test_native_dicom_decodes_exactly_with_tags(tmp_path):
    arr = RNG.integers(0, 4096, (40, 56), dtype=np.uint16)
    path = tmp_path / "native.dcm"
    write_dicom(path, arr, bits_stored=12)

    decoded = decode_image(path)

    assert isinstance(decoded, Decoded)
    assert decoded.pixels.dtype == np.float32 and decoded.pixels.shape == (40, 56)
    np.testing.assert_array_equal(decoded.pixels, arr)
    meta = decoded.meta
    assert meta["format"] == "dicom" and meta["bits"] == 12 and meta["photometric"] == "MONOCHROME2"
    assert meta["n_frames"] == 1 and meta["color"] is False and meta["notes"] == []
    assert meta["value_range"] == (0.0, 4095.0)
    assert (meta["patient_id"], meta["sex"], meta["age"]) == ("P0001", "F", 65)
    assert (meta["view"], meta["body_part"], meta["study_date"], meta["modality"]) == ("PA", "CHEST", "20200102", "DX")


@pytest.mark.parametrize("transfer_syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda uid: uid.name)
def test_lossless_syntaxes_encoded_by_pydicom_decode_exactly(tmp_path, transfer_syntax):
    arr = RNG.integers(0, 4096, (40, 56), dtype=np.uint16)
    ds = make_dataset(arr, bits_stored=12)
    ds.compress(transfer_syntax, arr)
    path = tmp_path / "compressed.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == transfer_syntax

    decoded = decode_image(path)

    np.testing.assert_array_equal(decoded.pixels, arr)


@pytest.mark.parametrize("precision", [12, 16])
def test_jpeg_lossless_sv1_decodes_exactly(tmp_path, precision):
    arr = RNG.integers(0, 2**precision, (24, 31), dtype=np.uint16)
    if precision == 16:
        # Neighbours 32768 apart exercise the category-16 difference, which carries no extra bits.
        arr[5, 3], arr[5, 4] = 0, 32768
    path = tmp_path / "sv1.dcm"
    write_encapsulated(path, arr, encode_jpeg_lossless_sv1(arr, precision), JPEGLosslessSV1, bits_stored=precision)

    decoded = decode_image(path)

    np.testing.assert_array_equal(decoded.pixels, arr)


def test_jpeg_baseline_decodes_close_to_original(tmp_path):
    arr = smooth_image().astype(np.uint8)
    path = tmp_path / "baseline.dcm"
    write_encapsulated(path, arr, encode_pillow(arr, "JPEG", quality=95), JPEGBaseline8Bit)

    decoded = decode_image(path)

    error = np.abs(decoded.pixels - arr.astype(np.float32))
    assert error.mean() < 1.5 and error.max() <= 12


def test_truncated_compressed_dicom_is_rejected(tmp_path):
    arr = RNG.integers(0, 4096, (64, 64), dtype=np.uint16)
    ds = make_dataset(arr, bits_stored=12)
    ds.compress(JPEG2000Lossless, arr)
    whole = tmp_path / "whole.dcm"
    ds.save_as(whole, enforce_file_format=True)
    data = whole.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) * 3 // 4])

    with pytest.raises(DecodeError) as caught:
        decode_image(cut)

    assert caught.value.reason == "truncated"


def test_unsupported_transfer_syntax_is_rejected(tmp_path):
    arr = np.zeros((8, 8), dtype=np.uint8)
    path = tmp_path / "mpeg.dcm"
    write_encapsulated(path, arr, b"\x00\x00\x01\xb3" + bytes(60), UID("1.2.840.10008.1.2.4.100"))

    with pytest.raises(DecodeError) as caught:
        decode_image(path)

    assert caught.value.reason == "unsupported_transfer_syntax"


# ---------------------------------------------------------------------------------------------
# DICOM: display pipeline


def test_monochrome1_is_inverted_within_stored_range(tmp_path):
    arr = RNG.integers(0, 4096, (16, 16), dtype=np.uint16)
    path = tmp_path / "mono1.dcm"
    write_dicom(path, arr, bits_stored=12, photometric="MONOCHROME1")

    decoded = decode_image(path)

    np.testing.assert_array_equal(decoded.pixels, 4095.0 - arr)
    assert "MONOCHROME1 inverted to MONOCHROME2" in decoded.meta["notes"]


def test_rescale_slope_and_intercept_are_applied(tmp_path):
    arr = RNG.integers(0, 4096, (16, 16), dtype=np.uint16)
    path = tmp_path / "rescale.dcm"
    write_dicom(path, arr, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024)

    decoded = decode_image(path)

    np.testing.assert_allclose(decoded.pixels, arr * 2.0 - 1024.0)
    assert decoded.meta["value_range"] == (-1024.0, 4095 * 2.0 - 1024.0)


def test_voi_window_is_applied_after_rescale(tmp_path):
    arr = np.array([[0, 1000, 1535, 2048], [2560, 3000, 4000, 4095]], dtype=np.uint16)
    path = tmp_path / "window.dcm"
    write_dicom(path, arr, bits_stored=12, RescaleSlope=1, RescaleIntercept=-1000, WindowCenter=1048, WindowWidth=1025)

    decoded = decode_image(path)

    # LINEAR window (PS3.3 C.11.2.1.2.1) on rescaled values, output spanning the rescaled range.
    rescaled = arr.astype(np.float64) - 1000
    low, high = -1000.0, 3095.0
    center, width = 1048 - 0.5, 1025 - 1
    expected = np.clip(((rescaled - center) / width + 0.5), 0, 1) * (high - low) + low
    np.testing.assert_allclose(decoded.pixels, expected, rtol=1e-5)
    assert decoded.pixels[0, 0] == low and decoded.pixels[1, 3] == high


@pytest.mark.parametrize(
    "tags",
    [
        {"WindowCenter": 1500, "WindowWidth": 2001},
        {"WindowCenter": [900.5, 2000], "WindowWidth": [700, 1200], "VOILUTFunction": "LINEAR_EXACT"},
        {"WindowCenter": -300, "WindowWidth": 1500, "RescaleSlope": -1.5, "RescaleIntercept": 2000},
        {"WindowCenter": 2000, "WindowWidth": 800, "VOILUTFunction": "SIGMOID"},
        {"WindowCenter": 2000, "WindowWidth": 1, "PhotometricInterpretation": "MONOCHROME1"},
        {"RescaleSlope": 0.25, "RescaleIntercept": 7},
    ],
    ids=["linear", "linear-exact-multi", "negative-slope", "sigmoid", "width-1-mono1", "rescale-only"],
)
def test_display_pipeline_matches_pydicom(tmp_path, tags):
    """The in-place float32 rescale/window must give what pydicom's own functions give."""
    arr = RNG.integers(0, 4096, (32, 32), dtype=np.uint16)
    path = tmp_path / "pipeline.dcm"
    write_dicom(path, arr, bits_stored=12, **tags)

    decoded = decode_image(path)

    ds = pydicom.dcmread(path)
    expected = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    low, high = decoded.meta["value_range"]
    if ds.PhotometricInterpretation == "MONOCHROME1":
        expected = low + high - expected
    np.testing.assert_allclose(decoded.pixels, expected, rtol=0, atol=1e-4 * (high - low))


def test_pydicom_warnings_become_notes(tmp_path):
    arr = RNG.integers(0, 4096, (4, 4), dtype=np.uint16)
    path = tmp_path / "vr_mismatch.dcm"
    write_dicom(path, arr)
    # A classic archive defect: the meta group says Implicit VR, the dataset is Explicit VR.
    # Same-length swap: the 20-byte UID field keeps its size with extra null padding.
    data = path.read_bytes()
    path.write_bytes(data.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2\x00\x00\x00"))

    decoded = decode_image(path)

    np.testing.assert_array_equal(decoded.pixels, arr)
    assert any("found explicit VR" in note for note in decoded.meta["notes"])


def test_voi_lut_sequence_and_monochrome1_use_lut_range(tmp_path):
    arr = np.array([[0, 1, 2, 3]], dtype=np.uint16)
    item = Dataset()
    # Both elements have ambiguous VRs (US/SS, US/OW), so they are given explicitly.
    item.add_new(0x00283002, "US", [4, 0, 8])  # LUT Descriptor: 4 entries, first maps 0, 8 bits
    item.add_new(0x00283006, "US", [10, 20, 30, 40])  # LUT Data
    path = tmp_path / "voilut.dcm"
    write_dicom(path, arr, bits_stored=12, photometric="MONOCHROME1", VOILUTSequence=Sequence([item]))

    decoded = decode_image(path)

    np.testing.assert_array_equal(decoded.pixels, 255.0 - np.array([[10, 20, 30, 40]]))
    assert decoded.meta["value_range"] == (0.0, 255.0)


def test_broken_window_is_ignored_with_a_note(tmp_path):
    arr = RNG.integers(0, 4096, (8, 8), dtype=np.uint16)
    path = tmp_path / "badwindow.dcm"
    write_dicom(path, arr, bits_stored=12, WindowCenter=2048, WindowWidth=0)

    decoded = decode_image(path)

    np.testing.assert_array_equal(decoded.pixels, arr)
    assert any(note.startswith("VOI LUT/window ignored") for note in decoded.meta["notes"])


def test_bits_stored_masks_garbage_high_bits(tmp_path):
    true_values = RNG.integers(0, 4096, (16, 16), dtype=np.uint16)
    stored = true_values | np.uint16(0xA000)  # overlay junk in the four unused bits
    path = tmp_path / "garbage_bits.dcm"
    write_dicom(path, stored, bits_stored=12)

    decoded = decode_image(path)

    np.testing.assert_array_equal(decoded.pixels, true_values)
    # ...and the file is flagged: every stored value exceeds BitsStored (QC: bits_stored_exceeded).
    assert decoded.meta["bits_overflow"] == 1.0 and "exceed BitsStored 12" in " ".join(decoded.meta["notes"])


def test_values_within_bits_stored_are_not_flagged(tmp_path):
    path = tmp_path / "clean12.dcm"
    write_dicom(path, RNG.integers(0, 4096, (16, 16), dtype=np.uint16), bits_stored=12)
    assert decode_image(path).meta["bits_overflow"] == 0.0
    few = RNG.integers(0, 4096, (16, 16), dtype=np.uint16)
    few[0, :4] = 5000  # four values of 256 beyond 12 bits
    write_dicom(path, few, bits_stored=12)
    assert decode_image(path).meta["bits_overflow"] == pytest.approx(4 / 256)


@pytest.mark.parametrize("top, bits", [(1000, 10), (4095, 12), (3500, 12), (16000, 14), (40000, 16), (2600, 16)])
def test_sixteen_bit_png_is_scaled_by_the_bits_it_uses(tmp_path, top, bits):
    """12-bit detector data saved as 16-bit PNG is scaled by 0..4095, not 0..65535 (where it looks black); an
    underexposed 16-bit film, whose brightest pixel stays under the top quarter of 12 bits, keeps 0..65535."""
    arr = np.linspace(0, top, 32 * 32).reshape(32, 32).astype(np.uint16)
    path = tmp_path / "export.png"
    Image.fromarray(arr).save(path)
    decoded = decode_image(path)
    assert decoded.meta["bits"] == bits and decoded.meta["value_range"] == (0.0, float(2**bits - 1))
    np.testing.assert_array_equal(decoded.pixels, arr)


def test_signed_16_bit_pixels_keep_their_sign(tmp_path):
    arr = RNG.integers(-32768, 32768, (16, 16), dtype=np.int16)
    arr[0, :2] = (-32768, 32767)
    path = tmp_path / "signed.dcm"
    write_dicom(path, arr)

    decoded = decode_image(path)

    np.testing.assert_array_equal(decoded.pixels, arr)
    assert decoded.meta["value_range"] == (-32768.0, 32767.0)


def test_multi_frame_uses_first_frame_with_note(tmp_path):
    frames = RNG.integers(0, 4096, (3, 12, 10), dtype=np.uint16)
    path = tmp_path / "multi.dcm"
    write_dicom(path, frames, bits_stored=12, frames=3)

    decoded = decode_image(path)

    np.testing.assert_array_equal(decoded.pixels, frames[0])
    assert decoded.meta["n_frames"] == 3
    assert "multi-frame: first frame of 3 used" in decoded.meta["notes"]


def test_rgb_dicom_with_equal_channels_becomes_gray(tmp_path):
    gray = RNG.integers(0, 256, (12, 10), dtype=np.uint8)
    path = tmp_path / "rgb.dcm"
    write_dicom(path, np.stack([gray] * 3, axis=-1), photometric="RGB")

    decoded = decode_image(path)

    np.testing.assert_array_equal(decoded.pixels, gray)
    assert "RGB with equal channels converted to gray" in decoded.meta["notes"]


def test_truly_colour_dicom_is_rejected(tmp_path):
    colour = RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    path = tmp_path / "colour.dcm"
    write_dicom(path, colour, photometric="RGB")

    with pytest.raises(DecodeError) as caught:
        decode_image(path)

    assert caught.value.reason == "truly_colour"


def test_dicom_without_preamble_is_detected_by_content(tmp_path):
    arr = RNG.integers(0, 4096, (8, 8), dtype=np.uint16)
    full = tmp_path / "full.dcm"
    write_dicom(full, arr, bits_stored=12)
    bare = tmp_path / "bare.bin"
    bare.write_bytes(full.read_bytes()[132:])

    np.testing.assert_array_equal(decode_image(bare).pixels, arr)


def test_dataset_without_file_meta_or_preamble_is_decoded(tmp_path):
    arr = RNG.integers(0, 4096, (8, 8), dtype=np.uint16)
    ds = make_dataset(arr, bits_stored=12)
    ds.PixelData = arr.tobytes()
    buffer = io.BytesIO()
    # Old ACR-NEMA style export: implicit VR, no file meta group, no preamble.
    writer = pydicom.filebase.DicomFileLike(buffer)
    writer.is_implicit_VR, writer.is_little_endian = True, True
    pydicom.filewriter.write_dataset(writer, ds)
    path = tmp_path / "raw_dataset"
    path.write_bytes(buffer.getvalue())

    np.testing.assert_array_equal(decode_image(path).pixels, arr)


def test_dicom_without_pixel_data_is_rejected(tmp_path):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    path = tmp_path / "report.dcm"
    ds.save_as(path, enforce_file_format=True)

    with pytest.raises(DecodeError) as caught:
        decode_image(path)

    assert caught.value.reason == "no_pixel_data"


# ---------------------------------------------------------------------------------------------
# PNG and JPEG


def test_png_16_bit_keeps_full_precision(tmp_path):
    arr = RNG.integers(0, 65536, (20, 24), dtype=np.uint16)
    arr[0, :3] = (1, 65534, 65535)
    path = tmp_path / "deep.png"
    path.write_bytes(encode_pillow(arr, "PNG"))

    decoded = decode_image(path)

    np.testing.assert_array_equal(decoded.pixels, arr)
    assert decoded.meta["format"] == "png" and decoded.meta["bits"] == 16
    assert decoded.meta["value_range"] == (0.0, 65535.0)


def test_png_8_bit_gray(tmp_path):
    arr = RNG.integers(0, 256, (20, 24), dtype=np.uint8)
    path = tmp_path / "gray.png"
    path.write_bytes(encode_pillow(arr, "PNG"))

    decoded = decode_image(path)

    np.testing.assert_array_equal(decoded.pixels, arr)
    assert decoded.meta["bits"] == 8 and decoded.meta["notes"] == [] and decoded.meta["view"] is None


@pytest.mark.parametrize("channels", [3, 4], ids=["rgb", "rgba"])
def test_png_with_equal_colour_channels_becomes_gray(tmp_path, channels):
    gray = RNG.integers(0, 256, (20, 24), dtype=np.uint8)
    planes = [gray] * 3 + ([RNG.integers(0, 256, gray.shape, dtype=np.uint8)] if channels == 4 else [])
    path = tmp_path / "colour_type.png"
    path.write_bytes(encode_pillow(np.stack(planes, axis=-1), "PNG"))

    decoded = decode_image(path)

    np.testing.assert_array_equal(decoded.pixels, gray)
    assert "RGB with equal channels converted to gray" in decoded.meta["notes"]
    assert ("alpha channel dropped" in decoded.meta["notes"]) == (channels == 4)


def test_truly_colour_png_is_rejected(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(encode_pillow(RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8), "PNG"))

    with pytest.raises(DecodeError) as caught:
        decode_image(path)

    assert caught.value.reason == "truly_colour"


def test_jpeg_gray_and_gray_saved_as_rgb(tmp_path):
    gray = smooth_image().astype(np.uint8)
    gray_path, rgb_path = tmp_path / "gray.jpg", tmp_path / "rgb.jpg"
    gray_path.write_bytes(encode_pillow(gray, "JPEG", quality=95))
    rgb_path.write_bytes(encode_pillow(np.stack([gray] * 3, axis=-1), "JPEG", quality=95))

    for path in (gray_path, rgb_path):
        decoded = decode_image(path)
        assert decoded.meta["format"] == "jpeg" and decoded.meta["bits"] == 8
        assert np.abs(decoded.pixels - gray).mean() < 1.5


def test_format_comes_from_bytes_not_extension(tmp_path):
    arr = RNG.integers(0, 256, (6, 7), dtype=np.uint8)
    path = tmp_path / "mislabelled.dcm"
    path.write_bytes(encode_pillow(arr, "PNG"))

    decoded = decode_image(path)

    assert decoded.meta["format"] == "png"
    np.testing.assert_array_equal(decoded.pixels, arr)


# ---------------------------------------------------------------------------------------------
# Unusable files


def _reason(path) -> str:
    with pytest.raises(DecodeError) as caught:
        decode_image(path)
    return caught.value.reason


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    assert _reason(path) == "empty_file"


def test_truncated_dicom_and_png(tmp_path):
    arr = RNG.integers(0, 4096, (32, 32), dtype=np.uint16)
    dicom_path, png_path = tmp_path / "whole.dcm", tmp_path / "whole.png"
    write_dicom(dicom_path, arr, bits_stored=12)
    png_path.write_bytes(encode_pillow(arr, "PNG"))

    for path in (dicom_path, png_path):
        data = path.read_bytes()
        half = tmp_path / f"half{path.suffix}"
        half.write_bytes(data[: len(data) // 2])
        assert _reason(half) == "truncated"


def test_dicom_cut_inside_file_meta(tmp_path):
    path = tmp_path / "whole.dcm"
    write_dicom(path, np.zeros((4, 4), dtype=np.uint16))
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[:200])
    assert _reason(cut) == "truncated"


def test_random_bytes_and_garbage_after_dicm(tmp_path):
    noise = tmp_path / "noise.dcm"
    noise.write_bytes(RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert _reason(noise) == "unknown_format"

    fake = tmp_path / "fake.dcm"
    fake.write_bytes(bytes(128) + b"DICM" + RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert _reason(fake) in {"unreadable", "no_pixel_data", "truncated"}


def test_codec_panic_becomes_decode_error(tmp_path):
    """pylibjpeg-rle (Rust) panics on a run that overflows its segment; the panic is a BaseException."""
    arr = np.zeros((2, 4), dtype=np.uint16)
    overflowing = bytes([0x81, 0]) + bytes(7)  # "repeat 0 128 times" in an 8-byte segment
    literal = bytes([7]) + bytes(range(8))
    header = struct.pack("<16I", 2, 64, 64 + len(overflowing), *([0] * 13))
    path = tmp_path / "bad_rle.dcm"
    write_encapsulated(path, arr, header + overflowing + literal, RLELossless)

    assert _reason(path) == "undecodable"


def test_mutated_files_give_an_image_or_a_decode_error(tmp_path):
    """Cut and byte-flipped copies of valid files: nothing but DecodeError may escape."""
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 4096, (24, 24), dtype=np.uint16)
    native, rle, png = tmp_path / "native.dcm", tmp_path / "rle.dcm", tmp_path / "image.png"
    write_dicom(native, arr, bits_stored=12, WindowCenter=2000, WindowWidth=1000)
    ds = make_dataset(arr, bits_stored=12)
    ds.compress(RLELossless, arr)
    ds.save_as(rle, enforce_file_format=True)
    png.write_bytes(encode_pillow(arr, "PNG"))
    mutant = tmp_path / "mutant"

    for source in (native, rle, png):
        data = source.read_bytes()
        for trial in range(30):
            damaged = bytearray(data[: rng.integers(1, len(data))] if trial % 2 else data)
            for position in rng.integers(0, len(damaged), size=3 * (trial % 2 == 0)):
                damaged[position] = rng.integers(0, 256)
            mutant.write_bytes(bytes(damaged))
            try:
                decoded = decode_image(mutant)
            except DecodeError:
                continue
            assert decoded.pixels.ndim == 2 and decoded.pixels.dtype == np.float32
            assert np.isfinite(decoded.pixels).all()


def test_missing_file_and_directory(tmp_path):
    assert _reason(tmp_path / "absent.dcm") == "missing_file"
    assert _reason(tmp_path) == "not_a_file"


def test_entries_that_are_not_regular_files_are_never_read(tmp_path):
    """A FIFO would block a reader forever: it is refused without reading. So are devices, link loops and
    links to directories; each with its own reason. (Run with a timeout by the caller: a hang is the failure.)"""
    import os
    import threading

    os.mkfifo(tmp_path / "pipe")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    os.symlink("/dev/null", tmp_path / "device_link")
    os.symlink(tmp_path, tmp_path / "dir_link")
    os.symlink(tmp_path / "absent", tmp_path / "dangling")
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(
        {name: _error(tmp_path / name) for name in ["pipe", "loop", "device_link", "dir_link", "dangling"]}), daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "decoding a FIFO blocked"
    assert {k: (e.reason, e.detail) for k, e in outcome.items() if k != "loop" and k != "dangling"} == {
        "pipe": ("not_a_file", "fifo"), "device_link": ("not_a_file", "character_device"),
        "dir_link": ("not_a_file", "directory")}
    assert outcome["loop"].reason == "symlink_loop" and outcome["dangling"].reason == "missing_file"


def _error(path):
    try:
        decode_image(path)
    except DecodeError as err:
        return err
    raise AssertionError(f"{path} decoded")


def test_decode_error_names_file_and_survives_pickling(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(DecodeError) as caught:
        decode_image(path)

    clone = pickle.loads(pickle.dumps(caught.value))
    assert (clone.reason, clone.path) == ("empty_file", str(path))
    assert str(path) in str(clone)


# ---------------------------------------------------------------------------------------------
# Header and view rules


def test_read_dicom_header_reads_tags_without_pixels(tmp_path):
    path = tmp_path / "header.dcm"
    write_dicom(path, np.zeros((4, 4), dtype=np.uint16), PatientAge="030M", ViewPosition="LL", PatientSex="O")

    meta = read_dicom_header(path)

    assert meta["format"] == "dicom" and meta["age"] == 2 and meta["view"] == "LL" and meta["sex"] is None
    assert is_excluded_view(meta) == "lateral_view"


def test_read_dicom_header_rejects_non_dicom(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(encode_pillow(np.zeros((4, 4), dtype=np.uint8), "PNG"))
    with pytest.raises(DecodeError) as caught:
        read_dicom_header(path)
    assert caught.value.reason == "not_dicom"


def test_age_falls_back_to_birth_and_study_dates(tmp_path):
    path = tmp_path / "dates.dcm"
    write_dicom(path, np.zeros((4, 4), dtype=np.uint16), PatientAge="", PatientBirthDate="19550103")
    assert read_dicom_header(path)["age"] == 64  # study 2020-01-02, one day before the birthday


@pytest.mark.parametrize(
    ("text", "years"),
    [("065Y", 65), ("030M", 2), ("010W", 0), ("005D", 0), ("45", 45), ("", None), ("abc", None), (None, None)],
)
def test_parse_dicom_age(text, years):
    assert parse_dicom_age(text) == years


@pytest.mark.parametrize(
    ("view", "body_part", "reason"),
    [
        ("PA", "CHEST", None),
        ("AP", None, None),
        (None, "", None),
        ("LL", "CHEST", "lateral_view"),
        ("RL", None, "lateral_view"),
        ("LATERAL", "CHEST", "lateral_view"),
        ("lat", None, "lateral_view"),
        ("LLD", "CHEST", None),
        ("PA", "THORAX", None),
        ("AP", "port chest", None),
        ("PA", "LUNG", None),
        ("PA", "ABDOMEN", "not_chest"),
        ("AP", "KNEE", "not_chest"),
    ],
)
def test_is_excluded_view(view, body_part, reason):
    assert is_excluded_view({"view": view, "body_part": body_part}) == reason
