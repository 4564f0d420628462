"""Privacy that fails closed: no patient identifier in any shareable output or log, whatever the archive holds."""

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from conftest import SHARED, SNAKEMAKE, copy_repo
from conftest import snakemake_tiny as snakemake
from cxrflow.errors import CxrflowError
from cxrflow.privacy import (DEMO_KEY, image_pseudonym_of, is_builtin_synthetic, pseudonym_key, pseudonymize,
                             shareable_catalog, source_key)
from planted import KINDS, plant_archive, scan

pytestmark = pytest.mark.e2e

# The rules allowed to read results/private/, and why; each says so in its docstring. ingest and candidates read the
# image index (the source's ids and paths), preprocess_shard the candidates' paths, the label rules the notes.
PRIVATE_READERS = {"ingest", "candidates", "preprocess_shard", "label_coverage", "label_audit_sheets"}


def _run(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """Snakemake on the planted archive, with a real key (a module fixture runs before the per-test key is set)."""
    env = {**os.environ, "CXRFLOW_PSEUDONYM_KEY": "test-key"}
    result = subprocess.run([SNAKEMAKE, *args, "--cores", "2", "--configfile", "config/tiny.yaml", "config/planted.yaml"],
                            cwd=workdir, capture_output=True, text=True, timeout=1500, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """The whole workflow and its report on an archive with identifiers planted where the pipeline reads them."""
    from cxrflow.synthetic import generate

    workdir = copy_repo(tmp_path_factory.mktemp("planted"))
    synthetic = tmp_path_factory.mktemp("synthetic")
    generate(synthetic, n_patients=160, seed=42, image_size=128)  # as config/tiny.yaml
    nih = SHARED / "nih1000" if (SHARED / "nih1000" / "labels.csv").is_file() else None
    planted = plant_archive(synthetic, workdir / "resources" / "archive", nih)
    (workdir / "config" / "planted.yaml").write_text(
        "source:\n  annotations: resources/archive/notes.csv\n  images: resources/archive\n"
        "cohorts:\n  enabled: [enlarged_heart, scoliosis]\n")
    _run(workdir)
    _run(workdir, "--report", "results/report.html")
    return workdir, planted, nih is not None


def test_no_planted_identifier_in_any_shareable_file_or_log(planted_run):
    workdir, planted, real_pixels = planted_run
    private = workdir / "results" / "private"
    shareable = [p for p in (workdir / "results").rglob("*") if p.is_file() and private not in p.parents]
    logs = [p for p in (workdir / ".snakemake" / "log").rglob("*") if p.is_file()]
    assert (workdir / "results" / "report.html") in shareable and len(logs) >= 2
    hits = scan(shareable + logs, planted)
    print(f"\nplanted kinds: {len(planted)} (real NIH pixels: {real_pixels})")
    print("| kind | strings planted | hits |\n| --- | --- | --- |")
    for kind in KINDS:
        print(f"| {kind} | {len(planted[kind])} | {len(hits[kind])} |")
    assert len(planted) >= 12 and all(planted[kind] for kind in KINDS)
    found = [hit for kind in KINDS for hit in hits[kind][:3]]
    assert not found, "identifiers in shareable outputs or logs:\n" + "\n".join(found)


def test_the_scan_finds_what_the_private_outputs_hold(planted_run):
    """The scanner is not blind: the private catalog and ledger hold the notes, paths and ids it looks for."""
    workdir, planted, _ = planted_run
    private = [p for p in (workdir / "results" / "private").rglob("*") if p.is_file()]
    hits = scan(private, planted)
    for kind in ["name in note (Cyrillic)", "name in note (Latin)", "birth date in note", "folder named after patient",
                 "image id with name", "exact study date (table)"]:
        assert hits[kind], f"the private outputs should hold {kind}"


def test_shareable_ids_are_pseudonyms_that_the_key_holder_can_look_up(planted_run):
    workdir, _, _ = planted_run
    private = pd.read_parquet(workdir / "results" / "private" / "catalog.parquet")
    shared = pd.read_parquet(workdir / "results" / "catalog.parquet")
    assert list(private["image_id"]) == list(shared["image_id"])
    row = private.iloc[0]
    assert row["image_id"] == image_pseudonym_of(row["source_id"], b"test-key")
    assert not {"text", "path", "study_date", "source_id"} & set(shared.columns)
    assert shared["study_year"].between(2000, 2030).fillna(False).all()
    manifest = pd.concat(pd.read_csv(p) for p in (workdir / "results" / "splits").glob("*.csv"))
    assert manifest["image_id"].str.fullmatch(r"img-[0-9a-f]{16}").fillna(False).all()


def test_only_the_rules_that_need_them_read_private_outputs(planted_run):
    """Over the jobs of the whole run (Snakemake's own summary of inputs), and over each rule's docstring."""
    workdir, _, _ = planted_run
    result = _run(workdir, "--detailed-summary")
    table = pd.read_csv(pd.io.common.StringIO(result.stdout), sep="\t", dtype=str).fillna("")
    readers = set(table.loc[table["input-file(s)"].str.contains("results/private/"), "rule"])
    assert "preprocess_shard" in readers, "the summary lists the shards reading the private candidates"
    assert readers <= PRIVATE_READERS, f"rules reading results/private/ without need: {readers - PRIVATE_READERS}"
    sources = "\n".join(p.read_text() for p in (workdir / "workflow" / "rules").glob("*.smk"))
    for rule in readers:
        body = re.search(rf"^rule {rule}:\n((?:    .*\n|\n)+)", sources, re.MULTILINE)
        assert body and re.search(r'^\s+"""[^"]*identifiers', body.group(1), re.MULTILINE), \
            f"rule {rule} reads identifiers and must say so in its docstring"


def test_report_shows_no_patient_image_of_a_real_archive(planted_run):
    workdir, _, _ = planted_run
    assert not (workdir / "results" / "quality" / "rejects").exists()
    assert (workdir / "results" / "private" / "quality" / "rejects").is_dir()
    assert not list((workdir / "results" / "figures").glob("*_gradcam.png"))


def test_a_real_archive_without_a_key_stops_naming_both_variables(tmp_path):
    workdir = copy_repo(tmp_path / "w")
    (workdir / "config" / "planted.yaml").write_text(
        "source:\n  annotations: resources/archive/notes.csv\n  images: resources/archive\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CXRFLOW_PSEUDONYM_KEY", "CXRFLOW_PSEUDONYM_KEY_FILE")}
    result = subprocess.run([SNAKEMAKE, "-n", "--cores", "1", "--configfile", "config/planted.yaml"], cwd=workdir,
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    error = [line for line in result.stderr.splitlines() if line.startswith("cxrflow config error")]
    assert len(error) == 1 and "CXRFLOW_PSEUDONYM_KEY," in error[0] and "CXRFLOW_PSEUDONYM_KEY_FILE" in error[0]
    assert "Traceback" not in result.stderr
    # The built-in synthetic archive plans with the demo key and no variable at all.
    demo = subprocess.run([SNAKEMAKE, "-n", "--cores", "1"], cwd=workdir, capture_output=True, text=True, env=env,
                          timeout=300)
    assert demo.returncode == 0, demo.stderr[-2000:]


def test_the_demo_key_serves_only_the_builtin_synthetic_archive(tmp_path, monkeypatch):
    monkeypatch.delenv("CXRFLOW_PSEUDONYM_KEY", raising=False)
    monkeypatch.delenv("CXRFLOW_PSEUDONYM_KEY_FILE", raising=False)
    synthetic = {"format": "freetext", "annotations": "resources/synthetic/annotations.csv"}
    (tmp_path / "resources" / "synthetic").mkdir(parents=True)
    assert not is_builtin_synthetic(synthetic, tmp_path), "no generated truth table: not the generator's archive"
    (tmp_path / "resources" / "synthetic" / "truth.csv").write_text("image_id\n")
    assert source_key(synthetic, tmp_path) == DEMO_KEY
    for other in [{**synthetic, "annotations": "resources/archive/notes.csv"}, {**synthetic, "format": "nih"}]:
        with pytest.raises(CxrflowError, match="CXRFLOW_PSEUDONYM_KEY_FILE"):
            source_key(other, tmp_path)
    with pytest.raises(CxrflowError, match="CXRFLOW_PSEUDONYM_KEY"):
        pseudonym_key(allow_demo_key=False)


def test_pseudonyms_are_a_keyed_hash_of_the_real_id():
    ids = pd.Series(["P1", "P1", "P2", None])
    out = pseudonymize(ids, b"secret")
    assert out[0] == out[1] == hashlib.blake2b(b"P1", key=b"secret", digest_size=8).hexdigest()
    assert out[2] != out[0] and pd.isna(out[3])
    assert (pseudonymize(ids, b"other")[:3] != out[:3]).all(), "another key gives other pseudonyms"
    assert image_pseudonym_of("P1", b"secret") != "img-" + out[0], "image and patient pseudonyms are separate domains"


def test_shareable_catalog_dates_ages_and_columns():
    private = pd.DataFrame({
        "image_id": ["img-a", "img-b", "img-c"], "source_id": ["Ivanova_1", "Ivanova_2", "Petrova_1"],
        "patient_id": ["p1", "p1", "p2"], "sex": ["F", "F", "F"], "age": pd.array([54, 97, None], dtype="Int16"),
        "view": ["PA", "PA", "AP"], "study_date": pd.to_datetime(["2019-03-14", "2019-05-01", "2020-01-02"]),
        "path": ["a/Ivanova.png", "a/Ivanova2.png", "b/Petrova.png"], "text": ["x", "y", "z"],
        "new_adapter_column": ["Ivanova", "Ivanova", "Petrova"], "enlarged_heart": pd.array([1, 0, None], dtype="Int8")})
    year = shareable_catalog(private, ["enlarged_heart"], b"k", {"dates": "year", "date_shift_days": 365})
    assert list(year.columns) == ["image_id", "patient_id", "sex", "age", "view", "study_year", "enlarged_heart"]
    assert year["study_year"].tolist() == [2019, 2019, 2020]
    assert year["age"].fillna(-1).tolist() == [54, 90, -1], "ages above 89 pool at 90; missing stays missing"
    shifted = shareable_catalog(private, ["enlarged_heart"], b"k", {"dates": "shift", "date_shift_days": 30})
    dates = shifted["study_date_shifted"]
    assert (dates[1] - dates[0]) == pd.Timedelta(days=48), "intervals within a patient survive the shift"
    assert dates[0] != pd.Timestamp("2019-03-14") and abs(dates[0] - pd.Timestamp("2019-03-14")) <= pd.Timedelta(days=30)


def test_the_catalog_takes_pixel_ids_only_from_an_image_index_of_the_same_images(tmp_path):
    """pixel_id joins the two branches on the source's image id; an index of other images is an error naming the
    file, and the message names no image (it goes to a shareable log)."""
    from cxrflow.pipeline import pixel_ids

    index = tmp_path / "images.parquet"
    pd.DataFrame({"pixel_id": [0, 1, 2], "source_id": ["Ivanova_1", "Petrova_1", "Sidorova_1"]}).to_parquet(index)
    assert pixel_ids(pd.Series(["Petrova_1", "Sidorova_1", "Ivanova_1"]), index).tolist() == [1, 2, 0]
    for other in (["Ivanova_1", "Petrova_1"], ["Ivanova_1", "Petrova_1", "Smirnova_1"]):
        with pytest.raises(CxrflowError, match="images.parquet") as error:
            pixel_ids(pd.Series(other), index)
        assert "Smirnova" not in str(error.value) and "Ivanova" not in str(error.value)


def test_wildcards_cannot_escape_results(tiny_run):
    # A pathology name from outside the config (here a path) matches no rule: wildcard_constraints come from config.
    result = snakemake(tiny_run, "-n", "results/metrics/../../escape.json", check=False)
    assert result.returncode != 0
    assert not (tiny_run.parent / "escape.json").exists()


def test_burned_in_annotation_is_a_qc_reason(tmp_path):
    """A DICOM that declares text burned into its pixels (a name on the film) fails QC with its own reason."""
    from cxrflow.quality import apply_rules
    from cxrflow.preprocess import process_image
    from hostile import chest, dicom

    rows = []
    for name, flag in [("clean", "NO"), ("burned", "YES")]:
        pixels = (chest() * 4000).astype("uint16")
        record, _ = process_image(str(dicom(tmp_path / f"{name}.dcm", pixels, BurnedInAnnotation=flag)), 32, {})
        rows.append({"image_id": name, **record})
    judged = apply_rules(pd.DataFrame(rows), {"max_burned_in": 0.0}).set_index("image_id")
    assert judged.loc["burned", "qc_reason"] == "burned_in_annotation" and not judged.loc["burned", "qc_pass"]
    assert judged.loc["clean", "qc_pass"], "the same film without the flag passes"
    kept = apply_rules(pd.DataFrame(rows), {"max_burned_in": None}).set_index("image_id")
    assert kept.loc["burned", "qc_pass"], "null switches the rule off"
