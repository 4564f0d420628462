"""Duplicate images under different ids: exact copies (bytes, pixels) and near copies (re-encoded, resized)."""

import io
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrflow.duplicates import NEAR_BITS, duplicate_summary, find_duplicates, hamming_matrix, near_pairs
from cxrflow.preprocess import process_image


def fingerprints(paths: dict, size=64) -> pd.DataFrame:
    rows = []
    for image_id, path in paths.items():
        record, _ = process_image(str(path), size, {})
        rows.append({"image_id": image_id, **{k: record.get(k) for k in ("status", "content_hash", "pixel_hash", "phash")}})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("block", [64, 3])
def test_banded_search_finds_exactly_the_pairs_of_a_full_comparison(monkeypatch, block):
    import cxrflow.duplicates

    monkeypatch.setattr(cxrflow.duplicates, "BLOCK", block)  # 3: buckets are compared in many blocks
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (40, 32), dtype=np.uint8)
    flips = np.packbits(rng.random((40, 256)) < 0.04, axis=1)  # ~10 of 256 bits flipped
    hashes = np.concatenate([base, base ^ flips, np.repeat(base[:1], 12, axis=0)])  # and one hash 13 times
    full = hamming_matrix(hashes, hashes)
    for max_bits in (0, 5, 12, 20):
        expected = {(i, j) for i, j in zip(*np.nonzero(np.triu(full <= max_bits, k=1)))}
        assert {tuple(p) for p in near_pairs(hashes, max_bits).tolist()} == expected, max_bits


def test_groups_are_transitive_and_only_duplicates_are_listed():
    table = pd.DataFrame({
        "image_id": ["a", "b", "c", "d", "e", "f"],
        "content_hash": ["h1", "h1", "h2", "h3", None, "h4"],
        "pixel_hash": ["p1", "p1", "p2", "p2", None, "p4"],  # c and d: same pixels, different files
        "phash": ["00" * 32, "00" * 32, "ff" * 32, "ff" * 32, None, "0f" * 32],
    })
    out = find_duplicates(table, near_bits=4).set_index("image_id")
    assert set(out.index) == {"a", "b", "c", "d"}
    assert out.loc["a", "group"] == out.loc["b", "group"] == "a" and out.loc["c", "group"] == out.loc["d", "group"] == "c"
    assert (out["kind"] == "exact").all()
    near = table.assign(content_hash=list("uvwxyz"), pixel_hash=list("uvwxyz"))
    near.loc[5, "phash"] = "00" * 31 + "07"  # 3 bits from a's hash
    out = find_duplicates(near, near_bits=4).set_index("image_id")
    assert out.loc["f", "group"] == "a" and out.loc["f", "kind"] == "near"
    assert "e" not in out.index, "an undecodable image has no fingerprint and no duplicate"
    assert duplicate_summary(out.reset_index())["near_groups"] == 2


@pytest.fixture(scope="module")
def nih_sample(shared_data):
    labels = pd.read_csv(shared_data / "nih1000" / "labels.csv")
    return [shared_data / p for p in labels["image_path"]]


def test_reencoded_and_resized_copies_are_near_duplicates_and_distinct_images_are_not(nih_sample, tmp_path):
    """The threshold's evidence: 40 NIH images, each with an exact copy, an RGBA re-save (same pixels), JPEG 75
    and 90 re-encodes, a 0.5x and 0.75x resize and a 2x upscale saved as JPEG. Every copy lands in its original's
    group with the right kind, and no two originals share a group."""
    paths, origin = {}, {}
    for n, source in enumerate(nih_sample[::25]):
        grey = Image.open(source).convert("L")
        base = f"img{n:02d}"
        paths[base], origin[base] = source, base
        shutil.copy(source, tmp_path / f"{base}_copy.png")
        grey.convert("RGBA").save(tmp_path / f"{base}_rgba.png")
        grey.save(tmp_path / f"{base}_q75.jpg", quality=75)
        grey.save(tmp_path / f"{base}_q90.jpg", quality=90)
        grey.resize((32, 32), Image.Resampling.LANCZOS).save(tmp_path / f"{base}_half.png")
        grey.resize((48, 48), Image.Resampling.LANCZOS).save(tmp_path / f"{base}_three_quarter.png")
        grey.resize((128, 128), Image.Resampling.BICUBIC).save(tmp_path / f"{base}_up.jpg", quality=80)
        for variant in ("copy", "rgba", "q75", "q90", "half", "three_quarter", "up"):
            file = next(tmp_path.glob(f"{base}_{variant}.*"))
            paths[f"{base}_{variant}"], origin[f"{base}_{variant}"] = file, base
    table = fingerprints(paths)
    assert (table["status"] == "ok").all()
    out = find_duplicates(table, NEAR_BITS).set_index("image_id")
    assert set(out.index) == set(paths), sorted(set(paths) - set(out.index))
    groups = out["group"].groupby(pd.Series(origin)).nunique()
    assert (groups == 1).all(), groups[groups > 1]
    assert out.loc[list(origin)].groupby(pd.Series(origin))["group"].first().nunique() == len(groups), "originals merged"
    kinds = out["kind"].groupby(lambda i: i.split("_", 1)[1] if "_" in i else "original").apply(lambda k: set(k))
    assert kinds["copy"] == kinds["rgba"] == kinds["original"] == {"exact"}
    assert all(kinds[v] == {"near"} for v in ("q75", "q90", "half", "three_quarter", "up")), kinds.to_dict()


def test_nih1000_duplicate_groups(nih_sample):
    """How many duplicate groups NIH1000 has (the repository it came from spreads patients over its folders).
    Measured: no exact duplicates (bytes or pixels) and no near duplicates at 12 bits; the closest distinct pair
    is 34 bits apart (two follow-up films of one patient), so the near threshold could not have merged any."""
    table = fingerprints({p.name: p for p in nih_sample})
    assert (table["status"] == "ok").all() and len(table) == 1000
    out = find_duplicates(table, NEAR_BITS)
    summary = duplicate_summary(out)
    packed = np.array([np.frombuffer(bytes.fromhex(h), dtype=np.uint8) for h in table["phash"]])
    distances = hamming_matrix(packed, packed)
    np.fill_diagonal(distances, 10**6)
    print(f"\nNIH1000 duplicates: {summary}; identical file bytes "
          f"{int(table['content_hash'].duplicated(keep=False).sum())}, identical pixels "
          f"{int(table['pixel_hash'].duplicated(keep=False).sum())}; closest pHash pair {distances.min()} bits")
    assert summary["groups"] == 0 and distances.min() > NEAR_BITS


def test_the_config_default_is_the_measured_threshold(root):
    import yaml

    schema = yaml.safe_load((root / "workflow/schemas/config.schema.yaml").read_text())
    assert schema["properties"]["quality"]["properties"]["near_duplicate_bits"]["default"] == NEAR_BITS


def test_look_alike_synthetic_images_and_blank_images_are_not_near_duplicates(tiny_pipeline):
    """The synthetic archive renders every image from one template, so its distinct images look more alike than
    real ones (from 12-14 bits apart); and its blank images have no perceptual hash. At the demo's 64 px, none
    may be merged."""
    catalog = tiny_pipeline["catalog"]
    table = fingerprints(dict(zip(catalog["image_id"], catalog["path"])), size=64)
    out = find_duplicates(table, NEAR_BITS)
    assert (out["kind"] == "exact").all(), out[out["kind"] == "near"]
    flat = table[table["phash"].isna() & (table["status"] == "ok")]
    print(f"\nsynthetic: {len(table)} images, {len(out)} in exact groups, {len(flat)} blank without a pHash")
