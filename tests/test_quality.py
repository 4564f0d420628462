"""Quality-control metrics and rules on images with known defects."""

import numpy as np
import pandas as pd

from cxrflow.quality import apply_rules, image_metrics, line_score

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
