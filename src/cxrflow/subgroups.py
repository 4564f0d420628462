"""Subgroup AUCs on the test split: by age band, view and, where the catalog has them, manufacturer and site.

A subgroup with fewer than `min_patients` patients of either class gets no number: an AUC from three positive
patients reads like a finding and is noise. It is listed as too small, with its counts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxrflow.metrics import patient_resamples, percentile_interval, weighted_auc

# Catalog columns a subgroup can be drawn from, in the order of the table (manufacturer and site only when present).
ATTRIBUTES = ("age_band", "view", "sex", "manufacturer", "site")


def age_bands(age: pd.Series, edges: list[int]) -> pd.Series:
    """Ages cut at `edges` (e.g. [40, 60, 80] -> <40, 40-59, 60-79, >=80); unknown age stays missing."""
    edges = sorted(int(e) for e in edges)
    names = [f"<{edges[0]}"] + [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:])] + [f">={edges[-1]}"]
    values = pd.to_numeric(age, errors="coerce").astype(float)
    index = np.searchsorted(edges, values.to_numpy(), side="right")
    return pd.Series(pd.Categorical([names[i] if np.isfinite(v) else None for i, v in zip(index, values)], categories=names),
                     index=age.index)


def subgroup_table(test: pd.DataFrame, edges: list[int], min_patients: int, bootstrap: int, seed: int) -> pd.DataFrame:
    """test: image_id, patient_id, label, prob and the catalog's age, view (sex, manufacturer, site when present).
    One row per (attribute, group) with at least one image: counts, and AUC with its patient-bootstrap 95% CI or,
    under `min_patients` patients of either class, status "too small" and no number."""
    frame = test.copy()
    if "age" in frame.columns:
        frame["age_band"] = age_bands(frame["age"], edges)
    rows = []
    for attribute in ATTRIBUTES:
        if attribute not in frame.columns or frame[attribute].isna().all():
            continue
        column = frame[attribute]
        order = list(column.cat.categories) if isinstance(column.dtype, pd.CategoricalDtype) else sorted(column.dropna().astype(str).unique())
        values = column.astype("string").fillna("unknown")
        for group in [g for g in order + ["unknown"] if (values == g).any()]:
            members = frame[(values == group).to_numpy()]
            pos = members.loc[members["label"] == 1, "patient_id"].nunique()
            neg = members.loc[members["label"] == 0, "patient_id"].nunique()
            row = {"attribute": attribute, "group": group, "n_images": len(members),
                   "n_patients": members["patient_id"].nunique(), "n_positive_patients": pos, "n_negative_patients": neg}
            if min(pos, neg) < min_patients:
                row |= {"auc": np.nan, "auc_ci_low": np.nan, "auc_ci_high": np.nan,
                        "status": f"too small (under {min_patients} patients of a class)"}
            else:
                labels, probs = members["label"].to_numpy(), members["prob"].to_numpy()
                draws = [weighted_auc(labels, probs, w) for w in patient_resamples(members["patient_id"], bootstrap, seed)]
                low, high = percentile_interval(np.concatenate(draws) if draws else [])
                row |= {"auc": weighted_auc(labels, probs), "auc_ci_low": low, "auc_ci_high": high, "status": "ok"}
            rows.append(row)
    columns = ["attribute", "group", "n_images", "n_patients", "n_positive_patients", "n_negative_patients", "auc",
               "auc_ci_low", "auc_ci_high", "status"]
    return pd.DataFrame(rows, columns=columns)
