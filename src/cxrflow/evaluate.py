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
