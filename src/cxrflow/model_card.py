"""Model cards: each model folder says what the model is for, how its labels were made and how it was tested.

`model_card.json` is the machine-readable twin of `model_card.md`. Its top level uses the MONAI bundle metadata
field names where they fit (version, task, description, intended_use, data_source, network_data_format,
eval_metrics, *_version, references); everything specific to cxrflow (the label definition, the cohort's flow, the
threshold, calibration, subgroups, the metadata baseline, provenance) sits under "cxrflow".
"""

from __future__ import annotations

import math

import pandas as pd

NEGATIVE_RULES = {
    "normal": "the source affirms a normal study, no labelled finding is present or uncertain, and no quality tag",
    "unlabelled": "no labelled finding is present and the target is absent (images with nothing affirmed count)",
}
INTENDED_USE = (
    "Research on retrospective chest radiographs: estimating how well this finding can be recognised in this archive "
    "and comparing training settings. Not a medical device, not validated for clinical decisions, and not to be "
    "applied to another population, scanner, view or age range than the cohort below without an external test."
)
CLINICAL_METRICS = [("auc", "AUC"), ("sensitivity", "Sensitivity"), ("specificity", "Specificity"), ("ppv", "PPV"),
                    ("npv", "NPV"), ("accuracy", "Accuracy"), ("precision_weighted", "Precision (weighted)"),
                    ("recall_weighted", "Recall (weighted) = accuracy"), ("f1_weighted", "F1 (weighted)")]


def strict_json(value):
    """NaN and infinity become null and numpy scalars plain numbers, so that the JSON twin is strict JSON."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if hasattr(value, "item"):
        return strict_json(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _interval(entry: dict) -> str:
    low, high = entry["ci95"]
    return f"{_fmt(entry['value'])} ({_fmt(low)}-{_fmt(high)})"


def label_definition(cohorts: dict, pathology: str) -> dict:
    """What a positive and a negative image of this cohort are: the model folder's label.json and the card's."""
    from cxrflow.cohorts import exclusion_keys

    negatives = cohorts.get("negatives", "normal")
    return {
        "pathology": pathology,
        "positive_keys": list(cohorts["pathologies"][pathology]["positive"]),
        "negative_rule": negatives,
        "negative_rule_text": NEGATIVE_RULES.get(negatives, negatives),
        "exclusions": exclusion_keys(cohorts, pathology),
        "uncertain_exclusions": cohorts.get("uncertain_exclusions", "remove"),
        "filters": cohorts.get("filters", {}),
        "balance": cohorts.get("balance"),
        "max_per_class": cohorts.get("max_per_class"),
    }


def build_card(metadata: dict, threshold: dict, metrics: dict, flow: pd.DataFrame, manifest: pd.DataFrame, config: dict,
               pathology: str) -> dict:
    """The card as a dict (the JSON twin); `config` holds the model's, the evaluation's and the cohort's settings."""
    cohorts = config["cohorts"]
    entry = cohorts["pathologies"][pathology]
    name = entry.get("name", {})
    counts = manifest.groupby(["split", "label"]).size().unstack(fill_value=0)
    patients = manifest.groupby("split")["patient_id"].nunique()
    split_counts = {split: {"images": int(counts.loc[split].sum()), "positive": int(counts.loc[split].get(1, 0)),
                            "negative": int(counts.loc[split].get(0, 0)), "patients": int(patients[split])}
                    for split in counts.index}
    versions = metadata.get("versions", {})
    size = metadata["input"]["size"]
    permuted = bool(metadata.get("permuted_labels", False))
    description = (f"Binary classifier for '{name.get('en', pathology)}' on frontal chest radiographs "
                   f"({metadata['architecture']['name']}, {size} px, one channel); output P(finding).")
    if permuted:
        description = "CONTROL MODEL, trained on permuted labels (train.permute_labels): it must not be used. " + description
    card = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": versions.get("cxrflow", "unknown"),
        "task": f"binary classification: {name.get('en', pathology)}",
        "description": description,
        "intended_use": INTENDED_USE,
        "data_source": config.get("source", {}).get("format", "unknown"),
        "data_type": "chest radiographs (DICOM, PNG or JPEG), normalised to uint8",
        "monai_version": versions.get("monai"),
        "pytorch_version": versions.get("torch"),
        "numpy_version": versions.get("numpy"),
        "required_packages_version": {k: v for k, v in versions.items() if k not in ("monai", "torch", "numpy")},
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "XR", "num_channels": 1,
                                 "spatial_shape": [size, size], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": False, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "probabilities", "format": "classes", "num_channels": 1, "spatial_shape": [1],
                                 "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                                 "channel_def": {"0": pathology}}},
        },
        "eval_metrics": {"auc": metrics["auc"], **{k: metrics["clinical"][k]["value"] for k, _ in CLINICAL_METRICS[1:]}},
        "references": ["Paper's design: nine extrapulmonary findings on >2M Russian-annotated chest X-rays (README)"],
        "cxrflow": {
            "pathology": pathology,
            "name": name,
            "permuted_labels_control": permuted,
            "label_definition": label_definition(cohorts, pathology),
            "cohort_flow": flow.astype(object).where(flow.notna(), None).to_dict("records"),
            "splits": split_counts,
            "split_settings": config.get("split", {}),
            "preprocessing": {**metadata["input"], "seed": config.get("seed")},
            "training": {k: metadata.get(k) for k in ("best_epoch", "best_val_auc", "epochs_run", "effective_batch",
                                                      "loss_weighting", "augmentation")},
            "threshold": threshold,
            "metrics": {"n_test": metrics["n_test"], "n_test_patients": metrics["n_test_patients"],
                        "n_test_positive": metrics["n_test_positive"], "test_prevalence": metrics.get("test_prevalence"),
                        "bootstrap": metrics.get("bootstrap"), "clinical": metrics["clinical"],
                        "at_prevalence": metrics.get("at_prevalence"), "at_0.5": metrics.get("at_0.5")},
            "calibration": metrics.get("calibration"),
            "subgroups": metrics.get("subgroups"),
            "min_subgroup_patients": metrics.get("min_subgroup_patients"),
            "baseline": metrics.get("baseline"),
            "provenance": {"config_hash": metadata.get("config_hash"), "git_commit": metadata.get("git_commit"),
                           "git_dirty": metadata.get("git_dirty"), "versions": versions,
                           "runtime": metadata.get("runtime")},
        },
    }
    return strict_json(card)


def card_markdown(card: dict) -> str:
    own = card["cxrflow"]
    label, metrics, threshold = own["label_definition"], own["metrics"], own["threshold"]
    title = own["name"].get("en", own["pathology"])
    lines = [f"# Model card: {title}" + (f" ({own['name']['ru']})" if own["name"].get("ru") else ""), ""]
    if own["permuted_labels_control"]:
        lines += ["> **CONTROL MODEL.** Trained on permuted training labels (`train.permute_labels: true`) to show "
                  "that the pipeline learns nothing without the labels. Its AUC must be at chance. Do not use it.", ""]
    lines += [card["description"], "", "## Intended use and limits", "", card["intended_use"], "",
              f"Measured on a test split with {100 * metrics['test_prevalence']:.0f}% prevalence; "
              "PPV and NPV at a clinic's prevalence are below. Every figure below comes from one archive "
              f"(source format `{card['data_source']}`).", "",
              "## Label definition", "",
              f"- positive: an image whose labels include {', '.join(f'`{k}`' for k in label['positive_keys'])}",
              f"- negative (`{label['negative_rule']}`): {label['negative_rule_text']}",
              f"- excluded from both classes: {', '.join(f'`{k}`' for k in label['exclusions']) or 'none'}",
              f"- filters: {', '.join(f'{k} = {v}' for k, v in label['filters'].items()) or 'none'}; "
              f"balance: {label['balance']}", "", "## Cohort flow", "",
              "| step | images | patients | removed images | reason |", "|---|---|---|---|---|"]
    for step in own["cohort_flow"]:
        lines.append(f"| {step['step']} | {step['images']} | {step['patients']} | {step.get('removed_images') or 0} | "
                     f"{step.get('reason') or ''} |")
    lines += ["", "| split | images | positive | negative | patients |", "|---|---|---|---|---|"]
    for split in ("train", "val", "test"):
        if split in own["splits"]:
            s = own["splits"][split]
            lines.append(f"| {split} | {s['images']} | {s['positive']} | {s['negative']} | {s['patients']} |")
    pre = own["preprocessing"]
    lines += ["", "## Preprocessing", "",
              f"- {pre['size']} x {pre['size']} px, {pre['channels']} channel; intensity: {pre['intensity']}",
              f"- clip percentiles {pre.get('clip_percentiles')}, CLAHE {pre.get('clahe')}, per-image z-score {pre.get('zscore')}",
              "", "## Decision threshold", "",
              f"{_fmt(threshold['threshold'], 4)} on the raw probability, chosen on {threshold['chosen_on']}"
              + (f"; temperature {_fmt(threshold['temperature'])} (calibrated threshold "
                 f"{_fmt(threshold['threshold_calibrated'], 4)})" if threshold.get("temperature") else "") + ".",
              "The same number is in `threshold.json` beside the weights.", "",
              f"## Test metrics ({metrics['n_test']} images, {metrics['n_test_patients']} patients, "
              f"{metrics['n_test_positive']} positive)", "",
              "Point estimate (patient-level bootstrap 95% CI, "
              f"{(metrics.get('bootstrap') or {}).get('resamples', '?')} resamples); at the threshold above.", "",
              "| metric | value (95% CI) |", "|---|---|"]
    for key, name in CLINICAL_METRICS:
        lines.append(f"| {name} | {_interval(metrics['clinical'][key])} |")
    prevalence = metrics.get("at_prevalence")
    if prevalence:
        lines.append(f"| PPV at prevalence {prevalence['prevalence']:.1%} | {_interval(prevalence['ppv'])} |")
        lines.append(f"| NPV at prevalence {prevalence['prevalence']:.1%} | {_interval(prevalence['npv'])} |")
    calibration = own.get("calibration") or {}
    lines += ["", "## Calibration", "",
              f"Expected calibration error on test ({calibration.get('bins')} bins): {_fmt(calibration.get('ece'))}"
              + (f"; after temperature scaling (T = {_fmt(calibration['temperature'])}, fitted on validation"
                 + (", at the end of its search range: validation could not determine it" if calibration.get(
                     "temperature_at_bound") else "") + "): "
                 f"{_fmt(calibration.get('ece_temperature_scaled'))}" if calibration.get("temperature") else
                 "; no temperature scaling (`evaluate.temperature_scaling: false`)") + ".", ""]
    if own.get("subgroups") is not None:
        lines += ["## Subgroups (test)", "",
                  f"AUC (95% CI) where each class has at least {own.get('min_subgroup_patients')} patients; otherwise too small.",
                  "", "| attribute | group | images | patients (pos./neg.) | AUC (95% CI) |", "|---|---|---|---|---|"]
        for row in own["subgroups"]:
            shown = (f"{_fmt(row['auc'])} ({_fmt(row['auc_ci_low'])}-{_fmt(row['auc_ci_high'])})" if row["status"] == "ok"
                     else row["status"])
            lines.append(f"| {row['attribute']} | {row['group']} | {row['n_images']} | "
                         f"{row['n_positive_patients']}/{row['n_negative_patients']} | {shown} |")
        lines.append("")
    baseline = own.get("baseline")
    if baseline:
        verdict = "beats" if baseline["network_beats_baseline"] else "**does not beat**"
        lines += ["## Shortcut baseline", "",
                  f"A logistic regression on metadata alone ({', '.join(baseline['features']) or 'no varying feature'}), "
                  f"on the same splits: AUC {_fmt(baseline['auc'])} ({_fmt(baseline['auc_ci95'][0])}-"
                  f"{_fmt(baseline['auc_ci95'][1])}). Network minus baseline: {_fmt(baseline['auc_difference'])} "
                  f"(paired 95% CI {_fmt(baseline['auc_difference_ci95'][0])} to {_fmt(baseline['auc_difference_ci95'][1])}): "
                  f"the network {verdict} the metadata.", ""]
    prov = own["provenance"]
    lines += ["## Provenance", "",
              f"- git commit `{prov.get('git_commit')}`" + (" (working tree with uncommitted changes)" if prov.get("git_dirty")
                                                            else " (clean)" if prov.get("git_dirty") is False else ""),
              f"- config hash `{prov.get('config_hash')}`",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in (prov.get("versions") or {}).items()), ""]
    return "\n".join(lines)
