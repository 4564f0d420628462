"""Preprocessing shards: decode + QC + normalize on real files, bad files recorded not fatal, the tensor cache."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage.measure import shannon_entropy

from cxrflow.errors import CxrflowError
from cxrflow.quality import apply_rules
from cxrflow.preprocess import normalize, preprocess_shard, process_image, resize_with_padding, shard_of
from cxrflow.synthetic import render
from cxrflow.tensors import TensorCache

QC = {"min_size": 32, "max_aspect": 2.5, "blank_std": 0.02, "dark_p50": 0.08, "bright_p50": 0.92,
      "min_dynamic_range": 0.15, "max_clipped_white": 0.25, "max_line_score": 0.35}


IMAGE_LIBRARIES = ("PIL", "skimage", "scipy")
# Imported one after another in one fresh interpreter (this session has long imported them all); each prints the
# image libraries loaded so far, so a failure names the first module that pulls one in.
PROBE = """import importlib, sys
for module in sys.argv[1:]:
    importlib.import_module(module)
    print(module, *sorted(m for m in {libraries!r} if m in sys.modules))
"""


def loaded_by(root, *modules) -> dict[str, list[str]]:
    result = subprocess.run([sys.executable, "-c", PROBE.format(libraries=IMAGE_LIBRARIES), *modules],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(root / "src")})
    assert result.returncode == 0, result.stderr[-2000:]
    return {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}


def test_reading_the_cache_imports_no_image_library(root):
    """Training, evaluation and prediction read the cache; only the writer (cxrflow.preprocess) needs Pillow,
    scikit-image and SciPy, so a bare GPU node can run them."""
    readers = ["cxrflow.tensors", "cxrflow.inference", "cxrflow.train"]
    assert loaded_by(root, *readers) == {module: [] for module in readers}


def test_the_writer_does_import_them(root):
    """The probe above can fail: the writer's own import pulls in Pillow and scikit-image."""
    assert {"PIL", "skimage"} <= set(loaded_by(root, "cxrflow.preprocess")["cxrflow.preprocess"])


def test_resize_preserves_aspect_and_pads():
    image = np.ones((200, 100), np.float32)
    out, (top, left, h, w) = resize_with_padding(image, 64)
    assert out.shape == (64, 64) and (h, w) == (64, 32) and (top, left) == (0, 16)
    assert out[:, :16].max() == 0 and out[:, 16:48].min() > 0.99


def test_resize_is_antialiased():
    stripes = np.ones((512, 512), np.float32)
    stripes[::2] = 0.0  # point sampling every 8th row would see only black: aliasing
    out, _ = resize_with_padding(stripes, 64)
    assert abs(out.mean() - 0.5) < 0.02 and out.std() < 0.05


def test_normalize_is_uint8_and_percentile_clipped():
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(0.5, 0.1, (300, 300)), 0, 1).astype(np.float32)
    image[0, 0] = 1.0  # one hot pixel must not set the white point
    out = normalize(image, 64, clip_percentiles=(1, 99))
    assert out.dtype == np.uint8 and out.shape == (64, 64)
    assert out.min() == 0 and out.max() == 255
    assert 0.005 < (out == 255).mean() < 0.03


def write_png(path, array):
    Image.fromarray(array).save(path)


def test_shard_with_good_and_corrupt_files_never_crashes(tmp_path):
    rng = np.random.default_rng(1)
    good = (np.clip(rng.normal(120, 40, (100, 90)), 0, 255)).astype(np.uint8)
    write_png(tmp_path / "good.png", good)
    write_png(tmp_path / "good16.png", (good.astype(np.uint16) * 200))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "random.dcm").write_bytes(rng.bytes(5000))
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    names = ["good.png", "good16.png", "empty.png", "random.dcm", "truncated.png", "absent.png"]
    catalog = pd.DataFrame({"image_id": names, "path": [str(tmp_path / n) for n in names]})
    table = preprocess_shard(catalog, 0, 1, 32, {}, tmp_path / "shard_0000.npy", tmp_path / "shard.parquet")
    status = table.set_index("image_id")["status"]
    assert status["good.png"] == status["good16.png"] == "ok"
    assert all(status[n].startswith("unreadable:") for n in ["empty.png", "random.dcm", "truncated.png", "absent.png"])
    array = np.load(tmp_path / "shard_0000.npy", mmap_mode="r")
    assert array.shape == (6, 32, 32) and array[0].max() > 0
    assert not list(tmp_path.glob("*.tmp")), "no temporary files left behind"
    cache = TensorCache.open(tmp_path / "shard.parquet", [tmp_path / "shard_0000.npy"])
    loaded = cache.load(["good16.png", "good.png"])
    assert np.array_equal(loaded[1], array[0])
    # The 8-bit and 16-bit versions of one picture normalize to nearly the same tensor.
    assert np.abs(loaded[0].astype(int) - loaded[1].astype(int)).mean() < 2


def test_shards_partition_the_catalog():
    ids = pd.Series([f"img{i}" for i in range(1000)])
    shards = shard_of(ids, 4)
    assert set(shards) == {0, 1, 2, 3} and min(np.bincount(shards)) > 200
    assert (shard_of(ids[:10], 4) == shards[:10]).all(), "stable: does not depend on the other images"


def test_real_nih_images_pass_qc_and_normalize(shared_data, tmp_path):
    labels = pd.read_csv(shared_data / "nih1000" / "labels.csv").head(200)
    catalog = pd.DataFrame({"image_id": labels["image_path"], "path": [str(shared_data / p) for p in labels["image_path"]]})
    table = preprocess_shard(catalog, 0, 1, 64, {}, tmp_path / "shard_0000.npy", tmp_path / "shard.parquet")
    assert (table["status"] == "ok").all()
    judged = apply_rules(table, QC)
    print("\nNIH1000 QC on 200 real images:", judged["qc_reason"].value_counts(dropna=False).to_dict())
    assert judged["qc_pass"].mean() >= 0.95
    array = np.load(tmp_path / "shard_0000.npy")
    assert array.shape == (200, 64, 64)
    assert np.percentile(array.reshape(200, -1).std(axis=1), 5) > 30, "normalized images use the intensity range"


def write_dicom(path, stored: np.ndarray, transfer_syntax=None, **tags):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = stored.astype(np.uint16).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    if transfer_syntax is not None:
        ds.compress(transfer_syntax)
    ds.save_as(path, enforce_file_format=True)


def reference_process(pixels: np.ndarray, value_range, size: int, clip=(0.5, 99.5)) -> tuple[dict, np.ndarray]:
    """The straightforward version of process_image after decoding: float copies, exact Lanczos (no box
    reduction), np.percentile, scikit-image's entropy. The fast path must agree with it."""
    lo, hi = value_range
    unit = np.clip((pixels - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    step = max(1, max(unit.shape) // 512)
    small = unit[::step, ::step]
    metrics = dict(zip(["p01", "p05", "p50", "p95", "p99"], np.percentile(small, [1, 5, 50, 95, 99])))
    metrics.update(std=small.std(), entropy=shannon_entropy((small * 255).astype(np.uint8)))
    h, w = unit.shape
    new_h, new_w = round(h * size / max(h, w)), round(w * size / max(h, w))
    resized = np.asarray(Image.fromarray(unit, mode="F").resize((new_w, new_h), Image.Resampling.LANCZOS))
    resized = np.clip(resized, 0, 1)
    low, high = np.percentile(resized, clip)
    content = np.clip((resized - low) / (high - low), 0, 1)
    out = np.zeros((size, size), np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = content
    return metrics, np.round(out * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def radiograph_dicom(tmp_path_factory):
    """A rendered 12-bit chest radiograph, 1536 x 1280 (portrait, so the padding is exercised too)."""
    image = render({"enlarged_heart"}, np.random.default_rng(7), 1536)  # 1536 -> 380 box-reduces by 2 first
    stored = np.round(image[:, 128:-128] * 4095).astype(np.uint16)
    path = tmp_path_factory.mktemp("radiograph") / "x.dcm"
    write_dicom(path, stored)
    return path, stored


@pytest.mark.parametrize("size, mean_levels, max_levels", [(380, 0.3, 3), (64, 1.0, 8)])
def test_fast_process_image_matches_the_straightforward_computation(radiograph_dicom, size, mean_levels,
                                                                    max_levels):
    """Metrics equal; tensors within a level or so of exact Lanczos (the box pre-reduction, REDUCING_GAP, is
    the only approximation; at 64 px from 1.5k it averages 16 x 16 blocks where Lanczos weighs 72 x 72)."""
    path, stored = radiograph_dicom
    record, tensor = process_image(str(path), size, {})
    metrics, expected = reference_process(stored.astype(np.float32), (0.0, 4095.0), size)
    assert record["status"] == "ok" and (record["height"], record["width"]) == stored.shape
    for key, value in metrics.items():
        assert record[key] == pytest.approx(value, abs=1e-6), key
    difference = np.abs(tensor.astype(int) - expected.astype(int))
    print(f"\n{size} px: |fast - exact| = {difference.mean():.3f} levels on average, at most {difference.max()}")
    assert difference.mean() < mean_levels and difference.max() <= max_levels


def test_reversed_clip_percentiles_are_a_config_error():
    with pytest.raises(CxrflowError, match="image.clip_percentiles"):
        normalize(np.ones((10, 10), np.float32), 8, clip_percentiles=(99.5, 0.5))


def test_flat_image_stays_black_with_clahe():
    flat = np.full((80, 80), 0.4, np.float32)
    assert normalize(flat, 32, clahe=True).max() == 0
    rng = np.random.default_rng(8)
    textured = np.clip(rng.normal(0.5, 0.1, (80, 80)), 0, 1).astype(np.float32)
    assert normalize(textured, 32, clahe=True).std() > 30


def test_broken_dicoms_never_crash_a_shard(tmp_path):
    """Every way a DICOM archive breaks (cut, corrupt codestream, short pixel data, zero bytes, a folder, a
    lateral view) becomes a status row and a black tensor row; the good files around them still get tensors."""
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

    rng = np.random.default_rng(9)
    stored = np.round(render(set(), rng, 128) * 4095).astype(np.uint16)
    write_dicom(tmp_path / "good.dcm", stored)
    write_dicom(tmp_path / "good_j2k.dcm", stored, JPEG2000Lossless)
    write_dicom(tmp_path / "good_jls.dcm", stored, JPEGLSLossless)
    write_dicom(tmp_path / "lateral.dcm", stored, ViewPosition="LL")
    write_dicom(tmp_path / "short_pixels.dcm", stored[:64], Rows=128)  # header promises more rows than stored
    for name in ["good.dcm", "good_j2k.dcm", "good_jls.dcm"]:
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: int(len(data) * 0.7)])
    j2k = bytearray((tmp_path / "good_j2k.dcm").read_bytes())
    start = j2k.index(b"\xff\x4f\xff\x51")  # the codestream's SOC and SIZ markers
    j2k[start + 4 : start + 40] = b"\xff" * 36  # a SIZ segment that describes no image; file length unchanged
    (tmp_path / "corrupt_j2k.dcm").write_bytes(bytes(j2k))
    j2k = bytearray((tmp_path / "good_j2k.dcm").read_bytes())
    j2k[-3000:-1000] = rng.bytes(2000)  # garbage in the last code-blocks: openjpeg may still decode something
    (tmp_path / "garbled_j2k.dcm").write_bytes(bytes(j2k))
    (tmp_path / "zero.dcm").write_bytes(b"")
    (tmp_path / "folder.dcm").mkdir()
    names = ["good.dcm", "cut_good.dcm", "good_j2k.dcm", "cut_good_j2k.dcm", "corrupt_j2k.dcm", "good_jls.dcm",
             "cut_good_jls.dcm", "short_pixels.dcm", "zero.dcm", "folder.dcm", "lateral.dcm", "garbled_j2k.dcm"]
    catalog = pd.DataFrame({"image_id": names, "path": [str(tmp_path / n) for n in names]})
    table = preprocess_shard(catalog, 0, 1, 32, {}, tmp_path / "shard_0000.npy", tmp_path / "shard.parquet")
    status = table.set_index("image_id")["status"]
    print("\n" + status.to_string())
    good = ["good.dcm", "good_j2k.dcm", "good_jls.dcm"]
    assert (status[good] == "ok").all()
    assert status["lateral.dcm"] == "lateral_view"
    assert status["garbled_j2k.dcm"] == "ok" or status["garbled_j2k.dcm"].startswith("unreadable:")
    broken = [n for n in names if n not in good and n not in ("lateral.dcm", "garbled_j2k.dcm")]
    assert status[broken].str.startswith("unreadable:").all(), status[broken].to_dict()
    array = np.load(tmp_path / "shard_0000.npy")
    rows = table.set_index("image_id")["row"]
    assert np.array_equal(array[rows["good.dcm"]], array[rows["good_j2k.dcm"]]), "lossless: the same tensor"
    assert all(array[rows[n]].max() == 0 for n in broken + ["lateral.dcm"])


def test_every_image_lands_in_exactly_one_shard(tmp_path):
    rng = np.random.default_rng(10)
    names = [f"img{i:02d}.png" for i in range(12)]
    for name in names:
        write_png(tmp_path / name, (np.clip(rng.normal(120, 40, (40, 40)), 0, 255)).astype(np.uint8))
    catalog = pd.DataFrame({"image_id": names, "path": [str(tmp_path / n) for n in names]})
    tables = [preprocess_shard(catalog, s, 3, 16, {}, tmp_path / f"shard_{s:04d}.npy", tmp_path / f"{s}.parquet")
              for s in range(3)]
    index = pd.concat(tables, ignore_index=True)
    assert sorted(index["image_id"]) == names, "each image processed once, by one shard"
    index.to_parquet(tmp_path / "index.parquet")
    cache = TensorCache.open(tmp_path / "index.parquet", [tmp_path / f"shard_{s:04d}.npy" for s in range(3)])
    shuffled = list(rng.permutation(names))
    whole = cache.load(shuffled)
    batches = np.concatenate([cache.load(shuffled[i : i + 5]) for i in range(0, 12, 5)])
    assert np.array_equal(whole, batches)
    for name, image in zip(shuffled, whole):
        row = index.set_index("image_id").loc[name]
        assert np.array_equal(image, np.load(tmp_path / f"shard_{row['shard']:04d}.npy")[row["row"]])
    with pytest.raises(KeyError, match="absent.png"):
        cache.load(["img00.png", "absent.png"])


def test_the_shard_table_records_each_image_s_fingerprints(tmp_path):
    """File bytes, decoded pixels and a perceptual hash per image: a byte copy shares all three, an RGBA re-save
    the pixel hash, a 2x JPEG the perceptual hash only approximately; an unreadable file has none."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:96, 0:80]
    grey = np.clip(128 + 60 * np.sin(x / 80 * np.pi) + rng.normal(0, 4, (96, 80)), 0, 255).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "a.png")
    (tmp_path / "copy.png").write_bytes((tmp_path / "a.png").read_bytes())
    Image.fromarray(grey).convert("RGBA").save(tmp_path / "rgba.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    catalog = pd.DataFrame({"image_id": ["a", "copy", "rgba", "bad"],
                            "path": [str(tmp_path / f"{n}.png") for n in ["a", "copy", "rgba", "bad"]]})
    table = preprocess_shard(catalog, 0, 1, 32, {}, tmp_path / "s.npy", tmp_path / "s.parquet").set_index("image_id")
    assert table.loc["a", "content_hash"] == table.loc["copy", "content_hash"] != table.loc["rgba", "content_hash"]
    assert table.loc["a", "pixel_hash"] == table.loc["rgba", "pixel_hash"]
    assert table.loc["a", "phash"] == table.loc["rgba", "phash"] and len(table.loc["a", "phash"]) == 64
    assert table.loc["bad", ["content_hash", "pixel_hash", "phash"]].isna().all()
