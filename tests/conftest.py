import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
COPIED = ["Snakefile", "workflow", "config", "src", "envs", "profiles"]
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"real data not available: {SHARED} is absent (it sits beside the repo in CI only)")
    return SHARED


@pytest.fixture(scope="session")
def keys_file() -> Path:
    return ROOT / "config" / "labels" / "keys.yaml"


# A pseudonym key for every test, module and session fixtures included (they run before function fixtures); the
# tests of the missing-key error remove it themselves.
os.environ.setdefault("CXRFLOW_PSEUDONYM_KEY", "test-key")


@pytest.fixture(autouse=True)
def _test_pseudonym_key(monkeypatch):
    monkeypatch.setenv("CXRFLOW_PSEUDONYM_KEY", "test-key")


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """A small real run of the data stages through the API (no Snakemake): synthetic archive -> catalog ->
    one preprocessing shard -> QC -> the enlarged_heart cohort and its split. Shared by the training tests."""
    import os

    import yaml

    from cxrflow.cohorts import build_cohort
    from cxrflow.ingest import build_catalog
    from cxrflow.labels import load_keys
    from cxrflow.quality import apply_rules
    from cxrflow.splits import patient_exclusive_split
    from cxrflow.synthetic import generate
    from cxrflow.preprocess import preprocess_shard

    os.environ.setdefault("CXRFLOW_PSEUDONYM_KEY", "test-key")
    out = tmp_path_factory.mktemp("tiny")
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    generate(out / "synthetic", n_patients=140, seed=3, image_size=128)
    source = {**config["source"], "annotations": str(out / "synthetic" / "annotations.csv"), "images": str(out / "synthetic"),
              "vocabulary": str(ROOT / config["source"]["vocabulary"])}
    catalog = build_catalog(source, ROOT / "config" / "labels" / "keys.yaml", base="/").catalog
    table = preprocess_shard(catalog, 0, 1, 32, {}, out / "shard_0000.npy", out / "index.parquet")
    quality = apply_rules(table, {"dark_p50": 0.08, "bright_p50": 0.92, "blank_std": 0.02, "max_line_score": 0.35})
    keys = load_keys(ROOT / "config" / "labels" / "keys.yaml")
    cohort, _ = build_cohort(catalog, quality, config["cohorts"], "enlarged_heart", keys, seed=42)
    manifest = patient_exclusive_split(cohort, config["split"], 42, "enlarged_heart")
    manifest.to_csv(out / "manifest.csv", index=False)
    settings = {**config, "image": {"size": 32, "zscore": False}, "model": {"library": "timm", "name": "resnet10t"},
                "train": {**config["train"], "epochs": 3, "batch_size": 16}, "evaluate": {"bootstrap": 50}}
    return {"dir": out, "manifest": out / "manifest.csv", "index": out / "index.parquet",
            "shards": [out / "shard_0000.npy"], "config": settings, "catalog": catalog}


def copy_repo(dest: Path) -> Path:
    """A copy of the workflow to run Snakemake in, so that tests never write into the repository."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, dest / name)
    return dest


def snakemake_tiny(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real snakemake on config/tiny.yaml. Arguments come first: --configfile takes several values and
    would swallow a target after it."""
    result = subprocess.run([SNAKEMAKE, *args, "--cores", "2", "--configfile", "config/tiny.yaml"], cwd=workdir,
                            capture_output=True, text=True, timeout=1200)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One end-to-end run of the whole workflow on the tiny config, shared by the end-to-end test modules."""
    workdir = copy_repo(tmp_path_factory.mktemp("workflow"))
    snakemake_tiny(workdir)
    return workdir


def run_benchmark(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run benchmarks/<name>.py in a subprocess (as a user would), failing with its output when it fails."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args], capture_output=True,
                            text=True, timeout=300, cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(result.stdout)
    return result
