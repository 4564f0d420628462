"""Quality control: per-image metrics (scikit-image and numpy) and the config's rules that turn them into pass/fail.

Metrics are computed once per image, in the preprocessing shards, on the decoded image scaled to its nominal
range. The rules are applied later, in `apply_rules`, so that changing a threshold never re-decodes an image.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.ndimage import median_filter

from cxrflow.errors import CxrflowError

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


def to_unit_range(pixels: np.ndarray, value_range: tuple[float, float] | None, copy: bool = True) -> np.ndarray:
    """Scale to [0, 1] by the image's nominal range (bit depth, window), so that darkness is judged absolutely.

    With copy=False a writeable float32 array is scaled in place: on a 2k image that is three passes over the
    pixels instead of four temporary arrays (measured 2.4 ms against 10 ms).
    """
    lo, hi = value_range if value_range else (float(pixels.min()), float(pixels.max()))
    if hi <= lo:
        return np.zeros_like(pixels, dtype=np.float32)
    in_place = not copy and pixels.dtype == np.float32 and pixels.flags.writeable
    unit = pixels if in_place else pixels.astype(np.float32)
    unit -= np.float32(lo)
    unit *= np.float32(1.0 / (hi - lo))
    return np.clip(unit, 0.0, 1.0, out=unit)


def percentiles(values: np.ndarray, qs) -> np.ndarray:
    """np.percentile's default (linear) estimate, from one sort of a flat copy.

    numpy's vectorised sort of 250k float32 values takes about 1 ms, less than np.percentile's partitioning
    for five quantiles (4 ms), and the sorted copy is made once for all of them.
    """
    ordered = np.sort(values, axis=None)
    if ordered.size == 0:
        return np.full(len(qs), np.nan)
    position = np.asarray(qs, dtype=np.float64) / 100.0 * (ordered.size - 1)
    below = np.floor(position).astype(np.intp)
    above = np.minimum(below + 1, ordered.size - 1)
    low, high = ordered[below].astype(np.float64), ordered[above].astype(np.float64)
    return low + (high - low) * (position - below)


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
    small = np.ascontiguousarray(unit[::step, ::step])
    p01, p05, p50, p95, p99 = (float(v) for v in percentiles(small, [1, 5, 50, 95, 99]))
    return {
        "height": h,
        "width": w,
        "aspect": max(h, w) / max(1, min(h, w)),
        "p01": p01, "p05": p05, "p50": p50, "p95": p95, "p99": p99,
        "mean": float(small.mean()),
        "std": float(small.std()),
        "dynamic_range": p99 - p01,
        "clipped_black": np.count_nonzero(small <= 0.005) / small.size,
        "clipped_white": np.count_nonzero(small >= 0.995) / small.size,
        "entropy": grey_entropy(small),
        "line_score": line_score(small),
    }


def grey_entropy(unit: np.ndarray) -> float:
    """Shannon entropy (bits) of the 256-level histogram; equals skimage's shannon_entropy of the uint8 image,
    which counts levels with np.unique (a sort) and costs 8 ms where np.bincount costs 0.5 ms."""
    counts = np.bincount((unit * 255).astype(np.uint8).ravel(), minlength=256)
    share = counts[counts > 0] / unit.size
    return float(-(share * np.log2(share)).sum()) + 0.0  # + 0.0 turns -0.0 (one level) into 0.0


def robust_bounds(values: pd.Series, k: float) -> tuple[float, float]:
    """median +- k robust SDs, over the non-missing values.

    The SD is 1.4826 x MAD. When more than half the images share one value (MAD = 0, e.g. clipped_white where
    most images clip nothing) it falls back to 1.2533 x the mean absolute deviation, as the modified z-score
    does, so that every image that merely differs from the majority is not an outlier.
    """
    values = values.dropna().astype(float)
    if values.empty:
        return -np.inf, np.inf
    median = values.median()
    spread = (values - median).abs().median() * 1.4826
    if spread == 0:
        spread = (values - median).abs().mean() * 1.2533
    return median - k * spread, median + k * spread


def apply_rules(metrics: pd.DataFrame, config: dict) -> pd.DataFrame:
    """Add qc_pass and qc_reason (the first failing rule; all failing rules in qc_reasons) to the metrics table.

    Images that could not be decoded keep their decode reason. In robust mode, each metric named in
    `robust_metrics` also fails when it lies more than `robust_k` robust SDs (see `robust_bounds`) from the
    median of the decodable images; the fixed thresholds apply in both modes (set one to null to drop it).
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
            if metric not in METRICS:
                raise CxrflowError(f"quality.robust_metrics: unknown metric {metric!r}; expected one of {METRICS}")
            lo, hi = robust_bounds(values.loc[decoded, metric], config.get("robust_k", 5.0))
            failures.append(((values[metric] < lo) | (values[metric] > hi)).rename(f"outlier_{metric}"))
    reasons = pd.Series("", index=out.index, dtype="string")
    for failed in failures:
        reasons = reasons.where(~failed, reasons + ";" + failed.name)
    out["qc_reasons"] = reasons.str.lstrip(";").where(decoded, out["status"])
    out["qc_reason"] = out["qc_reasons"].str.split(";").str[0].replace("", pd.NA)
    out["qc_pass"] = decoded & out["qc_reason"].isna()
    return out
