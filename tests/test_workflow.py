"""End to end: the real Snakemake workflow on the tiny synthetic config, in a copy of the repository."""

import json
import os
import re

import numpy as np
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


def frontal_adult_women(catalog: pd.DataFrame) -> pd.DataFrame:
    """The catalog rows that config.yaml's cohorts.filters keep (views PA/AP, sex F, age 18-120): the candidates."""
    return catalog[catalog["view"].isin(["PA", "AP"]) & catalog["sex"].eq("F") & catalog["age"].between(18, 120)]


def test_every_input_image_is_used_or_listed_with_a_reason(tiny_run):
    annotations = pd.read_csv(tiny_run / "resources" / "synthetic" / "annotations.csv")
    catalog = pd.read_parquet(tiny_run / "results" / "catalog.parquet")
    ledger = pd.read_csv(tiny_run / "results" / "ingest" / "ledger.csv")
    assert len(catalog) + len(ledger) == len(annotations)
    quality = pd.read_parquet(tiny_run / "results" / "quality" / "metrics.parquet")
    # Only the pre-filter's candidates are decoded and judged; the others are in the ledger (stage prefilter).
    candidates = frontal_adult_women(catalog)
    assert 0 < len(candidates) < len(catalog)
    assert sorted(quality["image_id"]) == sorted(candidates["image_id"])
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
    # One ledger lists every image left out before the cohorts: ingest rows, the images the pre-filter left out
    # (never decoded) and QC rejects, each with a reason.
    full_ledger = pd.read_csv(tiny_run / "results" / "ledger.csv")
    assert len(full_ledger) == len(ledger) + (len(catalog) - len(candidates)) + int((~quality["qc_pass"]).sum())
    assert full_ledger["reason"].notna().all()
    prefiltered = full_ledger[full_ledger["stage"] == "prefilter"]
    assert set(prefiltered["item"]) == set(catalog["image_id"]) - set(candidates["image_id"])
    assert set(prefiltered["reason"]) <= {"view_filter", "sex_filter", "age_filter"}
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


# --- the two branches: a label edit or a new pseudonym key decodes no image again ---------------------------------

DECODE_RULES = {"image_index", "candidates", "preprocess_shard"}


def planned(workdir, *args) -> list[str]:
    """The jobs of Snakemake's own dry run (`snakemake -n`), one name per job."""
    dry = snakemake(workdir, "-n", *args).stdout
    return re.findall(r"^(?:local)?rule (\w+):", dry, flags=re.M)


def job_counts(jobs: list[str]) -> dict[str, int]:
    return {rule: jobs.count(rule) for rule in dict.fromkeys(jobs)}


def test_a_vocabulary_edit_reruns_the_label_branch_and_no_decode(tiny_run):
    """Snakemake skips a touched file whose content it has seen (input checksums), so the vocabulary is edited."""
    vocabulary = tiny_run / "config" / "labels" / "ru.yaml"
    text, stat = vocabulary.read_bytes(), vocabulary.stat()
    try:
        vocabulary.write_bytes(text + "\n# a term under review\n".encode())
        jobs = planned(tiny_run)
    finally:
        vocabulary.write_bytes(text)
        os.utime(vocabulary, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    print(f"\ndry run after editing config/labels/ru.yaml: {job_counts(jobs)}")
    assert "ingest" in jobs and "tensor_index" in jobs and "quality" in jobs and "cohort" in jobs
    assert not DECODE_RULES & set(jobs), job_counts(jobs)
    assert "Nothing to be done" in snakemake(tiny_run, "-n").stdout, "the edit is undone"


def test_a_new_pseudonym_key_reruns_the_label_branch_and_no_decode(tiny_run, monkeypatch):
    """The key is a parameter of ingest (as a fingerprint), so Snakemake notices a new one by itself; a forced
    ingest (`--forcerun ingest`, as after editing a key file in place) decodes nothing either."""
    monkeypatch.setenv("CXRFLOW_PSEUDONYM_KEY", "another-key")
    jobs = planned(tiny_run)
    print(f"\ndry run with a new CXRFLOW_PSEUDONYM_KEY: {job_counts(jobs)}")
    assert "ingest" in jobs and "cohort" in jobs and not DECODE_RULES & set(jobs), job_counts(jobs)
    monkeypatch.setenv("CXRFLOW_PSEUDONYM_KEY", "test-key")
    forced = planned(tiny_run, "--forcerun", "ingest")
    print(f"dry run with --forcerun ingest: {job_counts(forced)}")
    assert "ingest" in forced and "train" in forced and not DECODE_RULES & set(forced), job_counts(forced)


def test_the_cache_holds_only_the_candidates(tiny_run):
    """Shard rows and tensor bytes are those of the pre-filter's candidates (frontal adult women), not the
    catalog's."""
    catalog = pd.read_parquet(tiny_run / "results" / "catalog.parquet")
    index = pd.read_parquet(tiny_run / "results" / "tensors" / "index.parquet")
    candidates = frontal_adult_women(catalog)
    tensors = sorted((tiny_run / "results" / "tensors").glob("shard_*.npy"))
    rows = sum(np.load(t, mmap_mode="r").shape[0] for t in tensors)
    print(f"\ncatalog {len(catalog)} images, candidates {len(candidates)}, shard rows {rows}, "
          f"tensor bytes {sum(t.stat().st_size for t in tensors)}")
    assert rows == len(index) == len(candidates) < len(catalog)
    assert set(index["image_id"]) == set(candidates["image_id"])
    # Each shard holds the candidates whose pixel_id falls to it.
    shard_of = catalog.set_index("image_id")["pixel_id"].reindex(index["image_id"]) % len(tensors)
    assert (shard_of.to_numpy() == index["shard"].to_numpy()).all()


def test_the_prefilter_keeps_what_the_cohorts_metadata_filters_keep():
    """One decision: the pre-filter and the cohorts' view, sex and age steps are the same masks."""
    from cxrflow.cohorts import metadata_filters, prefilter

    images = pd.DataFrame({"view": ["PA", "LL", "AP", None, "PA", "PA"], "sex": ["F", "F", "M", "F", None, "F"],
                           "age": pd.array([30, 40, 50, 60, 70, 12], dtype="Int16")})
    filters = {"views": ["PA", "AP"], "sex": "F", "age": [18, 120]}
    reasons = prefilter(images, filters)
    assert reasons["reason"].tolist() == [pd.NA, "view_filter", "sex_filter", "view_filter", "sex_filter", "age_filter"]
    kept = np.logical_and.reduce([keep for _, keep, _ in metadata_filters(images, filters)])
    assert (reasons["reason"].isna().to_numpy() == kept).all()
    # The union for multi-label training on catalog images: only the views (men and any age pass).
    assert prefilter(images, {"views": ["PA", "AP"], "sex": None, "age": None})["reason"].isna().sum() == 4
