"""The clinical metrics, their patient bootstrap, calibration, subgroups, the metadata baseline and the model card,
each against numbers worked out by hand or known by construction."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from conftest import run_benchmark
from cxrflow.baselines import metadata_baseline, metadata_features
from cxrflow.calibration import apply_temperature, expected_calibration_error, fit_temperature, reliability_bins
from cxrflow.evaluate import evaluate_predictions
from cxrflow.metrics import (auc_null_sd, bayes_predictive_values, bootstrap_metrics, confusion_counts, point_metrics,
                             rates, weighted_auc)
from cxrflow.subgroups import age_bands, subgroup_table

# 6 negatives (2 called positive), 4 positives (3 found): TN 4, FP 2, FN 1, TP 3.
LABELS = [0] * 6 + [1] * 4
PROBS = [0.1, 0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.9, 0.9, 0.1]


def test_every_metric_matches_a_hand_counted_confusion_matrix():
    counts = confusion_counts(LABELS, np.asarray(PROBS) >= 0.5)
    assert counts.tolist() == [4, 2, 1, 3]
    r = {k: float(v) for k, v in rates(counts).items()}
    assert r["sensitivity"] == pytest.approx(3 / 4) and r["specificity"] == pytest.approx(4 / 6)
    assert r["ppv"] == pytest.approx(3 / 5) and r["npv"] == pytest.approx(4 / 5)
    assert r["accuracy"] == pytest.approx(7 / 10)
    assert r["precision_weighted"] == pytest.approx((6 * 4 / 5 + 4 * 3 / 5) / 10)  # 0.72: support-weighted PPV and NPV
    f1_pos, f1_neg = 2 * 3 / (2 * 3 + 2 + 1), 2 * 4 / (2 * 4 + 1 + 2)
    assert r["f1_weighted"] == pytest.approx((4 * f1_pos + 6 * f1_neg) / 10)
    # Bayes at 10% prevalence: PPV = 0.75 x 0.1 / (0.075 + (1/3) x 0.9) = 0.2; NPV = 0.6 / (0.6 + 0.25 x 0.1) = 0.96.
    ppv, npv = bayes_predictive_values(r["sensitivity"], r["specificity"], 0.1)
    assert float(ppv) == pytest.approx(0.2) and float(npv) == pytest.approx(0.96)
    # At the test split's own prevalence, Bayes gives back the counted PPV and NPV.
    ppv, npv = bayes_predictive_values(r["sensitivity"], r["specificity"], 0.4)
    assert float(ppv) == pytest.approx(3 / 5) and float(npv) == pytest.approx(4 / 5)
    point = point_metrics(LABELS, PROBS, 0.5, prevalence=0.1)
    assert point["ppv_at_prevalence"] == pytest.approx(0.2) and point["auc"] == pytest.approx(roc_auc_score(LABELS, PROBS))


def test_an_undefined_rate_is_nan_and_counts_zero_in_the_paper_s_weighted_means():
    r = {k: float(v) for k, v in rates(np.array([5, 0, 3, 0])).items()}  # nothing called positive
    assert np.isnan(r["ppv"]) and r["sensitivity"] == 0 and r["npv"] == pytest.approx(5 / 8)
    assert r["precision_weighted"] == pytest.approx(5 * (5 / 8) / 8)  # scikit-learn's zero_division=0


def test_weighted_auc_with_ties_equals_scikit_learn_with_sample_weights():
    rng = np.random.default_rng(0)
    for _ in range(50):
        labels = rng.integers(0, 2, 30)
        labels[:2] = [0, 1]
        scores = np.round(rng.random(30), 1)  # many ties
        weights = rng.integers(1, 4, 30)
        assert weighted_auc(labels, scores, weights) == pytest.approx(roc_auc_score(labels, scores, sample_weight=weights))
    assert np.isnan(weighted_auc([1, 1, 1], [0.1, 0.2, 0.3]))


def test_bootstrap_intervals_resample_patients_and_pair_the_baseline():
    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(60), 3)
    labels = np.repeat(np.arange(60) % 2, 3)
    probs = labels * 0.5 + rng.normal(0, 0.4, 60)[patients] + rng.normal(0, 0.1, 180)  # a patient's images agree
    ci = bootstrap_metrics(labels, probs, patients, 0.25, 300, seed=2, prevalence=0.1, reference=probs)
    point = point_metrics(labels, probs, 0.25, prevalence=0.1)
    for name, (low, high) in ci.items():
        if name != "auc_difference":
            assert low < point[name] < high, name  # a genuine spread: no degenerate zero-width interval
    assert ci["auc_difference"] == [0.0, 0.0]  # the same resamples for both scores: identical scores differ by 0
    assert ci == bootstrap_metrics(labels, probs, patients, 0.25, 300, seed=2, prevalence=0.1, reference=probs)  # seeded
    # Resampling a patient's correlated images as if independent would narrow the AUC interval.
    naive = bootstrap_metrics(labels, probs, np.arange(180), 0.25, 300, seed=2)["auc"]
    assert (naive[1] - naive[0]) < (ci["auc"][1] - ci["auc"][0])


def test_the_patient_bootstrap_covers_the_true_auc_about_95_percent_of_the_time(tmp_path):
    result = run_benchmark("bootstrap_coverage", "--quick", "--json", str(tmp_path / "coverage.json"), cwd=tmp_path)
    figures = json.loads((tmp_path / "coverage.json").read_text())
    patient, image = figures["coverage"]["patient"], figures["coverage"]["image"]
    # 200 simulated splits: the binomial SD of a 95% coverage is 0.015, so 0.89-0.99 is nominal within 4 SD.
    assert 0.89 <= patient["auc"] <= 0.99 and 0.89 <= patient["sensitivity"] <= 0.99, result.stdout
    # Resampling images of clustered patients as if independent under-covers, which is why patients are resampled.
    assert image["auc"] < patient["auc"] - 0.05, result.stdout


def test_evaluation_reports_every_metric_with_an_interval_and_the_prevalence_adjusted_values():
    val = pd.DataFrame({"split": "val", "label": [0, 0, 1, 1], "prob": [0.1, 0.2, 0.85, 0.95], "patient_id": list("abcd")})
    test = pd.DataFrame({"split": "test", "label": LABELS, "prob": PROBS, "patient_id": [f"t{i}" for i in range(10)]})
    m = evaluate_predictions(pd.concat([val, test]), bootstrap=200, seed=0, prevalence=0.1)
    assert 0.2 < m["threshold"] <= 0.85
    assert m["clinical"]["sensitivity"]["value"] == pytest.approx(0.75) and m["clinical"]["ppv"]["value"] == pytest.approx(0.6)
    assert m["at_prevalence"]["ppv"]["value"] == pytest.approx(0.2) and m["at_prevalence"]["npv"]["value"] == pytest.approx(0.96)
    low, high = m["clinical"]["specificity"]["ci95"]
    assert 0 <= low < 4 / 6 < high <= 1 and m["test_prevalence"] == pytest.approx(0.4)


def test_ece_is_small_for_calibrated_scores_and_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(3)
    truth = rng.uniform(0.02, 0.98, 20_000)
    labels = rng.random(20_000) < truth
    assert expected_calibration_error(labels, truth) < 0.02  # calibrated by construction
    overconfident = apply_temperature(truth, 0.5)  # logit doubled: the true temperature is 2
    assert expected_calibration_error(labels, overconfident) > 0.08
    temperature = fit_temperature(labels, overconfident)
    assert temperature == pytest.approx(2.0, rel=0.05)
    assert expected_calibration_error(labels, apply_temperature(overconfident, temperature)) < 0.02


def test_ece_by_hand():
    # Bin [0, 0.5): predictions 0.2, 0.2, observed 0 of 2 -> gap 0.2; bin [0.5, 1]: 0.9, 0.9, 0.9, 1.0, observed 2 of 4 -> gap 0.425.
    labels, probs = [0, 0, 1, 1, 0, 0], [0.2, 0.2, 0.9, 0.9, 0.9, 1.0]
    assert expected_calibration_error(labels, probs, bins=2) == pytest.approx((2 * 0.2 + 4 * 0.425) / 6)
    table = reliability_bins(labels, probs, bins=2)
    assert table["n"].tolist() == [2, 4] and table["observed"].tolist() == [0.0, 0.5]


def test_subgroups_under_the_patient_minimum_get_no_number():
    n = 40
    test = pd.DataFrame({"image_id": [f"i{i}" for i in range(n)], "patient_id": [f"p{i}" for i in range(n)],
                         "label": np.arange(n) % 2, "prob": (np.arange(n) % 2) * 0.6 + np.linspace(0, 0.3, n),
                         "age": [30] * 4 + [50] * 36, "view": ["AP"] * 10 + ["PA"] * 30})
    table = subgroup_table(test, [40, 60, 80], min_patients=5, bootstrap=50, seed=0).set_index(["attribute", "group"])
    assert table.loc[("age_band", "<40"), "status"].startswith("too small") and np.isnan(table.loc[("age_band", "<40"), "auc"])
    assert table.loc[("age_band", "40-59"), "status"] == "ok" and table.loc[("age_band", "40-59"), "auc"] == 1.0
    assert table.loc[("view", "PA"), "n_positive_patients"] == 15 and table.loc[("view", "AP"), "status"] == "ok"
    bands = age_bands(pd.Series([39, 40, 79, 80, None]), [40, 60, 80])
    assert bands.iloc[:4].tolist() == ["<40", "40-59", "60-79", ">=80"] and pd.isna(bands.iloc[4])


def test_the_metadata_baseline_finds_a_planted_view_shortcut():
    rng = np.random.default_rng(4)
    n = 400
    label = np.arange(n) % 2
    view = np.where(rng.random(n) < np.where(label == 1, 0.8, 0.2), "AP", "PA")  # AP films are mostly positives
    catalog = pd.DataFrame({"image_id": [f"i{i}" for i in range(n)], "patient_id": [f"p{i}" for i in range(n)],
                            "view": view, "age": rng.integers(20, 90, n), "study_date": pd.NaT})
    manifest = pd.DataFrame({"image_id": catalog["image_id"], "patient_id": catalog["patient_id"], "label": label,
                             "split": np.where(np.arange(n) < 250, "train", np.where(np.arange(n) < 300, "val", "test"))})
    probs, names = metadata_baseline(manifest, metadata_features(catalog))
    test = manifest["split"] == "test"
    assert "view_AP" in names and "age" in names and "follow_up" not in names  # no dates: no follow-up index
    years = catalog.assign(patient_id=[f"p{i // 2}" for i in range(n)], study_date=None, study_year=2020 + np.arange(n) % 2)
    assert metadata_features(years)["follow_up"].tolist()[:4] == [0, 1, 0, 1]  # a patient's second year is follow-up 1
    assert roc_auc_score(label[test], probs[test]) > 0.7
    flat, names = metadata_baseline(manifest, metadata_features(catalog.assign(view="PA", age=50)))
    assert names == [] and np.all(flat == 0.5)  # nothing varies: chance, not an error


def test_null_sd_of_the_auc_matches_simulation():
    rng = np.random.default_rng(5)
    aucs = [roc_auc_score(np.r_[np.ones(20), np.zeros(30)], rng.random(50)) for _ in range(3000)]
    assert np.std(aucs) == pytest.approx(auc_null_sd(20, 30), rel=0.08) and np.mean(aucs) == pytest.approx(0.5, abs=0.01)


def test_the_model_card_states_the_label_definition_threshold_and_a_permuted_label_control():
    from cxrflow.model_card import build_card, card_markdown

    val = pd.DataFrame({"split": "val", "label": [0, 0, 1, 1], "prob": [0.1, 0.2, 0.85, 0.95], "patient_id": list("abcd")})
    test = pd.DataFrame({"split": "test", "label": LABELS, "prob": PROBS, "patient_id": [f"t{i}" for i in range(10)]})
    metrics = evaluate_predictions(pd.concat([val, test]), bootstrap=50, seed=0, prevalence=0.1)
    metrics["calibration"] = {"bins": 10, "ece": 0.12, "temperature": None}
    metadata = {"architecture": {"name": "resnet10t"}, "input": {"size": 32, "channels": 1, "intensity": "uint8",
                                                                 "zscore": False}, "best_epoch": 1,
                "permuted_labels": True, "git_commit": "abc123", "git_dirty": True, "config_hash": "h1",
                "versions": {"cxrflow": "0.1.0", "torch": "2", "monai": "1", "numpy": "2"}}
    flow = pd.DataFrame({"step": ["catalog", "balance"], "images": [100, 20], "patients": [50, 15],
                         "removed_images": [0, 80], "reason": ["", "undersampled"]})
    manifest = pd.concat([val, test]).assign(image_id=lambda f: [f"i{i}" for i in range(len(f))])
    config = {"seed": 1, "source": {"format": "nih"}, "split": {"test": 0.25},
              "cohorts": {"filters": {"sex": "F"}, "exclusions": ["emphysema", "enlarged_heart"], "balance": "undersample",
                          "negatives": "normal",
                          "pathologies": {"enlarged_heart": {"name": {"en": "Cardiomegaly"}, "positive": ["enlarged_heart"],
                                                             "exclude_add": ["pneumonia"]}}}}
    threshold = {"threshold": metrics["threshold"], "chosen_on": "validation", "temperature": None}
    card = build_card(metadata, threshold, metrics, flow, manifest, config, "enlarged_heart")
    label = card["cxrflow"]["label_definition"]
    assert label["positive_keys"] == ["enlarged_heart"] and label["exclusions"] == ["emphysema", "pneumonia"]
    assert card["cxrflow"]["splits"]["test"] == {"images": 10, "positive": 4, "negative": 6, "patients": 10}
    assert card["eval_metrics"]["sensitivity"] == pytest.approx(0.75) and card["description"].startswith("CONTROL MODEL")
    assert json.loads(json.dumps(card, allow_nan=False))  # strict JSON: no NaN
    text = card_markdown(card)
    assert "**CONTROL MODEL.**" in text and "`abc123` (working tree with uncommitted changes)" in text
    assert "| Sensitivity | 0.750 (" in text and "| PPV at prevalence 10.0% | 0.200 (" in text
