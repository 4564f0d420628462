"""End to end: the real Snakemake workflow on the tiny synthetic config, in a copy of the repository."""

import re

import pandas as pd
import pytest

from conftest import snakemake_tiny as snakemake

pytestmark = pytest.mark.e2e


def test_metrics_table_has_every_pathology_and_weighted_recall_equals_accuracy(tiny_run):
    table = pd.read_csv(tiny_run / "results" / "metrics_table.csv")
    assert len(table) == 9
    assert set(table["pathology"]) == {"enlarged_heart", "enlarged_heart_shadow", "aorta_unfolded", "aorta_compacted",
                                       "aortic_atherosclerosis", "dome_relaxation", "aortic_arch_sclerosis", "scoliosis",
                                       "vascular_roots"}
    assert (table["recall_weighted"] - table["accuracy"]).abs().max() < 1e-9
    assert table["auc"].between(0, 1).all() and (table["auc_ci_low"] <= table["auc_ci_high"]).all()
    assert (tiny_run / "results" / "metrics_table.md").read_text().count("\n|") >= 10
    assert (tiny_run / "results" / "roc_all.png").stat().st_size > 10_000


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
    truth = pd.read_csv(tiny_run / "resources" / "synthetic" / "truth.csv").merge(quality, on="image_id")
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
