"""Cohorts: for one pathology, its positives against the shared "no pathology" pool, filtered as in the paper.

Filters run in a fixed order (view, sex, age, QC, exclusions, class definition, balancing, cap) and each one
records how many images and patients it removed and why: the CONSORT-style flow of the cohort.
"""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

from cxrflow.errors import CxrflowError


def cohort_seed(seed: int, pathology: str) -> int:
    """One seed per cohort, so that changing one cohort's config leaves every other cohort unchanged."""
    return (seed * 1_000_003 + zlib.crc32(pathology.encode())) % (2**32)


def exclusion_keys(cohorts_cfg: dict, pathology: str) -> list[str]:
    entry = cohorts_cfg["pathologies"][pathology]
    keys = (set(cohorts_cfg.get("exclusions", [])) | set(entry.get("exclude_add", []))) - set(entry.get("exclude_remove", []))
    return sorted(keys - set(entry["positive"]))  # a cohort's own target is never an exclusion


def build_cohort(catalog: pd.DataFrame, quality: pd.DataFrame | None, cohorts_cfg: dict, pathology: str,
                 keys: list[str], seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (cohort, flow): cohort rows are image_id, patient_id, label; flow has one row per filter."""
    if pathology not in cohorts_cfg["pathologies"]:
        raise CxrflowError(f"cohorts.pathologies: no entry {pathology!r}; configured: {sorted(cohorts_cfg['pathologies'])}")
    entry = cohorts_cfg["pathologies"][pathology]
    filters = cohorts_cfg.get("filters", {})
    unknown = sorted((set(entry["positive"]) | set(exclusion_keys(cohorts_cfg, pathology))) - set(keys))
    if unknown:
        raise CxrflowError(f"cohorts.pathologies.{pathology}: unknown label key(s) {unknown}")

    frame = catalog
    flow = [_flow_row("catalog", frame, None, "")]

    def keep(mask: pd.Series, step: str, reason: str):
        nonlocal frame
        frame = frame.loc[mask.fillna(False).astype(bool)]
        flow.append(_flow_row(step, frame, flow[-1], reason))

    if filters.get("views"):
        keep(frame["view"].isin(filters["views"]), "view", f"view not in {filters['views']}")
    if filters.get("sex"):
        keep(frame["sex"] == filters["sex"], "sex", f"sex is not {filters['sex']} (or unknown)")
    if filters.get("age"):
        lo, hi = filters["age"]
        keep(frame["age"].between(lo, hi), "age", f"age outside [{lo}, {hi}] (or unknown)")
    if filters.get("require_qc_pass", True) and quality is not None:
        passed = quality.loc[quality["qc_pass"], "image_id"]
        keep(frame["image_id"].isin(passed), "quality", "failed quality control or could not be decoded")
    excluded = exclusion_keys(cohorts_cfg, pathology)
    if excluded:
        keep(~frame[excluded].eq(1).fillna(False).any(axis=1), "exclusions", "carries an exclusion finding")

    positive = frame[entry["positive"]].eq(1).fillna(False).any(axis=1)
    # A negative has no positive label at all, and its target is known to be absent (not uncertain, not unlabelled).
    no_pathology = ~frame[keys].eq(1).fillna(False).any(axis=1) & frame[entry["positive"]].eq(0).fillna(False).all(axis=1)
    keep(positive | no_pathology, "class", "other findings, or the target is uncertain")
    frame = frame.assign(label=positive.loc[frame.index].astype(np.int8))
    flow[-1] = _flow_row("class", frame, flow[-2], "other findings, or the target is uncertain")

    rng = np.random.default_rng(cohort_seed(seed, pathology))
    if cohorts_cfg.get("balance", "undersample") == "undersample":
        n = frame["label"].value_counts().min() if frame["label"].nunique() == 2 else 0
        keep(_sample_per_class(frame, n, rng), "balance", "undersampled to balance the classes")
    cap = cohorts_cfg.get("max_per_class")
    if cap:
        keep(_sample_per_class(frame, cap, rng), "cap", f"more than {cap} images in the class")

    cohort = frame[["image_id", "patient_id", "label"]].sort_values("image_id").reset_index(drop=True)
    return cohort, pd.DataFrame(flow)


def _sample_per_class(frame: pd.DataFrame, n: int, rng) -> pd.Series:
    """A mask keeping at most n random images of each class."""
    keep = pd.Series(False, index=frame.index)
    for _, group in frame.sort_values("image_id").groupby("label"):
        chosen = group.index if len(group) <= n else rng.choice(group.index.to_numpy(), size=n, replace=False)
        keep.loc[chosen] = True
    return keep


def _flow_row(step: str, frame: pd.DataFrame, previous: dict | None, reason: str) -> dict:
    label = frame["label"] if "label" in frame.columns else None
    row = {
        "step": step,
        "images": len(frame),
        "patients": int(frame["patient_id"].nunique()),
        "positives": int((label == 1).sum()) if label is not None else pd.NA,
        "negatives": int((label == 0).sum()) if label is not None else pd.NA,
        "removed_images": 0 if previous is None else previous["images"] - len(frame),
        "removed_patients": 0 if previous is None else previous["patients"] - int(frame["patient_id"].nunique()),
        "reason": reason,
    }
    return row
