"""Hostile inputs through the real workflow: each kind is either left out with a reason (and the counts add up)
or stops the run with a one-line error naming the file, row or key, without a Python traceback."""

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from hostile import PLANTED_DUPLICATES, write_corpus
from conftest import copy_repo

from conftest import SNAKEMAKE
COLUMNS = "image_id,patient_id,sex,age,view,file,study_date,annotation"


def annotation_rows(files: list[str]) -> list[str]:
    rows = [f"{Path(f).stem},P{i:03d},Ж,{40 + i},PA,hostile/{f},2021-03-04,Без патологических изменений." for i, f in enumerate(files)]
    rows += [
        "dup,P900,Ж,50,PA,hostile/whole.png,2021-03-04,Норма.",
        "dup,P901,Ж,50,PA,hostile/whole.png,2021-03-04,Сердце расширено.",  # duplicate image id
        "gone,P902,Ж,50,PA,hostile/not_there.png,2021-03-04,Норма.",  # the file does not exist
        "silent,P903,Ж,50,PA,hostile/sixteen.png,2021-03-04,",  # empty annotation text
        "conflict_a,P904,Ж,50,PA,hostile/whole.png,2021-03-04,Норма.",  # one patient, two sexes
        "conflict_b,P904,М,50,PA,hostile/rgba.png,2021-03-04,Норма.",
        "orphan,,Ж,50,PA,hostile/whole.png,31.02.2021,Норма.",  # no patient id
    ]
    return rows


def make_workdir(tmp_path: Path, table_bytes: bytes, overlay: dict | None = None) -> Path:
    workdir = copy_repo(tmp_path / "repo")
    archive = workdir / "resources" / "archive"
    expected = write_corpus(archive / "hostile")
    (archive / "notes.csv").write_bytes(table_bytes)
    config = {"source": {"annotations": "resources/archive/notes.csv", "images": "resources/archive"},
              "preprocess": {"shards": 2}, **(overlay or {})}
    (workdir / "hostile.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    return workdir, expected


def snakemake(workdir, *targets, configfile="hostile.yaml"):
    # Targets first: --configfile takes several values and would swallow them.
    # The key is passed explicitly: module-scoped runs start before the autouse fixture that sets it.
    env = {**os.environ, "CXRFLOW_PSEUDONYM_KEY": os.environ.get("CXRFLOW_PSEUDONYM_KEY", "test-key")}
    return subprocess.run([SNAKEMAKE, *targets, "--cores", "2", "--configfile", configfile], cwd=workdir,
                          capture_output=True, text=True, timeout=900, env=env)


def table(rows, encoding="utf-8", bom=False, header=COLUMNS) -> bytes:
    data = ("\n".join([header, *rows]) + "\n").encode(encoding)
    return b"\xef\xbb\xbf" + data if bom else data


def assert_accounting(workdir: Path, input_rows: int, left_out=None) -> None:
    """After every run: each input row is a catalog row or a ledger row (of the reasons that leave a row out, when
    the ledger also holds flags), and every catalog image has a QC verdict (pass, or a reason) or was left out by
    the pre-filter, never both."""
    catalog = pd.read_parquet(workdir / "results/catalog.parquet", columns=["image_id", "pixel_id"])
    ledger = pd.read_csv(workdir / "results/ingest/ledger.csv", dtype=str)
    ledgered = int(ledger["reason"].isin(left_out).sum()) if left_out else len(ledger)
    assert len(catalog) + ledgered == input_rows, (len(catalog), ledgered, input_rows, ledger["reason"].value_counts())
    quality = pd.read_parquet(workdir / "results/quality/metrics.parquet")
    prefiltered = pd.read_parquet(workdir / "results/preprocess/prefiltered.parquet", columns=["pixel_id"])
    candidates = catalog.loc[~catalog["pixel_id"].isin(prefiltered["pixel_id"]), "image_id"]
    assert len(candidates) + len(prefiltered) == len(catalog), "the pre-filter lists catalog images only"
    assert sorted(quality["image_id"]) == sorted(candidates), "QC covers the pre-filter's candidates exactly"
    verdict = quality["qc_pass"].fillna(False).astype(bool) | quality["qc_reason"].notna()
    assert verdict.all() and quality["qc_pass"].notna().all(), quality.loc[~verdict, "image_id"].tolist()


def source_ids(workdir: Path) -> dict:
    """Shareable image id -> the archive's own id (ids are pseudonymized in shareable outputs, when they are)."""
    private = workdir / "results/private/catalog.parquet"
    if private.exists():
        catalog = pd.read_parquet(private)
        if "source_id" in catalog:
            return dict(zip(catalog["image_id"], catalog["source_id"]))
    catalog = pd.read_parquet(workdir / "results/catalog.parquet", columns=["image_id"])
    return dict(zip(catalog["image_id"], catalog["image_id"]))


def ingest_ledger(workdir: Path) -> pd.DataFrame:
    """The ingest ledger with `item` as the archive's own id (the private ledger's source_item, when there is one)."""
    private = workdir / "results/private/ingest/ledger.csv"
    if private.exists():
        ledger = pd.read_csv(private, dtype=str)
        if "source_item" in ledger:
            return ledger.assign(item=ledger["source_item"])
    return pd.read_csv(workdir / "results/ingest/ledger.csv", dtype=str)


def by_source_id(workdir: Path, frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(image_id=frame["image_id"].map(source_ids(workdir))).set_index("image_id")


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    probe = write_corpus(tmp / "probe")
    workdir, expected = make_workdir(tmp, table(annotation_rows(sorted(probe)), encoding="cp1251"))
    result = snakemake(workdir, "results/quality/metrics.parquet", "results/quality/duplicates.parquet")
    assert result.returncode == 0, result.stderr[-5000:]
    n_rows = len(pd.read_csv(workdir / "resources/archive/notes.csv", encoding="cp1251", dtype=str))
    assert_accounting(workdir, n_rows)
    return workdir, expected


def test_bad_rows_are_ledgered_and_counts_add_up(hostile_run):
    workdir, expected = hostile_run
    annotations = pd.read_csv(workdir / "resources/archive/notes.csv", encoding="cp1251", dtype=str)
    catalog = by_source_id(workdir, pd.read_parquet(workdir / "results/catalog.parquet")).reset_index()
    ledger = ingest_ledger(workdir)
    assert len(catalog) + len(ledger) == len(annotations)
    reasons = ledger.groupby("item")["reason"].apply(set).to_dict()
    assert reasons["dup"] == {"duplicate_image_id"}
    assert reasons["gone"] == {"missing_file"}
    assert reasons["conflict_a"] == reasons["conflict_b"] == {"sex_conflict"}
    assert ledger["reason"].eq("no_patient_id").sum() == 1
    silent = catalog.set_index("image_id").loc["silent"]
    assert silent[["enlarged_heart", "scoliosis"]].isna().all(), "an empty note assesses nothing"
    # An impossible date is counted, not silently turned into a missing value.
    summary = json.loads((workdir / "results/ingest/summary.json").read_text())
    assert summary["unrecognized_values"]["study_date"]["examples"] == {"31.02.2021": 1}
    # Windows-1251 was read as Russian, not mojibake: the normal note set the labels to 0.
    assert catalog.set_index("image_id").loc["whole", "enlarged_heart"] == 0


def test_every_hostile_image_is_used_or_left_out_with_its_reason(hostile_run):
    workdir, expected = hostile_run
    quality = by_source_id(workdir, pd.read_parquet(workdir / "results/quality/metrics.parquet"))
    ingest_reasons = ingest_ledger(workdir).set_index("item")["reason"]
    outcomes = []
    for name, (outcome, reason) in sorted(expected.items()):
        if Path(name).stem not in quality.index:  # left out at ingest already (a FIFO, by the listing)
            assert outcome == "unreadable" and ingest_reasons.get(Path(name).stem) == reason, (name, outcome)
            outcomes.append((name, outcome, f"ingest:{ingest_reasons[Path(name).stem]}"))
            continue
        row = quality.loc[Path(name).stem]
        outcomes.append((name, outcome, row["qc_reason"]))
        if outcome == "ok":
            assert row["qc_pass"], (name, row["qc_reason"], row["detail"])
        elif outcome == "qc":
            assert not row["qc_pass"] and reason in row["qc_reasons"].split(";"), (name, row["qc_reasons"])
        else:
            assert not row["qc_pass"] and row["qc_reason"].startswith(("unreadable", "lateral")), (name, row["qc_reason"])
            assert reason in row["qc_reason"], (name, row["qc_reason"])
    print("\n" + pd.DataFrame(outcomes, columns=["file", "expected", "qc_reason"]).to_string(index=False))
    notes = quality["detail"].fillna("")
    assert "multi-frame" in notes["multiframe"].lower() or "frame" in notes["multiframe"].lower()


def test_planted_duplicates_form_one_group_of_the_right_kinds(hostile_run):
    workdir, _ = hostile_run
    duplicates = pd.read_parquet(workdir / "results/quality/duplicates.parquet")
    assert list(duplicates.columns) == ["image_id", "group", "kind"]
    duplicates = by_source_id(workdir, duplicates)
    planted = duplicates.loc[list(PLANTED_DUPLICATES)]
    assert planted["group"].nunique() == 1, planted
    assert planted["kind"].to_dict() == PLANTED_DUPLICATES
    # The corpus draws most files from one picture (at other bit depths, in DICOM, as RGB...): those are the same
    # image too and join the group. Different pictures must not.
    group = set(duplicates.index[duplicates["group"] == planted["group"].iloc[0]])
    for other in ("noise", "elongated", "inverted", "inverted_jpeg", "mono1_as_mono2", "onepixel", "bits_over"):
        assert other not in group, other
    assert {"sixteen", "twelve_in_sixteen", "mono1", "multiframe"} <= group, "other depths and formats of whole.png"
    # "silent" is a second catalog id for sixteen.png: the same file under two ids.
    assert duplicates.loc["silent", "group"] == duplicates.loc["sixteen", "group"]
    assert (duplicates.groupby("group").size() > 1).all(), "only images with a duplicate are listed"
    print("\n" + duplicates.reset_index().to_string(index=False))


def test_monochrome1_is_inverted_like_its_monochrome2_twin(hostile_run):
    import numpy as np

    workdir, _ = hostile_run
    from cxrflow.tensors import TensorCache

    # The shards are keyed by pixel_id; the catalog maps it to the pseudonym (as rule tensor_index does).
    index = pd.concat([pd.read_parquet(p) for p in sorted((workdir / "results/preprocess/shards").glob("*.parquet"))])
    index = index.merge(pd.read_parquet(workdir / "results/catalog.parquet", columns=["image_id", "pixel_id"]),
                        on="pixel_id", validate="one_to_one")
    shards = {int(p.stem.split("_")[-1]): str(p) for p in (workdir / "results/tensors").glob("shard_*.npy")}
    cache = TensorCache(index[index["status"] == "ok"].set_index("image_id")[["shard", "row"]], shards)
    ids = {source: shared for shared, source in source_ids(workdir).items()}
    mono1, twin = cache.load([ids["mono1"], ids["multiframe"]]).astype(int)
    assert np.abs(mono1 - twin).mean() < 3


@pytest.mark.parametrize("kind, rows, kwargs, message", [
    ("missing required column", None, {"header": "image_id,patient_id,sex,age,view,file,study_date"}, "annotation"),
    ("empty table", [], {}, "no rows"),
])
def test_bad_tables_stop_with_one_line_naming_the_file(tmp_path, kind, rows, kwargs, message):
    if rows is None:
        rows = ["a,P1,Ж,50,PA,hostile/whole.png,2021-03-04"]
    workdir, _ = make_workdir(tmp_path, table(rows, **kwargs))
    result = snakemake(workdir, "results/catalog.parquet")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("cxrflow error:")]
    assert len(errors) == 1 and "notes.csv" in errors[0] and message in errors[0], result.stderr[-3000:]
    assert "Traceback (most recent call last)" not in result.stderr


@pytest.mark.parametrize("overlay, message", [
    ({"cohorts": {"pathologies": {"cardio": {"positive": ["enlarged_hart"]}}}}, "cohorts.pathologies.cardio.positive"),
    ({"trian": {"epochs": 3}}, "'trian' was unexpected"),
    ({"split": {"test": -0.2}}, "split.test"),
    ({"cohorts": {"pathologies": {"../../etc": {"positive": ["scoliosis"]}}}}, "cohorts.pathologies"),
    ({"source": {"format": "xray9000"}}, "source.format"),
])
def test_config_mistakes_stop_with_one_line_naming_the_key(tmp_path, overlay, message):
    workdir = copy_repo(tmp_path / "repo")
    (workdir / "bad.yaml").write_text(yaml.safe_dump(overlay))
    result = snakemake(workdir, "-n", configfile="bad.yaml")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("cxrflow config error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_a_dicom_folder_without_a_table_takes_patients_from_the_tags(tmp_path):
    """source.format dicom over the hostile folder: tags give patient, sex and age ('065Y'); a file without
    PatientID, a non-DICOM file and a DICOM without pixel data are each left out with their reason."""
    workdir = copy_repo(tmp_path / "repo")
    expected = write_corpus(workdir / "resources" / "dicoms")
    # annotations "": no side table (an overlay cannot delete the default config's key, only blank it).
    overlay = {"source": {"format": "dicom", "images": "resources/dicoms", "annotations": ""}, "preprocess": {"shards": 1}}
    (workdir / "dicom.yaml").write_text(yaml.safe_dump(overlay))
    result = snakemake(workdir, "results/quality/metrics.parquet", configfile="dicom.yaml")
    assert result.returncode == 0, result.stderr[-5000:]
    private = workdir / "results/private/catalog.parquet"  # the paths, where shareable tables leave them out
    catalog = pd.read_parquet(private if private.exists() else workdir / "results/catalog.parquet")
    ledger = ingest_ledger(workdir)
    assert len(catalog) + int(ledger["reason"].isin(LEFT_OUT_AT_INGEST).sum()) == len(expected)
    by_file = {Path(item).name: reason for item, reason in zip(ledger["item"], ledger["reason"])}
    assert (ledger["reason"] == "no_patient_id").sum() == 1
    assert not catalog["path"].str.endswith("no_patient_tags.dcm").any()
    assert by_file["nopixels.dcm"] == "no_pixel_data"
    assert by_file["whole.png"] == "not_dicom" and by_file["zero.png"] in {"not_dicom", "unreadable", "empty_file"}
    assert (catalog["age"] == 65).all() and (catalog["sex"] == "F").all(), "PatientAge '065Y' and PatientSex read"
    assert "P-HOSTILE" not in set(catalog["patient_id"]), "the patient id is pseudonymized"
    assert by_file["pipe.png"] == "not_a_file", "a FIFO is left out with its reason, never opened"
    quality = pd.read_parquet(workdir / "results/quality/metrics.parquet").set_index("image_id")
    # Images no cohort can take (view, sex, age) are not decoded: the pre-filter lists them instead.
    prefiltered = pd.read_parquet(workdir / "results/preprocess/prefiltered.parquet")
    assert len(quality) + len(prefiltered) == len(catalog)
    assert_accounting(workdir, len(expected), LEFT_OUT_AT_INGEST)


LEFT_OUT_AT_INGEST = {"no_patient_id", "no_pixel_data", "not_dicom", "unreadable", "empty_file", "truncated",
                      "no_image_id", "duplicate_image_id", "missing_file", "not_a_file", "symlink_loop"}
