"""Patient-exclusive, label-stratified train/val/test splits, computed once and written as a manifest."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from cxrflow.cohorts import cohort_seed
from cxrflow.errors import CxrflowError


def _carve(frame: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of about `fraction` of the patients, stratified by label, whole patients only."""
    n_splits = max(2, round(1 / fraction))
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, held_out = next(folds.split(frame, frame["label"], groups=frame["patient_id"]))
    mask = np.zeros(len(frame), dtype=bool)
    mask[held_out] = True
    return mask


def patient_exclusive_split(cohort: pd.DataFrame, fractions: dict, seed: int, pathology: str) -> pd.DataFrame:
    """Assign each image of the cohort to train/val/test so that a patient's images share one split.

    Raises CxrflowError naming the cohort and its counts when it is too small to give both classes to every split.
    """
    frame = cohort.sort_values("image_id").reset_index(drop=True)
    counts = frame.groupby("label")["patient_id"].nunique().reindex([0, 1], fill_value=0)
    minimum = max(2, round(1 / fractions["test"]), round((1 - fractions["test"]) / fractions["val"]))
    if counts.min() < minimum:
        raise CxrflowError(
            f"cohort {pathology!r} is too small to split: {counts[1]} positive and {counts[0]} negative patients "
            f"({len(frame)} images); each class needs at least {minimum} patients for these split fractions"
        )
    seed = cohort_seed(seed, pathology)
    split = np.full(len(frame), "train", dtype=object)
    test = _carve(frame, fractions["test"], seed)
    split[test] = "test"
    rest = np.flatnonzero(~test)
    val_fraction = fractions["val"] / (1 - fractions["test"])
    val = _carve(frame.iloc[rest].reset_index(drop=True), val_fraction, seed + 1)
    split[rest[val]] = "val"
    manifest = frame.assign(split=split)[["image_id", "patient_id", "label", "split"]]
    table = manifest.groupby(["split", "label"]).size().unstack(fill_value=0).reindex(index=["train", "val", "test"], columns=[0, 1], fill_value=0)
    if (table == 0).any(axis=None):
        raise CxrflowError(f"cohort {pathology!r}: a split lacks a class after splitting; counts (split x label):\n{table}")
    return manifest
