"""The tables that summarise all cohorts: the paper's Table 1 (plus the AUC CI and counts), the clinical table
(every metric with its interval, prevalence, calibration, the metadata baseline), the subgroups; and the ROC figure."""

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
            "mode": m.get("mode", "binary"),  # which kind of model made the row: binary, or one multilabel network
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


CLINICAL_COLUMNS = ("auc", "sensitivity", "specificity", "ppv", "npv", "accuracy", "precision_weighted", "recall_weighted",
                    "f1_weighted")


def clinical_table(metric_files: dict[str, str | Path], names: dict[str, dict]) -> pd.DataFrame:
    """One row per pathology: every metric at the validation threshold with its patient-bootstrap 95% CI, PPV and
    NPV at the configured clinical prevalence, calibration and the metadata baseline."""
    rows = []
    for pathology, path in metric_files.items():
        m = json.loads(Path(path).read_text())
        row = {"pathology": pathology, "name_en": names[pathology].get("en", pathology), "n_test": m["n_test"],
               "n_test_positive": m["n_test_positive"], "n_test_patients": m["n_test_patients"],
               "test_prevalence": m.get("test_prevalence"), "threshold": m["threshold"],
               "permuted_labels": m.get("permuted_labels", False)}
        for name in CLINICAL_COLUMNS:
            entry = m["clinical"][name]
            row |= {name: entry["value"], f"{name}_ci_low": entry["ci95"][0], f"{name}_ci_high": entry["ci95"][1]}
        if m.get("at_prevalence"):
            at = m["at_prevalence"]
            row["clinical_prevalence"] = at["prevalence"]
            for name in ("ppv", "npv"):
                row |= {f"{name}_at_prevalence": at[name]["value"], f"{name}_at_prevalence_ci_low": at[name]["ci95"][0],
                        f"{name}_at_prevalence_ci_high": at[name]["ci95"][1]}
        calibration = m.get("calibration", {})
        row |= {"ece": calibration.get("ece"), "temperature": calibration.get("temperature"),
                "temperature_at_bound": calibration.get("temperature_at_bound"),
                "ece_temperature_scaled": calibration.get("ece_temperature_scaled")}
        if m.get("baseline"):
            b = m["baseline"]
            row |= {"baseline_features": " ".join(b["features"]), "baseline_auc": b["auc"],
                    "baseline_auc_ci_low": b["auc_ci95"][0], "baseline_auc_ci_high": b["auc_ci95"][1],
                    "auc_minus_baseline": b["auc_difference"], "auc_minus_baseline_ci_low": b["auc_difference_ci95"][0],
                    "auc_minus_baseline_ci_high": b["auc_difference_ci95"][1],
                    "network_beats_baseline": b["network_beats_baseline"]}
        rows.append(row)
    return pd.DataFrame(rows)


def _ci(row, name: str) -> str:
    value, low, high = row.get(name), row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high")
    if value is None or pd.isna(value):
        return "n/a"
    dash = " to " if (not pd.isna(low) and low < 0) else "-"  # "-0.2 to 0.3", never "-0.2-0.3"
    return f"{value:.3f} ({'n/a' if pd.isna(low) else f'{low:.3f}'}{dash}{'n/a' if pd.isna(high) else f'{high:.3f}'})"


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def clinical_markdown(table: pd.DataFrame, card_links: dict[str, str] | None = None) -> str:
    """The clinical table, the paper's columns with intervals, calibration, and the shortcut baseline; each
    pathology links to its model card (paths relative to results/)."""
    card_links = card_links or {}
    records = table.to_dict("records")
    name = lambda r: (f"[{r['name_en']}]({card_links[r['pathology']]})" if r["pathology"] in card_links  # noqa: E731
                      else r["name_en"]) + (" (permuted-label control)" if r.get("permuted_labels") else "")
    prevalence = table["clinical_prevalence"].dropna().iloc[0] if "clinical_prevalence" in table and table[
        "clinical_prevalence"].notna().any() else None
    header = ["Pathology", "n test (pos.)", "AUC", "Sensitivity", "Specificity", "PPV", "NPV"]
    if prevalence is not None:
        header += [f"PPV at {prevalence:.0%}", f"NPV at {prevalence:.0%}"]
    rows = []
    for r in records:
        cells = [name(r), f"{r['n_test']} ({r['n_test_positive']})", *(_ci(r, k) for k in ("auc", "sensitivity", "specificity",
                                                                                           "ppv", "npv"))]
        if prevalence is not None:
            cells += [_ci(r, "ppv_at_prevalence"), _ci(r, "npv_at_prevalence")]
        rows.append(cells)
    lines = ["# Clinical metrics on the test split", "",
             "Point estimate (patient-level bootstrap 95% CI) at the threshold chosen on validation (Youden's J). "
             "PPV and NPV are at the test split's own prevalence (the calibration table's column; about 50% in a "
             "balanced cohort)"
             + (f"; the last two columns are PPV and NPV at a clinical prevalence of {prevalence:.1%} "
                "(`evaluate.prevalence`), by Bayes' rule from the sensitivity and specificity." if prevalence is not None else "."),
             "", *_markdown_table(header, rows), "", "## The paper's columns with intervals", "",
             *_markdown_table(["Pathology", "Accuracy", "Precision (w)", "Recall (w)", "F1 (w)"],
                              [[name(r), *(_ci(r, k) for k in ("accuracy", "precision_weighted", "recall_weighted",
                                                               "f1_weighted"))] for r in records]),
             "", "Weighted recall equals accuracy by definition; it is kept because the paper's Table 1 has it.", "",
             "## Calibration", "",
             *_markdown_table(["Pathology", "test prevalence", "ECE", "temperature", "ECE after scaling"],
                              [[name(r), f"{r['test_prevalence']:.2f}", _num(r.get("ece")),
                                _num(r.get("temperature")) + (" (at bound)" if r.get("temperature_at_bound") is True else ""),
                                _num(r.get("ece_temperature_scaled"))] for r in records]),
             "", "A temperature at the end of its search range (0.05 or 20) means the validation split could not "
                 "determine one (too small, or perfectly separated).", ""]
    if "baseline_auc" in table.columns:
        lines += ["## Shortcut baseline: metadata alone", "",
                  "A logistic regression on metadata (features listed), fitted on the same train split, scored on the same "
                  "test split. The difference is the network's AUC minus the baseline's over the same patient resamples; "
                  "a cohort whose interval does not lie above 0 is flagged.", "",
                  *_markdown_table(["Pathology", "features", "network AUC", "metadata AUC", "difference (paired CI)", "flag"],
                                   [[name(r), r.get("baseline_features") or "none", _ci(r, "auc"), _ci(r, "baseline_auc"),
                                     _ci(r, "auc_minus_baseline"),
                                     "" if r.get("network_beats_baseline") else "**network does not beat metadata**"]
                                    for r in records]), ""]
    return "\n".join(lines)


def _num(value) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{value:.3f}"


def subgroups_table(subgroup_files: dict[str, str | Path], names: dict[str, dict]) -> pd.DataFrame:
    frames = [pd.read_csv(path).assign(pathology=p, name_en=names[p].get("en", p)) for p, path in subgroup_files.items()]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return table[["pathology", "name_en", *[c for c in table.columns if c not in ("pathology", "name_en")]]]


def subgroups_markdown(table: pd.DataFrame, min_patients: int) -> str:
    rows = [[r["name_en"], r["attribute"], str(r["group"]), str(r["n_images"]),
             f"{r['n_positive_patients']}/{r['n_negative_patients']}",
             _ci(r, "auc") if r["status"] == "ok" else r["status"]] for r in table.to_dict("records")]
    return "\n".join(["# Subgroups of the test split", "",
                      f"AUC (patient-level bootstrap 95% CI) where each class has at least {min_patients} patients "
                      "(`evaluate.min_subgroup_patients`); a smaller subgroup is listed as too small, without a number.", "",
                      *_markdown_table(["Pathology", "attribute", "group", "images", "patients (pos./neg.)", "AUC"], rows), ""])
