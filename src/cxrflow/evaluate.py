"""Evaluation on the test split: the paper's Table 1 metrics, a patient-level bootstrap CI, and the figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import (accuracy_score, confusion_matrix, precision_recall_curve, precision_recall_fscore_support,
                             roc_auc_score, roc_curve)


def youden_threshold(labels, probs) -> float:
    """The threshold maximising sensitivity + specificity - 1 (Youden's J) on the given (validation) data."""
    fpr, tpr, thresholds = roc_curve(labels, probs)
    best = int(np.argmax(tpr - fpr))
    return float(min(1.0, thresholds[best]))


def threshold_metrics(labels, probs, threshold: float) -> dict:
    predicted = (np.asarray(probs) >= threshold).astype(int)
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predicted, average="weighted", zero_division=0)
    return {
        "threshold": threshold,
        "accuracy": accuracy_score(labels, predicted),
        "precision_weighted": precision,
        "recall_weighted": recall,
        "f1_weighted": f1,
        "confusion_matrix": confusion_matrix(labels, predicted, labels=[0, 1]).tolist(),
    }


def patient_bootstrap_auc(labels, probs, patients, n: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of the AUC, resampling whole patients (their images are not independent)."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    codes, uniques = pd.factorize(pd.Series(patients))
    members = [np.flatnonzero(codes == i) for i in range(len(uniques))]
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n):
        chosen = rng.integers(0, len(members), len(members))
        index = np.concatenate([members[i] for i in chosen])
        if labels[index].min() != labels[index].max():
            aucs.append(roc_auc_score(labels[index], probs[index]))
    if not aucs:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(aucs, alpha)), float(np.quantile(aucs, 1 - alpha))


def evaluate_predictions(predictions: pd.DataFrame, bootstrap: int, seed: int) -> dict:
    """predictions: image_id, patient_id, label, prob, split (val and test). Threshold from val, metrics on test."""
    val = predictions[predictions["split"] == "val"]
    test = predictions[predictions["split"] == "test"]
    threshold = youden_threshold(val["label"], val["prob"])
    ci = patient_bootstrap_auc(test["label"], test["prob"], test["patient_id"], bootstrap, seed)
    at_youden = threshold_metrics(test["label"], test["prob"], threshold)
    at_half = threshold_metrics(test["label"], test["prob"], 0.5)
    return {
        "n_test": len(test),
        "n_test_patients": int(test["patient_id"].nunique()),
        "n_test_positive": int(test["label"].sum()),
        "auc": float(roc_auc_score(test["label"], test["prob"])),
        "auc_ci95": list(ci),
        **{k: v for k, v in at_youden.items()},
        "at_0.5": at_half,
    }


def plot_roc_pr(predictions: pd.DataFrame, title: str, out_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = predictions[predictions["split"] == "test"]
    fpr, tpr, _ = roc_curve(test["label"], test["prob"])
    precision, recall, _ = precision_recall_curve(test["label"], test["prob"])
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(9, 4))
    ax_roc.plot(fpr, tpr, label=f"AUC {roc_auc_score(test['label'], test['prob']):.3f}")
    ax_roc.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax_roc.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"{title}: ROC (test)")
    ax_roc.legend(loc="lower right")
    ax_pr.plot(recall, precision)
    ax_pr.set(xlabel="recall", ylabel="precision", title=f"{title}: precision-recall (test)", ylim=(0, 1.02))
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
