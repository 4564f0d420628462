"""Preprocessing shards: decode + QC + normalize on real files, bad files recorded not fatal, the tensor cache."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrflow.quality import apply_rules
from cxrflow.tensors import TensorCache, normalize, preprocess_shard, resize_with_padding, shard_of

QC = {"min_size": 32, "max_aspect": 2.5, "blank_std": 0.02, "dark_p50": 0.08, "bright_p50": 0.92,
      "min_dynamic_range": 0.15, "max_clipped_white": 0.25, "max_line_score": 0.35}


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
