"""Patient-exclusive, label-stratified train/val/test splits (and optional k folds), computed once, written as a manifest.

How patients are assigned (all in numpy, linear in the cohort size):
1. Each patient is of one kind: only positive images, only negative images, or both. Patients are sorted by
   id and shuffled once with the cohort's seed; that order does not depend on the row order, the fractions or
   the number of folds.
2. Within each kind, the shuffled patients fill the groups in turn (test first, then val and train, or the k
   folds), each group taking its fraction of that kind's images. Stratifying by kind keeps every group's
   positive share close to the cohort's. Because test is filled first, it is the same test set whether or not
   folds are used, and whatever the val fraction.
3. If that leaves a group with fewer than `min_patients_per_class` patients of a class (tiny cohorts), the
   assignment is redone with those patients placed first, which always succeeds when it is possible at all:
   that is, when at least groups x min_patients_per_class patients have a positive image, and as many have a
   negative image (a patient with both counts for both). Otherwise the cohort is too small to split and the
   job fails with a message naming the cohort and its counts.

Manifest columns: image_id, patient_id, label, split, and with `folds: k` also fold. In k-fold mode the
non-test patients are divided into k folds (fold 0..k-1, empty for test rows); the split column then marks fold
0 as val and the other folds as train, so training that ignores folds validates on fold 0, and a
cross-validation run i uses fold == i as val and the other non-test folds as train. `split.val` is not used then.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxrflow.cohorts import cohort_seed
from cxrflow.errors import CxrflowError

MANIFEST_COLUMNS = ["image_id", "patient_id", "label", "split"]


def split_groups(settings: dict) -> tuple[list[str], list[int | None], np.ndarray]:
    """The groups patients go to, as (split name, fold, fraction of the images) in filling order."""
    test = settings.get("test", 0.25)
    folds = settings.get("folds")
    if folds:
        names = ["test"] + ["val"] + ["train"] * (folds - 1)
        return names, [None] + list(range(folds)), np.array([test] + [(1 - test) / folds] * folds)
    val = settings.get("val", 0.15)
    return ["test", "val", "train"], [None, None, None], np.array([test, val, 1 - test - val])


def patient_exclusive_split(cohort: pd.DataFrame, settings: dict, seed: int, pathology: str) -> pd.DataFrame:
    """Assign each image of the cohort to train/val/test (and a fold) so that a patient's images share one group.

    `settings` is the config's `split:` section (val, test, folds, min_patients_per_class). Raises CxrflowError
    naming the cohort and its counts when it is too small to give every group both classes.
    """
    names, folds, fractions = split_groups(settings)
    minimum = int(settings.get("min_patients_per_class", 1))
    frame = cohort.sort_values("image_id", kind="stable").reset_index(drop=True)
    duplicated = frame["image_id"].duplicated()
    if duplicated.any():
        raise CxrflowError(f"cohort {pathology!r}: duplicate image ids, e.g. {frame.loc[duplicated, 'image_id'].iloc[0]!r}")
    codes, patients = pd.factorize(frame["patient_id"], sort=True)
    if (codes < 0).any():
        raise CxrflowError(f"cohort {pathology!r}: {int((codes < 0).sum())} image(s) without a patient id")
    label = frame["label"].to_numpy(dtype=np.int64)
    n_pos = np.bincount(codes, weights=label == 1, minlength=len(patients)).astype(np.int64)
    n_neg = np.bincount(codes, weights=label == 0, minlength=len(patients)).astype(np.int64)
    has_pos, has_neg = n_pos > 0, n_neg > 0
    need = len(names) * minimum
    if has_pos.sum() < need or has_neg.sum() < need:
        groups = f"{len(names)} groups ({', '.join(_group_labels(names, folds))})"
        raise CxrflowError(
            f"cohort {pathology!r} is too small to split: {int(has_pos.sum())} positive and {int(has_neg.sum())} negative "
            f"patients ({len(frame)} images: {int((label == 1).sum())} positive, {int((label == 0).sum())} negative); "
            f"{groups} with at least {minimum} patient(s) of each class need {need} patients of each class"
        )

    rng = np.random.default_rng(cohort_seed(seed, pathology))
    order = rng.permutation(len(patients))  # patients in shuffled order; `patients` is sorted by id
    kind = np.where(has_pos & has_neg, 2, np.where(has_pos, 0, 1))
    size = n_pos + n_neg
    group = _fill(order, kind, size, fractions, seeded=None)
    if not _covered(group, has_pos, has_neg, len(names), minimum):
        group = _fill(order, kind, size, fractions, seeded=_seed_groups(order, kind, len(names), minimum))
    if not _covered(group, has_pos, has_neg, len(names), minimum):  # cannot happen; guard the invariant
        raise AssertionError(f"cohort {pathology!r}: the split lost a class in a group despite the seeding")

    image_group = group[codes]
    manifest = frame[["image_id", "patient_id", "label"]].assign(split=np.array(names, dtype=object)[image_group])
    if settings.get("folds"):
        fold = np.array([-1 if f is None else f for f in folds])[image_group]
        manifest["fold"] = pd.array(np.where(fold < 0, None, fold), dtype="Int8")
    return manifest.reset_index(drop=True)


def _group_labels(names: list[str], folds: list[int | None]) -> list[str]:
    return [name if fold is None else f"fold {fold}" for name, fold in zip(names, folds)]


def _fill(order: np.ndarray, kind: np.ndarray, size: np.ndarray, fractions: np.ndarray, seeded: dict | None) -> np.ndarray:
    """Group of each patient: within each kind, patients in shuffled order take consecutive runs of images, each
    group its fraction of that kind's images (by the midpoint of the patient's run). Seeded patients are placed
    first, and the rest make up each group's remaining share."""
    group = np.full(len(kind), -1, dtype=np.int64)
    seeded = seeded or {}
    for patient, g in seeded.items():
        group[patient] = g
    for k in (0, 1, 2):
        members = order[kind[order] == k]
        if not len(members):
            continue
        total = size[members].sum()
        placed = np.bincount(group[members][group[members] >= 0], weights=size[members][group[members] >= 0],
                             minlength=len(fractions))
        free = members[group[members] < 0]
        if not len(free):
            continue
        wanted = np.maximum(fractions * total - placed, 0)
        if wanted.sum() <= 0:
            wanted = fractions.copy()
        bounds = np.cumsum(wanted) / wanted.sum() * size[free].sum()
        mid = np.cumsum(size[free]) - size[free] / 2
        group[free] = np.minimum(np.searchsorted(bounds, mid, side="right"), len(fractions) - 1)
    return group


def _seed_groups(order: np.ndarray, kind: np.ndarray, n_groups: int, minimum: int) -> dict:
    """Patients placed first so that every group has `minimum` patients of each class: pure-positive and
    pure-negative patients in pairs, and patients with both classes only where pairs run out."""
    ranked = {k: list(order[kind[order] == k]) for k in (0, 1, 2)}
    need = n_groups * minimum
    n_mixed = max(0, need - min(len(ranked[0]), len(ranked[1])))
    seeded = {}
    per_group_mixed = np.zeros(n_groups, dtype=int)
    for i in range(n_mixed):  # round robin, so no group holds more than `minimum` of them
        g = i % n_groups
        seeded[ranked[2][i]] = g
        per_group_mixed[g] += 1
    taken = {0: 0, 1: 0}
    for g in range(n_groups):
        for k in (0, 1):
            for _ in range(minimum - per_group_mixed[g]):
                seeded[ranked[k][taken[k]]] = g
                taken[k] += 1
    return seeded


def _covered(group: np.ndarray, has_pos: np.ndarray, has_neg: np.ndarray, n_groups: int, minimum: int) -> bool:
    pos = np.bincount(group[has_pos], minlength=n_groups)
    neg = np.bincount(group[has_neg], minlength=n_groups)
    return bool((pos >= minimum).all() and (neg >= minimum).all())
