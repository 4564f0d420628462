"""Evaluation on the test split: the paper's Table 1 metrics, the clinical metrics, patient-bootstrap CIs, the figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import (accuracy_score, confusion_matrix, precision_recall_curve, precision_recall_fscore_support,
                             roc_auc_score, roc_curve)

from cxrflow.metrics import (THRESHOLD_METRICS, bootstrap_metrics, patient_resamples, percentile_interval, point_metrics,
                             weighted_auc)


def youden_threshold(labels, probs) -> float:
    """The threshold maximising sensitivity + specificity - 1 (Youden's J) on the given (validation) data."""
    fpr, tpr, thresholds = roc_curve(labels, probs)
    best = int(np.argmax(tpr - fpr))
    return float(min(1.0, thresholds[best]))


def threshold_metrics(labels, probs, threshold: float) -> dict:
    """The paper's metrics at a threshold (scikit-learn's weighted averages) and the confusion matrix."""
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
    draws = [weighted_auc(labels, probs, weights) for weights in patient_resamples(patients, n, seed)]
    low, high = percentile_interval(np.concatenate(draws) if draws else [], level)
    return low, high


def evaluate_predictions(predictions: pd.DataFrame, bootstrap: int, seed: int, *, prevalence: float | None = None,
                         reference: str | None = None, threshold: float | None = None) -> dict:
    """predictions: image_id, patient_id, label, prob, split (val and test). Threshold from val, metrics on test.
    A given `threshold` (the model folder's, for an external test set: cxrflow.external) is used as it is, and
    then no val rows are needed.

    Besides the paper's columns (top-level keys, as before): `clinical`, every metric at the threshold with its
    patient-bootstrap 95% CI; `at_prevalence`, PPV and NPV at a clinical `prevalence` (Bayes, from the test
    sensitivity and specificity, with CIs from the same resamples); with `reference` (a column of other scores,
    e.g. the metadata baseline), `reference_auc_difference`, the paired AUC difference prob - reference.
    """
    val = predictions[predictions["split"] == "val"]
    test = predictions[predictions["split"] == "test"]
    threshold = youden_threshold(val["label"], val["prob"]) if threshold is None else float(threshold)
    at_youden = threshold_metrics(test["label"], test["prob"], threshold)
    at_half = threshold_metrics(test["label"], test["prob"], 0.5)
    point = point_metrics(test["label"], test["prob"], threshold, prevalence)
    ci = bootstrap_metrics(test["label"], test["prob"], test["patient_id"], threshold, bootstrap, seed,
                           prevalence=prevalence, reference=None if reference is None else test[reference])
    missing = [float("nan"), float("nan")]
    result = {
        "n_test": len(test),
        "n_test_patients": int(test["patient_id"].nunique()),
        "n_test_positive": int(test["label"].sum()),
        "n_test_positive_patients": int(test.loc[test["label"] == 1, "patient_id"].nunique()),
        "test_prevalence": float(test["label"].mean()),
        "auc": point["auc"],
        "auc_ci95": ci.get("auc", missing),
        **at_youden,
        "at_0.5": at_half,
        "bootstrap": {"resamples": bootstrap, "unit": "patient", "interval": "percentile 95%"},
        "clinical": {name: {"value": point[name], "ci95": ci.get(name, missing)} for name in ("auc", *THRESHOLD_METRICS)},
    }
    if prevalence is not None:
        result["at_prevalence"] = {"prevalence": prevalence, **{
            name: {"value": point[f"{name}_at_prevalence"], "ci95": ci.get(f"{name}_at_prevalence", missing)}
            for name in ("ppv", "npv")}}
    if reference is not None:
        result["reference_auc_difference"] = {"value": point["auc"] - weighted_auc(test["label"], test[reference]),
                                              "ci95": ci.get("auc_difference", missing)}
    return result


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


def plot_confusion(metrics: dict, title: str, out_path) -> None:
    """The test split's confusion matrices at the validation-chosen threshold and at 0.5, counts written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"Youden threshold {metrics['threshold']:.2f}", metrics["confusion_matrix"]),
              ("threshold 0.50", metrics["at_0.5"]["confusion_matrix"])]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.8))
    for ax, (name, matrix) in zip(axes, panels):
        matrix = np.asarray(matrix)
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1, matrix.max()))
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=12,
                    color="white" if count > matrix.max() / 2 else "black")
        ax.set_xticks([0, 1], ["predicted no", "predicted yes"])
        ax.set_yticks([0, 1], ["no finding", "finding"])
        ax.set_title(name, fontsize=9)
    fig.suptitle(f"{title}: confusion matrices on the test split ({metrics['n_test']} images)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def plot_training_curves(history: pd.DataFrame, best_epoch: int, title: str, out_path) -> None:
    """Training loss and validation AUC per epoch; the epoch whose weights were kept is marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = history["epoch"] + 1
    fig, ax_loss = plt.subplots(figsize=(6, 3.8))
    ax_loss.plot(epochs, history["train_loss"], "o-", color="tab:blue", label="training loss")
    ax_loss.set(xlabel="epoch", ylabel="training loss (weighted BCE)")
    ax_auc = ax_loss.twinx()
    ax_auc.plot(epochs, history["val_auc"], "s-", color="tab:orange", label="validation AUC")
    ax_auc.set(ylabel="validation AUC", ylim=(min(0.4, float(history["val_auc"].min()) - 0.02), 1.01))
    ax_loss.axvline(best_epoch + 1, color="0.3", ls=":", label=f"kept: epoch {best_epoch + 1}")
    handles = ax_loss.get_legend_handles_labels()[0] + ax_auc.get_legend_handles_labels()[0]
    ax_loss.legend(handles=handles, loc="center right", fontsize=8)
    ax_loss.set_title(f"{title}: training curves", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
