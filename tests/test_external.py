"""External evaluation ("trained here, tested there", cxrflow.external): the models of the tiny run applied to a
second synthetic site, drawn with another seed and another exposure, through the real Snakemake target."""

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import SNAKEMAKE

SITE_GAMMA = 0.6  # the second site's exposure: intensities ** 0.6, brighter and flatter than the training site's


def test_the_intensity_shift_changes_pixels_and_nothing_else(tmp_path):
    """Off (1.0) it leaves every file byte-identical, so a seed's archive stays what it was; on, the same studies
    and notes get other pixels."""
    from cxrflow.synthetic import generate

    generate(tmp_path / "default", n_patients=3, seed=5, image_size=48)
    generate(tmp_path / "off", n_patients=3, seed=5, image_size=48, intensity_gamma=1.0)
    generate(tmp_path / "on", n_patients=3, seed=5, image_size=48, intensity_gamma=SITE_GAMMA)
    files = sorted(p.relative_to(tmp_path / "default") for p in (tmp_path / "default").rglob("*") if p.is_file())
    assert len(files) > 3
    changed = [f for f in files if (tmp_path / "default" / f).read_bytes() != (tmp_path / "on" / f).read_bytes()]
    assert all((tmp_path / "default" / f).read_bytes() == (tmp_path / "off" / f).read_bytes() for f in files)
    assert {f.name for f in changed} == {f.name for f in files if f.parent.name == "images"}


def test_the_model_threshold_is_used_as_given():
    """evaluate_predictions with a threshold: no validation rows, the given threshold, the confusion matrix it
    gives by hand."""
    from cxrflow.evaluate import evaluate_predictions

    test = pd.DataFrame({"image_id": [f"i{k}" for k in range(8)], "patient_id": [f"p{k}" for k in range(8)],
                         "label": [0, 0, 0, 0, 1, 1, 1, 1], "prob": [0.1, 0.3, 0.5, 0.7, 0.2, 0.6, 0.8, 0.9],
                         "split": "test"})
    metrics = evaluate_predictions(test, 20, 0, threshold=0.55)
    assert metrics["threshold"] == 0.55
    assert metrics["confusion_matrix"] == [[3, 1], [1, 3]]  # calls at >= 0.55: 0.7 (negative), 0.6, 0.8, 0.9
    assert metrics["auc"] == pytest.approx(12 / 16)


def test_a_cohort_too_small_or_one_class_gets_a_reason_not_a_number():
    from cxrflow.external import evaluate_external, external_table

    settings = {"min_subgroup_patients": 2, "bootstrap": 10, "prevalence": None, "calibration_bins": 5, "age_bands": [40]}
    one_class = pd.DataFrame({"image_id": ["a", "b"], "patient_id": ["p", "q"], "label": [0, 0], "prob": [0.2, 0.4]})
    small = pd.DataFrame({"image_id": ["a", "b", "c"], "patient_id": ["p", "q", "r"], "label": [0, 0, 1],
                          "prob": [0.2, 0.4, 0.9]})
    threshold = {"threshold": 0.5, "temperature": None}
    first, second = evaluate_external(one_class, threshold, settings, 0), evaluate_external(small, threshold, settings, 0)
    assert first["status"].startswith("one class only: 0 positive and 2 negative patients")
    assert second["status"].startswith("too small: 1 positive and 2 negative patients")
    assert "auc" not in first and "auc" not in second
    internal = {"x": {"auc": 0.8, "auc_ci95": [0.7, 0.9]}, "y": {"auc": 0.6, "auc_ci95": [0.5, 0.7]}}
    table = external_table({"x": first, "y": second}, internal, {"x": {"en": "X"}, "y": {}})
    assert table["status"].tolist() == [first["status"], second["status"]]
    assert table["auc"].isna().all() and table["internal_auc"].tolist() == [0.8, 0.6]


@pytest.fixture(scope="module")
def external_run(tiny_run, tmp_path_factory):
    """The tiny run's models on a second site: a copy of the tiny run's folder, so the shared run stays as it is;
    the site is named by a file holding a source: section (the form a user points at an existing source config)."""
    from cxrflow.synthetic import generate

    workdir = tmp_path_factory.mktemp("external") / "run"
    shutil.copytree(tiny_run, workdir, symlinks=True)
    summary = generate(workdir / "resources" / "site2", n_patients=120, seed=7, image_size=128,
                       intensity_gamma=SITE_GAMMA)
    main = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    source = {**main["source"], "annotations": "resources/site2/annotations.csv", "images": "resources/site2"}
    (workdir / "config" / "site2-source.yaml").write_text(yaml.safe_dump({"source": source}))
    (workdir / "config" / "external-site2.yaml").write_text(yaml.safe_dump({"external": {"site2": "config/site2-source.yaml"}}))
    models = sorted((workdir / "results" / "models").glob("*/model.pt"))
    before = {m: m.stat().st_mtime_ns for m in models}
    started = time.monotonic()
    result = subprocess.run([SNAKEMAKE, "results/external/site2/metrics_table.md", "--cores", "2", "--configfile",
                             "config/tiny.yaml", "config/external-site2.yaml"], cwd=workdir, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    print(f"\nexternal target: {time.monotonic() - started:.1f} s (site of {summary['n_images']} images)")
    return {"dir": workdir, "out": workdir / "results" / "external" / "site2", "models_before": before,
            "summary": summary, "log": result.stderr}


def test_external_tables_hold_every_pathology_at_its_own_threshold(external_run):
    out, workdir = external_run["out"], external_run["dir"]
    pathologies = sorted(p.parent.name for p in external_run["models_before"])
    table = pd.read_csv(out / "metrics_table.csv")
    assert table["pathology"].tolist() == pathologies
    # Only the external rules ran: no model was retrained for it.
    assert {m: m.stat().st_mtime_ns for m in external_run["models_before"]} == external_run["models_before"]
    evaluated = table[table["status"] == "ok"]
    assert len(evaluated) >= len(table) - 2, table[["pathology", "status"]]
    assert np.isfinite(evaluated[["auc", "auc_ci_low", "auc_ci_high"]].to_numpy()).all()
    assert table.loc[table["status"] != "ok", "auc"].isna().all()
    for row in table.to_dict("records"):
        p = row["pathology"]
        threshold = json.loads((workdir / "results" / "models" / p / "threshold.json").read_text())["threshold"]
        metrics = json.loads((out / "metrics" / f"{p}.json").read_text())
        internal = json.loads((workdir / "results" / "metrics" / f"{p}.json").read_text())
        assert metrics["threshold"] == threshold and row["threshold"] == pytest.approx(threshold, abs=1e-4)
        assert row["internal_auc"] == pytest.approx(internal["auc"], abs=1e-4)
        predictions = pd.read_csv(out / "predictions" / f"{p}.csv")
        assert (predictions["call"] == (predictions["prob"] >= threshold)).all()
        if row["status"] == "ok":
            assert metrics["n_test"] == len(predictions) and metrics["confusion_matrix"] == [
                [int(((predictions["label"] == t) & (predictions["call"] == c)).sum()) for c in (0, 1)] for t in (0, 1)]
    markdown = (out / "metrics_table.md").read_text()
    assert all(name in markdown for name in table["name_en"]) and "AUC, site2" in markdown
    assert "# Clinical metrics" in (out / "clinical_table.md").read_text()
    print("\n" + table[["pathology", "status", "n_test", "n_test_positive", "internal_auc", "auc", "auc_ci_low",
                        "auc_ci_high"]].to_string(index=False))


def test_predictions_cover_exactly_the_external_cohort(external_run):
    """Every scored image is a QC-passed woman of the right age, labelled from the external site's own notes (its
    truth table agrees), the classes balanced as the cohort rules say; and the flow's last step counts them."""
    out, workdir = external_run["out"], external_run["dir"]
    private = pd.read_parquet(workdir / "results" / "private" / "external" / "site2" / "catalog.parquet")
    truth = pd.read_csv(workdir / "resources" / "site2" / "truth.csv", dtype={"image_id": str})
    truth = truth.set_index(private.set_index("source_id").loc[truth["image_id"], "image_id"].to_numpy())
    catalog = pd.read_parquet(out / "catalog.parquet").set_index("image_id")
    quality = pd.read_parquet(workdir / "results" / "private" / "external" / "site2" / "quality.parquet")
    passed = set(quality.loc[quality["qc_pass"], "image_id"])
    flow = pd.read_csv(out / "flow.csv")
    for metrics_file in sorted((out / "metrics").glob("*.json")):
        p = metrics_file.stem
        predictions = pd.read_csv(out / "predictions" / f"{p}.csv")
        assert predictions["image_id"].is_unique and set(predictions["image_id"]) <= passed
        assert (catalog.loc[predictions["image_id"], "sex"] == "F").all()
        assert (truth.loc[predictions["image_id"], p].to_numpy() == predictions["label"].to_numpy()).all()
        assert (predictions["label"] == 1).sum() == (predictions["label"] == 0).sum()  # balance: undersample
        last = flow[flow["pathology"] == p].iloc[-1]
        assert last["step"] == "external test set" and last["images"] == len(predictions)


def test_the_shift_reaches_the_pipeline_and_no_identifier_leaves_private(external_run):
    out, workdir = external_run["out"], external_run["dir"]
    main_p50 = pd.read_parquet(workdir / "results" / "quality" / "metrics.parquet")["p50"].median()
    site_p50 = pd.read_parquet(workdir / "results" / "private" / "external" / "site2" / "quality.parquet")["p50"].median()
    assert site_p50 > main_p50 + 0.1, (main_p50, site_p50)  # gamma 0.6 brightens the mid-greys
    annotations = pd.read_csv(workdir / "resources" / "site2" / "annotations.csv", dtype=str)
    identifiers = set(annotations["image_id"]) | set(annotations["patient_id"]) | {"site2/images", "resources/site2"}
    identifiers |= {Path(f).stem for f in annotations["file"]}
    texts = []
    for path in out.rglob("*"):
        if path.suffix == ".parquet":
            texts.append(pd.read_parquet(path).astype(str).to_csv())
        elif path.is_file():
            texts.append(path.read_text())
    assert len(texts) >= 8
    found = {i for i in identifiers for text in texts if i in text}
    assert not found, sorted(found)[:5]
