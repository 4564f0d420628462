"""The multi-label mode through the real Snakemake workflow (tiny config, three cohorts, in a copy of the repository):
one shared split (with a natural-prevalence test split), one train_multilabel job, evaluation per pathology reading
its checkpoint, the mode in the table."""

import json
import re
import subprocess

import pandas as pd
import pytest

from conftest import SNAKEMAKE, copy_repo

pytestmark = pytest.mark.e2e

ENABLED = ["aorta_unfolded", "enlarged_heart", "scoliosis"]
OVERLAY = ("cohorts:\n  enabled: [" + ", ".join(ENABLED) + "]\n"
           "train:\n  mode: multilabel\n  auxiliary_keys: [normal]\n  auxiliary_images: catalog\n"
           "split:\n  test_prevalence: natural\n")


def snakemake(workdir, *args, overlay="config/multilabel.yaml", check=True):
    result = subprocess.run([SNAKEMAKE, *args, "--cores", "2", "--configfile", "config/tiny.yaml", overlay], cwd=workdir,
                            capture_output=True, text=True, timeout=1500)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def planned(workdir, *args, overlay) -> list[str]:
    dry = snakemake(workdir, "-n", *args, overlay=overlay).stdout
    return re.findall(r"^(?:local)?rule (\w+):", dry, flags=re.M)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    workdir = copy_repo(tmp_path_factory.mktemp("multilabel"))
    (workdir / "config" / "multilabel.yaml").write_text(OVERLAY)
    (workdir / "config" / "shared.yaml").write_text("cohorts:\n  enabled: [" + ", ".join(ENABLED) + "]\nsplit:\n  shared: true\n")
    (workdir / "config" / "binary.yaml").write_text("cohorts:\n  enabled: [" + ", ".join(ENABLED) + "]\n")
    return workdir


def test_the_plan_of_each_mode(workdir):
    binary = planned(workdir, overlay="config/binary.yaml")
    assert binary.count("train") == 3 and binary.count("split") == 3
    assert "split_shared" not in binary and "train_multilabel" not in binary
    shared = planned(workdir, overlay="config/shared.yaml")  # binary models on the shared split
    assert shared.count("train") == 3 and shared.count("split_shared") == 1 and "split" not in shared
    multilabel = planned(workdir, overlay="config/multilabel.yaml")
    assert multilabel.count("train_multilabel") == 1 and multilabel.count("split_shared") == 1
    assert "train" not in multilabel and "split" not in multilabel and multilabel.count("evaluate") == 3


def test_multilabel_run_evaluates_each_pathology_with_its_output_of_one_network(workdir):
    snakemake(workdir)
    results = workdir / "results"
    metadata = json.loads((results / "models" / "multilabel" / "metadata.json").read_text())
    assert metadata["mode"] == "multilabel" and metadata["outputs"] == ENABLED + ["aux:normal"]
    assert not any((results / "models" / p / "model.pt").exists() for p in ENABLED)
    manifests = {p: pd.read_csv(results / "splits" / f"{p}.csv", dtype={"patient_id": str}) for p in ENABLED}
    test_patients = set().union(*(set(m.loc[m["split"] == "test", "patient_id"]) for m in manifests.values()))
    fitted = set().union(*(set(m.loc[m["split"] != "test", "patient_id"]) for m in manifests.values()))
    assert not test_patients & fitted  # no test patient of any cohort trained the network
    # A natural-prevalence test split: images that balancing left out of a cohort join its test split.
    cohorts = {p: pd.read_parquet(results / "cohorts" / f"{p}.parquet") for p in ENABLED}
    left_out = {p: set(c.loc[~c["selected"], "image_id"].astype(str)) for p, c in cohorts.items()}
    added = {p: set(m.loc[m["split"] == "test", "image_id"].astype(str)) & left_out[p] for p, m in manifests.items()}
    assert sum(map(len, added.values())) > 0, {p: len(s) for p, s in left_out.items()}
    table = pd.read_csv(results / "metrics_table.csv")
    assert sorted(table["pathology"]) == ENABLED and (table["mode"] == "multilabel").all()
    for pathology in ENABLED:
        metrics = json.loads((results / "metrics" / f"{pathology}.json").read_text())
        predictions = pd.read_csv(results / "predictions" / f"{pathology}.csv", dtype={"image_id": str})
        test = manifests[pathology][manifests[pathology]["split"] == "test"]
        # The same test images as a binary model of this cohort would be tested on (its own manifest).
        assert metrics["mode"] == "multilabel" and metrics["n_test"] == len(test)
        assert sorted(predictions.loc[predictions["split"] == "test", "image_id"]) == sorted(test["image_id"].astype(str))
    # Rerunning one pathology: its evaluation only, from the one checkpoint.
    model_time = (results / "models" / "multilabel" / "model.pt").stat().st_mtime
    (results / "metrics" / "scoliosis.json").unlink()
    assert planned(workdir, "results/metrics/scoliosis.json", overlay="config/multilabel.yaml") == ["evaluate"]
    snakemake(workdir, "results/metrics/scoliosis.json")
    assert (results / "metrics" / "scoliosis.json").exists()
    assert (results / "models" / "multilabel" / "model.pt").stat().st_mtime == model_time
