"""Quality-control metrics and rules on images with known defects."""

import numpy as np
import pandas as pd
import pytest
from skimage.measure import shannon_entropy

from cxrflow.decode import decode_image
from cxrflow.errors import CxrflowError
from cxrflow.quality import (METRICS, RULES, apply_rules, grey_entropy, image_metrics, line_score, percentiles,
                             robust_bounds, to_unit_range)

DEFAULTS = {"min_size": 32, "max_aspect": 2.5, "blank_std": 0.02, "dark_p50": 0.08, "bright_p50": 0.92,
            "min_dynamic_range": 0.15, "max_clipped_white": 0.25, "max_line_score": 0.35}


def chest_like(rng, size=256):
    y, x = np.mgrid[0:size, 0:size] / size
    image = 0.55 + 0.25 * np.cos(3 * (x - 0.5)) * np.cos(2 * (y - 0.5)) - 0.3 * ((np.abs(x - 0.5) > 0.1) & (np.abs(x - 0.5) < 0.35))
    return np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1).astype(np.float32)


def judged(images: dict) -> pd.DataFrame:
    rows = [{"image_id": k, "status": "ok", **image_metrics(v)} for k, v in images.items()]
    return apply_rules(pd.DataFrame(rows), DEFAULTS).set_index("image_id")


def test_rules_catch_dark_bright_low_contrast_blank_lines_and_shape():
    rng = np.random.default_rng(0)
    good = chest_like(rng)
    lines = good.copy()
    lines[::40] = 1.0
    result = judged({
        "good": good,
        "dark": good * 0.1,
        "bright": np.clip(good * 0.2 + 0.85, 0, 1),
        "flat": 0.5 + (good - 0.5) * 0.15,
        "blank": np.full((256, 256), 0.4, np.float32),
        "lines": lines,
        "tiny": good[:16, :16],
        "elongated": good[:, :60],
    })
    assert result.loc["good", "qc_pass"]
    expected = {"dark": "too_dark", "bright": "too_bright", "flat": "low_contrast", "blank": "blank",
                "lines": "line_artifact", "tiny": "too_small", "elongated": "elongated"}
    for image_id, reason in expected.items():
        assert not result.loc[image_id, "qc_pass"]
        assert reason in result.loc[image_id, "qc_reasons"].split(";"), (image_id, result.loc[image_id, "qc_reasons"])


def test_undecodable_images_keep_their_decode_reason():
    frame = pd.DataFrame([{"image_id": "x", "status": "unreadable:truncated"}])
    for metric in ["height", "width", "aspect", "std", "p50", "dynamic_range", "clipped_white", "line_score"]:
        frame[metric] = np.nan
    out = apply_rules(frame, DEFAULTS)
    assert not out.loc[0, "qc_pass"] and out.loc[0, "qc_reason"] == "unreadable:truncated"


def test_robust_mode_flags_outliers():
    rng = np.random.default_rng(1)
    images = {f"g{i}": np.clip(chest_like(rng) * rng.uniform(0.9, 1.1), 0, 1) for i in range(30)}
    images["odd"] = np.clip(chest_like(rng) * 0.45, 0, 1)
    rows = [{"image_id": k, "status": "ok", **image_metrics(v)} for k, v in images.items()]
    out = apply_rules(pd.DataFrame(rows), {"mode": "robust", "robust_metrics": ["p50"], "robust_k": 5}).set_index("image_id")
    assert not out.loc["odd", "qc_pass"] and out.loc["odd", "qc_reason"] == "outlier_p50"
    assert out.drop(index="odd")["qc_pass"].all()


def test_line_score_separates_artifacts_from_anatomy():
    rng = np.random.default_rng(2)
    good = chest_like(rng)
    bad = good.copy()
    bad[100] = 1.0
    assert line_score(good) < 0.1 < 0.35 < line_score(bad)


def test_percentiles_match_numpy():
    rng = np.random.default_rng(3)
    for values in [rng.random((97, 53), dtype=np.float32), rng.integers(0, 4096, (64, 64)).astype(np.float32) / 4095,
                   np.full((10, 10), 0.25, np.float32), np.array([[0.7]], np.float32)]:
        qs = [0, 0.5, 1, 5, 50, 95, 99, 99.5, 100]
        assert np.allclose(percentiles(values, qs), np.percentile(values, qs), rtol=0, atol=1e-7)


def test_entropy_equals_scikit_image():
    rng = np.random.default_rng(4)
    for image in [chest_like(rng), np.zeros((20, 20), np.float32), rng.random((33, 70), dtype=np.float32)]:
        assert grey_entropy(image) == pytest.approx(shannon_entropy((image * 255).astype(np.uint8)), abs=1e-9)


def test_to_unit_range_in_place_only_when_asked():
    pixels = np.array([[0.0, 2047.5, 4095.0, 5000.0]], np.float32)
    copied = to_unit_range(pixels, (0.0, 4095.0))
    assert pixels[0, 3] == 5000.0 and copied.tolist() == [[0.0, 0.5, 1.0, 1.0]]
    scaled = to_unit_range(pixels, (0.0, 4095.0), copy=False)
    assert scaled is pixels and pixels.tolist() == [[0.0, 0.5, 1.0, 1.0]]
    integers = np.array([[10, 20]], np.uint16)  # not float32: never scaled in place
    assert to_unit_range(integers, None, copy=False).tolist() == [[0.0, 1.0]] and integers.tolist() == [[10, 20]]


def test_robust_bounds_when_most_images_share_one_value():
    # clipped_white is 0 for most images: MAD = 0 must not make every image that clips a little an outlier.
    values = pd.Series([0.0] * 20 + [0.01] * 5 + [0.5])
    lo, hi = robust_bounds(values, 5)
    assert lo < 0 < 0.01 < hi < 0.5
    assert robust_bounds(pd.Series([0.2] * 10), 5) == (0.2, 0.2)
    assert robust_bounds(pd.Series([np.nan, np.nan]), 5) == (-np.inf, np.inf)


def test_schema_offers_exactly_the_computed_metrics(root):
    import yaml

    schema = yaml.safe_load((root / "workflow" / "schemas" / "config.schema.yaml").read_text())
    quality = schema["properties"]["quality"]["properties"]
    assert quality["robust_metrics"]["items"]["enum"] == METRICS
    assert set(quality["robust_metrics"]["default"]) <= set(METRICS)
    assert {key for _, _, _, key in RULES} <= set(quality), "every rule's threshold is a config key"


def test_unknown_robust_metric_is_a_config_error():
    frame = pd.DataFrame([{"image_id": "a", "status": "ok", **image_metrics(chest_like(np.random.default_rng(5)))}])
    with pytest.raises(CxrflowError, match="robust_metrics.*'p_50'"):
        apply_rules(frame, {"mode": "robust", "robust_metrics": ["p_50"]})


def test_robust_mode_on_real_nih_images(shared_data):
    """Data-driven QC on 300 real radiographs: planted defects are outliers, real images mostly are not."""
    labels = pd.read_csv(shared_data / "nih1000" / "labels.csv").head(300)
    units = {p: to_unit_range(d.pixels, d.meta["value_range"])
             for p, d in ((p, decode_image(shared_data / p)) for p in labels["image_path"])}
    first = list(units.values())[:4]
    lines = first[2].copy()
    lines[::8] = 1.0
    planted = {"dark": first[0] * 0.35, "flat": 0.5 + (first[1] - 0.5) * 0.3, "lines": lines,
               "washed_out": np.clip(first[3] * 0.6 + 0.6, 0, 1)}
    images = {**units, **planted}
    rows = [{"image_id": k, "status": "ok", **image_metrics(v.astype(np.float32))} for k, v in images.items()]
    config = {"mode": "robust", "robust_metrics": ["p50", "dynamic_range", "entropy", "line_score", "clipped_white"],
              "robust_k": 5}
    out = apply_rules(pd.DataFrame(rows), config).set_index("image_id")
    real = out.loc[list(units)]
    print("\nrobust QC on 300 NIH images:", real["qc_reason"].value_counts(dropna=False).to_dict(),
          "| planted:", out.loc[list(planted), "qc_reasons"].to_dict())
    assert real["qc_pass"].mean() >= 0.95
    assert not real["qc_reasons"].str.contains("outlier_clipped_white").any(), "no real image clips: none is flagged"
    assert not out.loc[list(planted), "qc_pass"].any()
    assert "outlier_line_score" in out.loc["lines", "qc_reasons"]
    assert "outlier_clipped_white" in out.loc["washed_out", "qc_reasons"]
    assert "outlier_dynamic_range" in out.loc["flat", "qc_reasons"]


NEW_RULES = {"min_autocorrelation": 0.5, "min_polarity": 0.0, "max_bits_overflow": 0.0}


def test_an_8000_pixel_noise_image_is_not_a_radiograph(tmp_path):
    """Random pixels decode fine and have a radiograph-like median and range; only their lack of spatial
    structure gives them away."""
    from PIL import Image

    from cxrflow.preprocess import process_image

    path = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8000, 8000), dtype=np.uint8)).save(path, compress_level=0)
    record, _ = process_image(str(path), 64, {})
    row = apply_rules(pd.DataFrame([{"image_id": "noise", **record}]), {**DEFAULTS, **NEW_RULES}).iloc[0]
    assert abs(record["autocorrelation"]) < 0.05, record["autocorrelation"]
    assert not row["qc_pass"] and row["qc_reason"] == "not_radiograph", row["qc_reasons"]


def test_twelve_bit_data_in_a_sixteen_bit_png_is_not_too_dark(tmp_path):
    from PIL import Image

    from cxrflow.preprocess import process_image

    path = tmp_path / "export12.png"
    Image.fromarray((chest_like(np.random.default_rng(2)) * 4095).astype(np.uint16)).save(path)
    record, _ = process_image(str(path), 64, {})
    row = apply_rules(pd.DataFrame([{"image_id": "x", **record}]), {**DEFAULTS, **NEW_RULES}).iloc[0]
    assert row["qc_pass"], row["qc_reasons"]
    assert 0.3 < record["p50"] < 0.8 and "uses 12 bits" in record["detail"]


def test_real_radiographs_pass_and_their_negatives_are_flagged_inverted(shared_data):
    """All 1,000 NIH1000 images: none is noise, none looks inverted; every inverted copy (a negative film, a
    MONOCHROME1 image tagged MONOCHROME2) fails as `inverted`. Prints the detection and false-positive rates."""
    labels = pd.read_csv(shared_data / "nih1000" / "labels.csv")
    units = [to_unit_range(d.pixels, d.meta["value_range"])
             for d in (decode_image(shared_data / p) for p in labels["image_path"])]
    rows = [{"image_id": f"{kind}{i}", "status": "ok", "bits_overflow": 0.0, **image_metrics(u if kind == "real" else 1 - u)}
            for i, u in enumerate(units) for kind in ("real", "inverted")]
    out = apply_rules(pd.DataFrame(rows), {**DEFAULTS, **NEW_RULES})
    real, inverted = out[out["image_id"].str.startswith("real")], out[out["image_id"].str.startswith("inverted")]
    false_positive = real["qc_reasons"].str.contains("inverted").mean()
    detected = inverted["qc_reasons"].str.contains("inverted").mean()
    print(f"\nNIH1000: inverted flagged on {detected:.1%} of {len(inverted)} inverted copies, "
          f"on {false_positive:.1%} of {len(real)} real images; polarity real min {real['polarity'].min():.3f}, "
          f"inverted max {inverted['polarity'].max():.3f}; autocorrelation min {real['autocorrelation'].min():.3f}")
    assert not real["qc_reasons"].str.contains("not_radiograph|inverted").any()
    assert detected >= 0.99 and false_positive == 0


def test_a_contact_sheet_with_one_image_shows_its_whole_title():
    import matplotlib.pyplot as plt

    from cxrflow.figures import contact_sheet_figure

    fig = contact_sheet_figure([np.zeros((32, 32), np.uint8)], ["img1"], "rejected: bits_stored_exceeded (1 images)")
    fig.canvas.draw()
    title = fig._suptitle.get_window_extent(fig.canvas.get_renderer())
    assert title.x0 >= 0 and title.x1 <= fig.bbox.x1 and title.y1 <= fig.bbox.y1, (title, fig.bbox)
    plt.close(fig)
