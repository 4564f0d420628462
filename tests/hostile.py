"""Writers for the hostile-input corpus: every kind of bad file or table a hospital export can contain."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def chest(size=(96, 80), seed=0) -> np.ndarray:
    """A plausible grey image in [0, 1] that passes QC: a bright central band with two darker lung fields beside
    it, as a frontal film has (QC's `inverted` rule looks for exactly that; inverted, it fails)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[0], 0 : size[1]]
    image = 0.5 + 0.3 * np.sin(x / size[1] * np.pi) * np.cos(y / size[0] * 2) + rng.normal(0, 0.03, size)
    rows, cols = y / size[0], x / size[1]
    for centre in (0.28, 0.72):
        image -= 0.25 * np.exp(-(((cols - centre) / 0.12) ** 2 + ((rows - 0.5) / 0.25) ** 2))
    return np.clip(image, 0, 1)


def dicom(path: Path, pixels: np.ndarray | None, **tags) -> Path:
    """Write a DICOM file; pixels None = an object without pixel data (like SR or a presentation state)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = "P-HOSTILE"
    ds.PatientSex = "F"
    ds.PatientAge = "065Y"
    ds.ViewPosition = "PA"
    for key, value in tags.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    if pixels is not None:
        frames = pixels if pixels.ndim == 3 and tags.get("SamplesPerPixel", 1) == 1 else None
        ds.Rows, ds.Columns = pixels.shape[-2:] if frames is not None else pixels.shape[:2]
        ds.SamplesPerPixel = tags.get("SamplesPerPixel", 1)
        ds.PhotometricInterpretation = tags.get("PhotometricInterpretation", "MONOCHROME2")
        if ds.SamplesPerPixel == 3:
            ds.PlanarConfiguration = 0
        if frames is not None:
            ds.NumberOfFrames = pixels.shape[0]
        signed = pixels.dtype.kind == "i"
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored = tags.get("BitsStored", ds.BitsAllocated)
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = int(signed)
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def write_corpus(folder: Path) -> dict[str, tuple[str, str]]:
    """Write one file per hostile kind. Returns {file name: (expected outcome, expected reason)}:
    outcome "ok" (used), "qc" (left out by QC with that reason) or "unreadable" (left out, decode reason)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = chest()
    g12 = (good * 4095).astype(np.uint16)
    expected = {}

    def add(name, outcome, reason=""):
        expected[name] = (outcome, reason)

    (folder / "zero.png").write_bytes(b"")
    add("zero.png", "unreadable", "empty_file")
    png(folder / "whole.png", (good * 255).astype(np.uint8))
    data = (folder / "whole.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    add("whole.png", "ok")
    add("truncated.png", "unreadable", "")
    (folder / "random.dcm").write_bytes(np.random.default_rng(1).bytes(4096))
    add("random.dcm", "unreadable", "")
    dicom(folder / "nopixels.dcm", None)
    add("nopixels.dcm", "unreadable", "no_pixel_data")
    dicom(folder / "multiframe.dcm", np.stack([g12, g12 // 2, g12 // 3]), BitsStored=12)
    add("multiframe.dcm", "ok")
    rgb = np.repeat((good * 255).astype(np.uint8)[..., None], 3, axis=2)
    dicom(folder / "rgb.dcm", rgb, SamplesPerPixel=3, PhotometricInterpretation="RGB")
    add("rgb.dcm", "ok")
    colour = rgb.copy()
    colour[..., 0] = 255 - colour[..., 0]
    dicom(folder / "colour.dcm", colour, SamplesPerPixel=3, PhotometricInterpretation="RGB")
    add("colour.dcm", "unreadable", "truly_colour")
    dicom(folder / "signed16.dcm", (good * 3000 - 1000).astype(np.int16), BitsStored=12)
    add("signed16.dcm", "ok")
    dicom(folder / "mono1.dcm", (4095 - g12).astype(np.uint16), BitsStored=12, PhotometricInterpretation="MONOCHROME1")
    add("mono1.dcm", "ok")
    dicom(folder / "no_patient_tags.dcm", g12, BitsStored=12, PatientID=None, PatientSex=None)
    add("no_patient_tags.dcm", "ok")
    dicom(folder / "lateral.dcm", g12, BitsStored=12, ViewPosition="LL")
    add("lateral.dcm", "unreadable", "lateral_view")
    png(folder / "onepixel.png", np.array([[128]], dtype=np.uint8))
    add("onepixel.png", "qc", "too_small")
    png(folder / "elongated.png", (chest((400, 40)) * 255).astype(np.uint8))
    add("elongated.png", "qc", "elongated")
    png(folder / "sixteen.png", (good * 65535).astype(np.uint16))
    add("sixteen.png", "ok")
    rgba = np.dstack([rgb, np.full(good.shape, 255, np.uint8)])
    png(folder / "rgba.png", rgba)
    add("rgba.png", "ok")
    png(folder / "dark.png", (good * 12).astype(np.uint8))
    add("dark.png", "qc", "too_dark")

    # Not a radiograph: pixel noise decodes, and its median and range look normal.
    png(folder / "noise.png", np.random.default_rng(2).integers(0, 256, (400, 400), dtype=np.uint8))
    add("noise.png", "qc", "not_radiograph")
    # 12-bit detector data exported as 16-bit PNG: scaled by 0..4095, not rejected as too dark.
    png(folder / "twelve_in_sixteen.png", g12)
    add("twelve_in_sixteen.png", "ok")
    # Stored values beyond BitsStored: the decoder masks them to 12 bits, which scrambles the image.
    dicom(folder / "bits_over.dcm", (good * 65535).astype(np.uint16), BitsStored=12)
    add("bits_over.dcm", "qc", "bits_stored_exceeded")
    # Negative films: an inverted PNG and JPEG, and MONOCHROME1 data tagged MONOCHROME2.
    png(folder / "inverted.png", ((1 - good) * 255).astype(np.uint8))
    add("inverted.png", "qc", "inverted")
    Image.fromarray(((1 - good) * 255).astype(np.uint8)).save(folder / "inverted_jpeg.jpg", quality=90)
    add("inverted_jpeg.jpg", "qc", "inverted")
    dicom(folder / "mono1_as_mono2.dcm", (4095 - g12).astype(np.uint16), BitsStored=12)
    add("mono1_as_mono2.dcm", "qc", "inverted")
    # Duplicates under other ids: a byte copy of whole.png, and a 2x upscaled JPEG re-encode of it (10 bits from
    # whole.png's perceptual hash; a half-size copy of this synthetic image is 28 away, as its pixel noise is
    # much of its content, where real radiographs' half-size copies stay within 12).
    (folder / "copy_of_whole.png").write_bytes(data)
    add("copy_of_whole.png", "ok")
    Image.fromarray((good * 255).astype(np.uint8)).resize((160, 192), Image.Resampling.BICUBIC).save(
        folder / "whole_big.jpg", quality=85)
    add("whole_big.jpg", "ok")
    # A FIFO: reading it would block the run forever. Left out unread (by ingest's listing or by the decoder).
    os.mkfifo(folder / "pipe.png")
    add("pipe.png", "unreadable", "not_a_file")
    return expected


# The duplicate groups the corpus plants (file stems): exact copies by bytes or by decoded pixels, and a near one.
PLANTED_DUPLICATES = {"whole": "exact", "copy_of_whole": "exact", "rgba": "exact", "rgb": "exact",
                      "whole_big": "near"}
