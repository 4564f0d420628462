"""End to end: the real Snakemake workflow on the tiny synthetic config, in a copy of the repository."""

import json
import re

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from conftest import snakemake_tiny as snakemake
from test_evaluate import drawn_png

pytestmark = pytest.mark.e2e


def test_metrics_tables_are_those_of_the_predictions_and_the_true_labels_are_learnt(tiny_run):
    results = tiny_run / "results"
    table = pd.read_csv(results / "metrics_table.csv")
    assert set(table["pathology"]) == {"enlarged_heart", "enlarged_heart_shadow", "aorta_unfolded", "aorta_compacted",
                                       "aortic_atherosclerosis", "dome_relaxation", "aortic_arch_sclerosis", "scoliosis",
                                       "vascular_roots"}
    clinical = pd.read_csv(results / "clinical_table.csv").set_index("pathology")
    for row in table.itertuples():
        predictions = pd.read_csv(results / "predictions" / f"{row.pathology}.csv")
        test = predictions[predictions["split"] == "test"]
        # Recomputed from the predictions the evaluation wrote (the table rounds to 4 digits).
        assert row.auc == pytest.approx(roc_auc_score(test["label"], test["prob"]), abs=1e-4), row.pathology
        threshold = json.loads((results / "models" / row.pathology / "threshold.json").read_text())
        called = test["prob"] >= threshold["threshold"]  # full precision: the table's is rounded
        positive = test["label"] == 1
        assert clinical.loc[row.pathology, "sensitivity"] == pytest.approx((called & positive).sum() / positive.sum(), abs=1e-4)
        assert clinical.loc[row.pathology, "specificity"] == pytest.approx((~called & ~positive).sum() / (~positive).sum(), abs=1e-4)
        assert row.accuracy == pytest.approx((called == positive).mean(), abs=1e-4)
        assert threshold["threshold"] == pytest.approx(row.threshold, abs=1e-4) and threshold["temperature"] > 0
        card = json.loads((results / "models" / row.pathology / "model_card.json").read_text())
        assert card["cxrflow"]["label_definition"]["positive_keys"] == [row.pathology]
        assert card["cxrflow"]["threshold"]["threshold"] == threshold["threshold"]
        assert card["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32]
        assert card["cxrflow"]["provenance"]["config_hash"] and "git_dirty" in card["cxrflow"]["provenance"]
    # No claim about learning here: with 4-13 test images per cohort, a cohort's AUC under the null has an SD of
    # 0.17-0.32 (cxrflow.metrics.auc_null_sd), and two epochs on ~20 images learn little. The learning control, true
    # against permuted labels on a test split large enough to tell them apart, is tests/test_metrics_control.py.
    # Intervals that say something: every cohort's sensitivity and AUC intervals are computed (not NaN).
    assert clinical[["sensitivity_ci_low", "sensitivity_ci_high", "auc_ci_low"]].notna().all().all()
    # At 10% prevalence a call means less than in the ~50% test split (equal only where specificity is 1).
    defined = clinical["ppv"].notna()
    assert (clinical.loc[defined, "ppv_at_prevalence"] <= clinical.loc[defined, "ppv"] + 1e-9).all()
    assert (clinical.loc[defined, "ppv_at_prevalence"] < clinical.loc[defined, "ppv"]).any()
    markdown = (results / "clinical_table.md").read_text()
    assert markdown.count("(models/") == 9 * 4  # each pathology links its model card in each of the four tables
    subgroups = pd.read_csv(results / "subgroups.csv")
    too_small = subgroups["status"] != "ok"
    assert too_small.any() and subgroups.loc[too_small, "auc"].isna().all() and subgroups.loc[~too_small, "auc"].notna().all()
    assert drawn_png(results / "roc_all.png") == (660, 660)


def test_no_patient_in_two_splits(tiny_run):
    for manifest in (tiny_run / "results" / "splits").glob("*.csv"):
        frame = pd.read_csv(manifest)
        assert (frame.groupby("patient_id")["split"].nunique() == 1).all(), manifest.name
        assert set(frame["split"]) == {"train", "val", "test"}


def test_every_input_image_is_used_or_listed_with_a_reason(tiny_run):
    annotations = pd.read_csv(tiny_run / "resources" / "synthetic" / "annotations.csv")
    catalog = pd.read_parquet(tiny_run / "results" / "catalog.parquet")
    ledger = pd.read_csv(tiny_run / "results" / "ingest" / "ledger.csv")
    assert len(catalog) + len(ledger) == len(annotations)
    quality = pd.read_parquet(tiny_run / "results" / "quality" / "metrics.parquet")
    assert sorted(quality["image_id"]) == sorted(catalog["image_id"])
    assert quality.loc[~quality["qc_pass"], "qc_reason"].notna().all()
    # The planted bad images are the ones QC rejects.
    # The truth table names images by their original ids; the private catalog maps them to the pseudonyms.
    private = pd.read_parquet(tiny_run / "results" / "private" / "catalog.parquet", columns=["image_id", "source_id"])
    truth = (pd.read_csv(tiny_run / "resources" / "synthetic" / "truth.csv").rename(columns={"image_id": "source_id"})
             .merge(private, on="source_id").merge(quality, on="image_id"))
    assert len(truth) == len(quality), "every judged image is found in the truth table"
    assert not truth.loc[truth["quality"] != "ok", "qc_pass"].any()
    assert truth.loc[truth["quality"] == "ok", "qc_pass"].mean() > 0.97
    assert list((tiny_run / "results" / "quality" / "rejects").glob("*.png"))
    # One ledger lists every image left out before the cohorts: ingest rows and QC rejects, each with a reason.
    full_ledger = pd.read_csv(tiny_run / "results" / "ledger.csv")
    assert len(full_ledger) == len(ledger) + int((~quality["qc_pass"]).sum())
    assert full_ledger["reason"].notna().all()
    for flow_file in (tiny_run / "results" / "cohorts").glob("*_flow.csv"):
        flow = pd.read_csv(flow_file)
        assert flow["images"].iloc[0] == len(catalog)
        assert flow["images"].iloc[0] - flow["removed_images"].sum() == flow["images"].iloc[-1]


def test_second_run_does_nothing(tiny_run):
    assert "Nothing to be done" in snakemake(tiny_run, "-n").stdout


def test_one_pathology_is_rerun_by_naming_its_target(tiny_run):
    (tiny_run / "results" / "metrics" / "scoliosis.json").unlink()
    dry = snakemake(tiny_run, "-n", "results/metrics/scoliosis.json").stdout
    jobs = re.findall(r"^rule (\w+):", dry, flags=re.M) or re.findall(r"^localrule (\w+):", dry, flags=re.M)
    assert jobs == ["evaluate"], dry[-2000:]
    snakemake(tiny_run, "results/metrics/scoliosis.json")
    assert (tiny_run / "results" / "metrics" / "scoliosis.json").exists()
