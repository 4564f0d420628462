"""End to end: the real Snakemake workflow on the tiny synthetic config, in a copy of the repository."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from conftest import ROOT

pytestmark = pytest.mark.e2e
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
COPIED = ["Snakefile", "workflow", "config", "src", "envs", "profiles"]


def copy_repo(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, dest / name)
    return dest


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    # Arguments first: --configfile takes several values and would swallow a target after it.
    result = subprocess.run([SNAKEMAKE, *args, "--cores", "2", "--configfile", "config/tiny.yaml"], cwd=workdir,
                            capture_output=True, text=True, timeout=1200)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = copy_repo(tmp_path_factory.mktemp("workflow"))
    snakemake(workdir)
    return workdir


def test_metrics_table_has_every_pathology_and_weighted_recall_equals_accuracy(run):
    table = pd.read_csv(run / "results" / "metrics_table.csv")
    assert len(table) == 9
    assert set(table["pathology"]) == {"enlarged_heart", "enlarged_heart_shadow", "aorta_unfolded", "aorta_compacted",
                                       "aortic_atherosclerosis", "dome_relaxation", "aortic_arch_sclerosis", "scoliosis",
                                       "vascular_roots"}
    assert (table["recall_weighted"] - table["accuracy"]).abs().max() < 1e-9
    assert table["auc"].between(0, 1).all() and (table["auc_ci_low"] <= table["auc_ci_high"]).all()
    assert (run / "results" / "metrics_table.md").read_text().count("\n|") >= 10
    assert (run / "results" / "roc_all.png").stat().st_size > 10_000


def test_no_patient_in_two_splits(run):
    for manifest in (run / "results" / "splits").glob("*.csv"):
        frame = pd.read_csv(manifest)
        assert (frame.groupby("patient_id")["split"].nunique() == 1).all(), manifest.name
        assert set(frame["split"]) == {"train", "val", "test"}


def test_every_input_image_is_used_or_listed_with_a_reason(run):
    annotations = pd.read_csv(run / "resources" / "synthetic" / "annotations.csv")
    catalog = pd.read_parquet(run / "results" / "catalog.parquet")
    ledger = pd.read_csv(run / "results" / "ingest" / "ledger.csv")
    assert len(catalog) + len(ledger) == len(annotations)
    quality = pd.read_parquet(run / "results" / "quality" / "metrics.parquet")
    assert sorted(quality["image_id"]) == sorted(catalog["image_id"])
    assert quality.loc[~quality["qc_pass"], "qc_reason"].notna().all()
    # The planted bad images are the ones QC rejects.
    truth = pd.read_csv(run / "resources" / "synthetic" / "truth.csv").merge(quality, on="image_id")
    assert not truth.loc[truth["quality"] != "ok", "qc_pass"].any()
    assert truth.loc[truth["quality"] == "ok", "qc_pass"].mean() > 0.97
    assert list((run / "results" / "quality" / "rejects").glob("*.png"))
    # One ledger lists every image left out before the cohorts: ingest rows and QC rejects, each with a reason.
    full_ledger = pd.read_csv(run / "results" / "ledger.csv")
    assert len(full_ledger) == len(ledger) + int((~quality["qc_pass"]).sum())
    assert full_ledger["reason"].notna().all()
    for flow_file in (run / "results" / "cohorts").glob("*_flow.csv"):
        flow = pd.read_csv(flow_file)
        assert flow["images"].iloc[0] == len(catalog)
        assert flow["images"].iloc[0] - flow["removed_images"].sum() == flow["images"].iloc[-1]


def test_second_run_does_nothing(run):
    assert "Nothing to be done" in snakemake(run, "-n").stdout


def test_one_pathology_is_rerun_by_naming_its_target(run):
    (run / "results" / "metrics" / "scoliosis.json").unlink()
    dry = snakemake(run, "-n", "results/metrics/scoliosis.json").stdout
    jobs = re.findall(r"^rule (\w+):", dry, flags=re.M) or re.findall(r"^localrule (\w+):", dry, flags=re.M)
    assert jobs == ["evaluate"], dry[-2000:]
    snakemake(run, "results/metrics/scoliosis.json")
    assert (run / "results" / "metrics" / "scoliosis.json").exists()


def test_html_report_and_no_identifiers_in_any_output(run):
    snakemake(run, "--report", "results/report.html")
    assert (run / "results" / "report.html").stat().st_size > 50_000
    planted = set()
    for dicom in (run / "resources" / "synthetic" / "images").glob("*.dcm"):
        ds = pydicom.dcmread(dicom, stop_before_pixels=True)
        for tag in ["PatientName", "PatientBirthDate", "InstitutionName", "ReferringPhysicianName", "AccessionNumber", "PatientID"]:
            value = str(ds.get(tag, "") or "")
            if len(value) >= 6:
                planted.add(value)
    planted |= {str(p) for p in pd.read_csv(run / "resources" / "synthetic" / "annotations.csv")["patient_id"].unique() if len(str(p)) >= 6}
    assert len(planted) > 20
    pattern = re.compile("|".join(re.escape(p) for p in sorted(planted, key=len, reverse=True)))
    for path in (run / "results").rglob("*"):
        if not path.is_file():
            continue
        text = pd.read_parquet(path).to_csv() if path.suffix == ".parquet" else path.read_bytes().decode("utf-8", "replace")
        match = pattern.search(text)
        assert match is None, f"{path.relative_to(run)} contains the identifier {match.group(0)!r}"
