"""Quality control: per-image metrics (scikit-image and numpy) and the config's rules that turn them into pass/fail.

Metrics are computed once per image, in the preprocessing shards, on the decoded image scaled to its nominal
range. The rules are applied later, in `apply_rules`, so that changing a threshold never re-decodes an image.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.ndimage import median_filter
from skimage.measure import shannon_entropy

METRICS = [
    "height", "width", "aspect", "p01", "p05", "p50", "p95", "p99", "mean", "std",
    "dynamic_range", "clipped_black", "clipped_white", "entropy", "line_score",
]

# The rules in the order they are checked: (reason, metric, comparison, config key).
RULES = [
    ("too_small", "min_side", "<", "min_size"),
    ("elongated", "aspect", ">", "max_aspect"),
    ("too_dark", "p50", "<", "dark_p50"),
    ("too_bright", "p50", ">", "bright_p50"),
    ("blank", "std", "<", "blank_std"),
    ("low_contrast", "dynamic_range", "<", "min_dynamic_range"),
    ("clipped", "clipped_white", ">", "max_clipped_white"),
    ("line_artifact", "line_score", ">", "max_line_score"),
]


def to_unit_range(pixels: np.ndarray, value_range: tuple[float, float] | None) -> np.ndarray:
    """Scale to [0, 1] by the image's nominal range (bit depth, window), so that darkness is judged absolutely."""
    lo, hi = value_range if value_range else (float(pixels.min()), float(pixels.max()))
    if hi <= lo:
        return np.zeros_like(pixels, dtype=np.float32)
    return np.clip((pixels - lo) / (hi - lo), 0.0, 1.0).astype(np.float32, copy=False)


def line_score(image: np.ndarray) -> float:
    """How far the strongest single row or column mean stands out from its neighbours, in intensity units.

    Full-width detector lines and grid artifacts make one row's mean jump against its neighbours' median;
    anatomy changes smoothly (measured: <= 0.24 on 300 real NIH images, >= 0.54 on planted lines).
    The outermost rows are skipped, where collimation edges are expected.
    """
    scores = []
    for profile in (image.mean(axis=1), image.mean(axis=0)):
        if profile.size < 9:
            continue
        residual = profile - median_filter(profile, size=5, mode="nearest")
        scores.append(float(np.max(np.abs(residual[2:-2]))))
    return max(scores, default=0.0)


def image_metrics(unit: np.ndarray) -> dict:
    """QC metrics of an image already scaled to [0, 1] (see `to_unit_range`)."""
    h, w = unit.shape
    step = max(1, max(h, w) // 512)  # metrics on at most ~512 px: same verdicts, a fraction of the time
    small = unit[::step, ::step]
    p01, p05, p50, p95, p99 = np.percentile(small, [1, 5, 50, 95, 99])
    return {
        "height": h,
        "width": w,
        "aspect": max(h, w) / max(1, min(h, w)),
        "p01": p01, "p05": p05, "p50": p50, "p95": p95, "p99": p99,
        "mean": float(small.mean()),
        "std": float(small.std()),
        "dynamic_range": p99 - p01,
        "clipped_black": float((small <= 0.005).mean()),
        "clipped_white": float((small >= 0.995).mean()),
        "entropy": float(shannon_entropy((small * 255).astype(np.uint8))),
        "line_score": line_score(small),
    }


def robust_bounds(values: pd.Series, k: float) -> tuple[float, float]:
    median = values.median()
    mad = (values - median).abs().median() * 1.4826
    return median - k * mad, median + k * mad


def apply_rules(metrics: pd.DataFrame, config: dict) -> pd.DataFrame:
    """Add qc_pass and qc_reason (the first failing rule; all failing rules in qc_reasons) to the metrics table.

    Images that could not be decoded keep their decode reason. In robust mode, each metric named in
    `robust_metrics` also fails when it lies more than `robust_k` MADs from the median of the decodable images.
    """
    out = metrics.copy()
    decoded = out["status"] == "ok"
    values = out.assign(min_side=out[["height", "width"]].min(axis=1))
    failures = []
    for reason, metric, op, key in RULES:
        threshold = config.get(key)
        if threshold is None:
            continue
        failed = values[metric] < threshold if op == "<" else values[metric] > threshold
        failures.append(failed.fillna(False).rename(reason))
    if config.get("mode") == "robust":
        for metric in config.get("robust_metrics", []):
            lo, hi = robust_bounds(values.loc[decoded, metric], config.get("robust_k", 5.0))
            failures.append(((values[metric] < lo) | (values[metric] > hi)).rename(f"outlier_{metric}"))
    reasons = pd.Series("", index=out.index, dtype="string")
    for failed in failures:
        reasons = reasons.where(~failed, reasons + ";" + failed.name)
    out["qc_reasons"] = reasons.str.lstrip(";").where(decoded, out["status"])
    out["qc_reason"] = out["qc_reasons"].str.split(";").str[0].replace("", pd.NA)
    out["qc_pass"] = decoded & out["qc_reason"].isna()
    return out
