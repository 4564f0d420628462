"""The shortcut baseline: how well does the metadata alone predict the label, on the same splits?

A logistic regression on what a scanner or a registry records (view, age, the image's follow-up index within its
patient, and manufacturer or site where the catalog has them), fitted on the train split and scored on val and test. If a
network does not beat it, the network may have learnt the acquisition rather than the finding: on NIH1000's
women cardiomegaly cohort, the view alone (AP vs PA) scores as much as the network did.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

CATEGORICAL = ("view", "manufacturer", "site")


# Columns that order a patient's images in time, best first: the source's own follow-up number, then dates (the
# shareable catalog keeps exact dates only shifted by a per-patient offset, which keeps their order, or the year).
ORDER_COLUMNS = ("follow_up", "study_date", "study_date_shifted", "study_year")


def follow_up_index(catalog: pd.DataFrame) -> pd.Series | None:
    """0 for a patient's first image, 1 for the next, ... from the first of ORDER_COLUMNS the catalog fills (with
    study_year, images of one year share an index); missing where the column is; None when no column is there."""
    for column in ORDER_COLUMNS:
        if column in catalog.columns and catalog[column].notna().any():
            values = catalog[column]
            if column == "follow_up":
                return pd.to_numeric(values, errors="coerce").astype(float)
            known = values.notna()
            index = pd.Series(np.nan, index=catalog.index)
            method = "dense" if column == "study_year" else "first"
            index[known] = catalog[known].groupby("patient_id")[column].rank(method=method).to_numpy() - 1
            return index
    return None


def metadata_features(catalog: pd.DataFrame) -> pd.DataFrame:
    """The metadata of every catalog image a shortcut could use, indexed by image_id (numbers as numbers,
    categories as strings; absent columns are left out)."""
    features = pd.DataFrame(index=catalog["image_id"].astype(str).to_numpy())
    for column in CATEGORICAL:
        if column in catalog.columns and catalog[column].notna().any():
            features[column] = catalog[column].astype("string").to_numpy()
    if "age" in catalog.columns and catalog["age"].notna().any():
        features["age"] = pd.to_numeric(catalog["age"], errors="coerce").astype(float).to_numpy()
    order = follow_up_index(catalog) if "patient_id" in catalog.columns else None
    if order is not None:
        features["follow_up"] = order.astype(float).to_numpy()
    return features


def design_matrix(features: pd.DataFrame, train_index: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """One-hot categories (missing is a category), numbers standardised on train with a missing-indicator
    (missing filled with the train mean); columns constant on train are dropped. Returns X and column names."""
    blocks, names = [], []
    for column in features.columns:
        values = features[column]
        if column in CATEGORICAL:
            dummies = pd.get_dummies(values.fillna("missing"), prefix=column, dtype=float)
            blocks.append(dummies.to_numpy())
            names += list(dummies.columns)
        else:
            train_values = values.to_numpy(dtype=float)[train_index]
            mean = np.nanmean(train_values) if np.isfinite(train_values).any() else 0.0
            sd = np.nanstd(train_values) if np.isfinite(train_values).any() else 1.0
            filled = np.where(np.isfinite(values.to_numpy(dtype=float)), values.to_numpy(dtype=float), mean)
            blocks.append(((filled - mean) / (sd or 1.0))[:, None])
            names.append(column)
            missing = ~np.isfinite(values.to_numpy(dtype=float))
            if missing.any():
                blocks.append(missing[:, None].astype(float))
                names.append(f"{column}_missing")
    if not blocks:
        return np.zeros((len(features), 0)), []
    matrix = np.hstack(blocks)
    varies = matrix[train_index].std(axis=0) > 0
    return matrix[:, varies], [n for n, keep in zip(names, varies) if keep]


def metadata_baseline(manifest: pd.DataFrame, features: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """P(finding) from metadata alone for every manifest row, fitted on the train rows (class-balanced logistic
    regression, as training balances the classes); 0.5 everywhere when no feature varies on train. Returns the
    probabilities and the design's column names."""
    from sklearn.linear_model import LogisticRegression

    rows = features.reindex(manifest["image_id"].astype(str).to_numpy())
    train = np.flatnonzero((manifest["split"] == "train").to_numpy())
    matrix, names = design_matrix(rows, train)
    labels = manifest["label"].to_numpy(dtype=int)
    if not names or len(np.unique(labels[train])) < 2:
        return np.full(len(manifest), 0.5), names
    model = LogisticRegression(class_weight="balanced", max_iter=1000).fit(matrix[train], labels[train])
    return model.predict_proba(matrix)[:, 1], names
