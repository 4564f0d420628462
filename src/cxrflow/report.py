"""The metrics table (the paper's Table 1 plus CIs and counts) and the figures that summarise all cohorts."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def metrics_table(metric_files: dict[str, str | Path], manifests: dict[str, str | Path], names: dict[str, dict]) -> pd.DataFrame:
    rows = []
    for pathology, path in metric_files.items():
        m = json.loads(Path(path).read_text())
        manifest = pd.read_csv(manifests[pathology])
        counts = manifest["split"].value_counts()
        positives = manifest.loc[manifest["label"] == 1, "split"].value_counts()
        rows.append({
            "pathology": pathology,
            "name_en": names[pathology].get("en", pathology),
            "name_ru": names[pathology].get("ru", ""),
            "n_train": int(counts.get("train", 0)),
            "n_train_positive": int(positives.get("train", 0)),
            "n_val": int(counts.get("val", 0)),
            "n_val_positive": int(positives.get("val", 0)),
            "n_test": int(counts.get("test", 0)),
            "n_test_positive": m["n_test_positive"],
            "n_test_patients": m["n_test_patients"],
            "auc": m["auc"],
            "auc_ci_low": m["auc_ci95"][0],
            "auc_ci_high": m["auc_ci95"][1],
            "accuracy": m["accuracy"],
            "precision_weighted": m["precision_weighted"],
            "recall_weighted": m["recall_weighted"],
            "f1_weighted": m["f1_weighted"],
            "threshold": m["threshold"],
            "accuracy_at_0.5": m["at_0.5"]["accuracy"],
            "precision_weighted_at_0.5": m["at_0.5"]["precision_weighted"],
            "recall_weighted_at_0.5": m["at_0.5"]["recall_weighted"],
            "f1_weighted_at_0.5": m["at_0.5"]["f1_weighted"],
            "best_epoch": m.get("best_epoch"),
        })
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    shown = table.copy()
    shown["AUC (95% CI)"] = shown.apply(lambda r: f"{r.auc:.3f} ({r.auc_ci_low:.3f}-{r.auc_ci_high:.3f})", axis=1)
    shown["n test (pos.)"] = shown.apply(lambda r: f"{r.n_test} ({r.n_test_positive})", axis=1)
    columns = {"name_en": "Pathology", "n_train": "n train", "n test (pos.)": "n test (pos.)", "AUC (95% CI)": "AUC (95% CI)",
               "accuracy": "Accuracy", "precision_weighted": "Precision (w)", "recall_weighted": "Recall (w)",
               "f1_weighted": "F1 (w)"}
    shown = shown[list(columns)].rename(columns=columns)
    mean = table[["auc", "accuracy", "precision_weighted", "recall_weighted", "f1_weighted"]].mean()
    lines = ["| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
    for _, r in shown.iterrows():
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values) + " |")
    lines.append(f"| **Mean** | | | {mean.auc:.3f} | {mean.accuracy:.3f} | {mean.precision_weighted:.3f} | "
                 f"{mean.recall_weighted:.3f} | {mean.f1_weighted:.3f} |")
    return "\n".join(lines) + ("\n\nMetrics on the patient-exclusive test split: AUC with its patient-level bootstrap 95% CI; "
                                "accuracy and weighted precision, recall and F1 at the threshold chosen on validation "
                                "(Youden's J). The figures at 0.5 are in metrics_table.csv.\n")


def plot_all_roc(prediction_files: dict[str, str | Path], names: dict[str, dict], out_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(6, 6))
    for pathology, path in prediction_files.items():
        test = pd.read_csv(path).query("split == 'test'")
        fpr, tpr, _ = roc_curve(test["label"], test["prob"])
        ax.plot(fpr, tpr, label=f"{names[pathology].get('en', pathology)} ({roc_auc_score(test['label'], test['prob']):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC on the test split, all pathologies")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
