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

Duplicates (`split.duplicates: group`, the default): given a table of duplicate images (image_id, group; from
cxrflow.duplicates), the patients of images in one duplicate group are merged into one unit (connected
components of patients and groups, i.e. union-find), and units take the place of patients above, so that copies of
an image, even under other ids and patients, always land in the same split. `drop` is handled by the cohort
(cxrflow.cohorts, step "duplicates"): one image per group is kept there.

Test prevalence (`split.test_prevalence`): `balanced` (the default) splits the balanced cohort as above. `natural`
keeps train and val exactly as `balanced` makes them, and gives the test split the cohort's natural prevalence:
every eligible image (before balancing and the cap; the cohort's rows with `selected` false) of the test units
joins the test split, and so does a share `split.test` of the units that balancing left out altogether (drawn
with the cohort's seed, stratified by kind as above). The test split then holds about `split.test` of the
eligible positives and of the eligible negatives, so PPV and NPV on it mean what they mean in the clinic; its
images other than the balanced test's are never in train or val.

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


def patient_exclusive_split(cohort: pd.DataFrame, settings: dict, seed: int, pathology: str,
                            duplicates: pd.DataFrame | None = None, assigned: dict | None = None) -> pd.DataFrame:
    """Assign each image of the cohort to train/val/test (and a fold) so that a patient's images share one group.

    `settings` is the config's `split:` section (val, test, folds, min_patients_per_class, test_prevalence).
    `cohort` may carry a bool column `selected` (cxrflow.cohorts.build_cohort with_pool): only selected rows are
    the cohort proper; the others serve a natural-prevalence test split. `duplicates` (image_id, group) merges the
    patients of duplicate images into one unit. Raises CxrflowError naming the cohort and its counts when it is
    too small to give every group both classes.

    `assigned` (unit -> group index in split_groups' order) fixes the group of units that another cohort has
    already placed, and the free units fill each group's remaining share (cxrflow.multilabel's shared split); a
    `unit` column in `cohort`, when present, replaces the units computed from `duplicates`.
    """
    names, folds, fractions = split_groups(settings)
    minimum = int(settings.get("min_patients_per_class", 1))
    whole = cohort.sort_values("image_id", kind="stable").reset_index(drop=True)
    duplicated = whole["image_id"].duplicated()
    if duplicated.any():
        raise CxrflowError(f"cohort {pathology!r}: duplicate image ids, e.g. {whole.loc[duplicated, 'image_id'].iloc[0]!r}")
    if whole["patient_id"].isna().any():
        raise CxrflowError(f"cohort {pathology!r}: {int(whole['patient_id'].isna().sum())} image(s) without a patient id")
    if "unit" not in whole.columns:
        whole["unit"] = split_units(whole, duplicates)
    selected = whole["selected"].to_numpy(dtype=bool) if "selected" in whole.columns else np.ones(len(whole), dtype=bool)
    frame = whole[selected].reset_index(drop=True)
    codes, patients = pd.factorize(frame["unit"], sort=True)
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
    fixed = {i: int(assigned[unit]) for i, unit in enumerate(patients) if unit in assigned} if assigned else {}
    group = _fill(order, kind, size, fractions, seeded=fixed or None)
    if not _covered(group, has_pos, has_neg, len(names), minimum):
        free = order[[i not in fixed for i in order]]
        try:
            extra = _seed_groups(free, kind, len(names), minimum)
        except IndexError:  # only with `assigned`: too few free units left to seed every group
            extra = {}
        group = _fill(order, kind, size, fractions, seeded={**extra, **fixed})
    if not _covered(group, has_pos, has_neg, len(names), minimum):
        if fixed:
            raise CxrflowError(f"cohort {pathology!r}: the split shared with the other cohorts leaves a group without "
                               f"{minimum} patient(s) of each class ({int(has_pos.sum())} positive and "
                               f"{int(has_neg.sum())} negative patients, {len(fixed)} of them placed by other cohorts)")
        raise AssertionError(f"cohort {pathology!r}: the split lost a class in a group despite the seeding")

    image_group = group[codes]
    manifest = frame[["image_id", "patient_id", "label"]].assign(split=np.array(names, dtype=object)[image_group])
    if settings.get("folds"):
        fold = np.array([-1 if f is None else f for f in folds])[image_group]
        manifest["fold"] = pd.array(np.where(fold < 0, None, fold), dtype="Int8")
    if settings.get("test_prevalence", "balanced") == "natural":
        test_units = patients[group == names.index("test")]
        extra = _natural_test_rows(whole[~selected], test_units, set(patients), settings.get("test", 0.25), seed, pathology)
        extra = extra.assign(split="test")
        if settings.get("folds"):
            extra["fold"] = pd.array([pd.NA] * len(extra), dtype="Int8")
        manifest = pd.concat([manifest, extra], ignore_index=True).sort_values("image_id", kind="stable")
    return manifest.reset_index(drop=True)


def split_units(frame: pd.DataFrame, duplicates: pd.DataFrame | None) -> np.ndarray:
    """The unit each image is assigned with: its patient, or, for patients linked by duplicate images (any image
    of theirs in one duplicate group with an image of another patient), the smallest patient id among them."""
    if duplicates is None or not len(duplicates):
        return frame["patient_id"].to_numpy()
    patient = frame["patient_id"].astype(str).to_numpy()
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    codes, patients = pd.factorize(pd.Series(patient), sort=True)
    table = duplicates.drop_duplicates("image_id")
    group_of = pd.Series(table["group"].astype(str).to_numpy(), index=table["image_id"].astype(str).to_numpy())
    group = frame["image_id"].astype(str).map(group_of)
    linked = group.notna().to_numpy()
    group_codes = pd.factorize(group[linked].astype(str))[0]
    n = len(patients) + (int(group_codes.max()) + 1 if len(group_codes) else 0)
    edges = coo_matrix((np.ones(len(group_codes)), (codes[linked], len(patients) + group_codes)), shape=(n, n))
    _, component = connected_components(edges, directed=False)
    # Patients are sorted by id, so the first patient of each component is its smallest id.
    first = pd.Series(np.arange(len(patients))).groupby(component[: len(patients)]).transform("min").to_numpy()
    return np.asarray(patients, dtype=object)[first[codes]]


def _natural_test_rows(left_out: pd.DataFrame, test_units, cohort_units: set, test: float, seed: int,
                       pathology: str) -> pd.DataFrame:
    """The eligible images outside the balanced cohort that a natural-prevalence test split adds: those of the
    test units, and those of a `test` share of the units that have no image in the balanced cohort."""
    in_test = left_out["unit"].isin(set(test_units)).to_numpy()
    outside = left_out[~left_out["unit"].isin(cohort_units).to_numpy()]
    # A stream of its own, so that the balanced groups are the same with either test_prevalence.
    drawn = draw_test_units(outside, test, np.random.default_rng([cohort_seed(seed, pathology), 1]))
    chosen = in_test | left_out["unit"].isin(drawn).to_numpy()
    return left_out.loc[chosen, ["image_id", "patient_id", "label"]]


def draw_test_units(frame: pd.DataFrame, test: float, rng: np.random.Generator) -> set:
    """A `test` share of the units of `frame` (unit, label; one row per image), stratified by kind as the split is."""
    codes, units = pd.factorize(frame["unit"], sort=True)
    label = frame["label"].to_numpy(dtype=np.int64)
    n_pos = np.bincount(codes, weights=label == 1, minlength=len(units)).astype(np.int64)
    n_neg = np.bincount(codes, weights=label == 0, minlength=len(units)).astype(np.int64)
    kind = np.where((n_pos > 0) & (n_neg > 0), 2, np.where(n_pos > 0, 0, 1))
    group = _fill(rng.permutation(len(units)), kind, n_pos + n_neg, np.array([test, 1 - test]), seeded=None)
    return set(np.asarray(units, dtype=object)[group == 0])


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
