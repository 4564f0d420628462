"""Cohorts and patient-exclusive splits: unit tests, property-based tests, the real NIH / PadChest tables, and the
metadata-only workflow (real Snakemake) with one cohort too small to split."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from snakemake.utils import update_config

from cxrflow.cohorts import build_cohort, build_cohorts, enabled_pathologies, exclusion_keys
from cxrflow.errors import CxrflowError
from cxrflow.figures import consort_figure
from cxrflow.ingest import build_catalog
from cxrflow.labels import load_keys
from cxrflow.splits import patient_exclusive_split

FINDINGS = ["enlarged_heart", "scoliosis", "dome_relaxation", "pneumonia", "emphysema"]
KEYS = FINDINGS + ["normal"]
COHORTS = {
    "filters": {"views": ["PA"], "sex": "F", "age": [18, 120], "require_qc_pass": True},
    "exclusions": ["pneumonia", "emphysema", "dome_relaxation"],
    "balance": "undersample",
    "pathologies": {
        "enlarged_heart": {"positive": ["enlarged_heart"]},
        "dome_relaxation": {"positive": ["dome_relaxation"]},
        "scoliosis": {"positive": ["scoliosis"], "exclude_remove": ["emphysema"]},
    },
}
SPLIT = {"val": 0.15, "test": 0.25}


def random_catalog(n_patients: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        sex = rng.choice(["F", "M"])
        for i in range(rng.integers(1, 5)):
            labels = {k: 0 for k in FINDINGS}
            r = rng.random()
            if r < 0.3:
                labels[rng.choice(FINDINGS)] = 1
            elif r < 0.33:
                labels[rng.choice(FINDINGS)] = None  # uncertain
            labels["normal"] = int(r >= 0.33 and rng.random() < 0.9)  # most notes without findings say "normal"
            rows.append({"image_id": f"p{p:04d}_{i}", "patient_id": f"pt{p:04d}", "sex": sex, "age": int(rng.integers(10, 95)),
                         "view": rng.choice(["PA", "PA", "PA", "LAT"]), **labels})
    frame = pd.DataFrame(rows)
    frame[KEYS] = frame[KEYS].astype("Int8")
    return frame


def quality_for(catalog, fail_every=17):
    return pd.DataFrame({"image_id": catalog["image_id"], "qc_pass": np.arange(len(catalog)) % fail_every != 0})


def assert_flow_adds_up(flow):
    images, patients = flow["images"].to_numpy(), flow["patients"].to_numpy()
    assert (images[:-1] - images[1:] == flow["removed_images"].iloc[1:].to_numpy()).all()
    assert (patients[:-1] - patients[1:] == flow["removed_patients"].iloc[1:].to_numpy()).all()
    assert (flow["reason"].iloc[1:] != "").all(), "every removal has a reason"


# --- cohorts ------------------------------------------------------------------------------------------------------

def test_cohort_filters_in_order_with_a_flow_that_adds_up():
    catalog = random_catalog(400, 0)
    cohort, flow = build_cohort(catalog, quality_for(catalog), COHORTS, "enlarged_heart", KEYS, seed=1)
    assert list(flow["step"]) == ["catalog", "view", "sex", "age", "quality", "exclusions", "exclusions: uncertain", "class",
                                  "negatives: a finding uncertain", "negatives: not affirmed normal", "balance"]
    assert_flow_adds_up(flow)
    assert flow.iloc[-1]["images"] == len(cohort) and flow.iloc[-1]["patients"] == cohort["patient_id"].nunique()
    merged = cohort.merge(catalog, on=["image_id", "patient_id"])
    assert len(merged) == len(cohort)
    assert (merged["sex"] == "F").all() and (merged["view"] == "PA").all() and merged["age"].between(18, 120).all()
    assert merged.loc[merged["label"] == 1, "enlarged_heart"].fillna(0).eq(1).all()
    negatives = merged[merged["label"] == 0]
    # Nullable Int8: NA == 0 is NA, which .all() would skip; fillna with a value that fails makes NA count.
    assert negatives[FINDINGS].fillna(1).eq(0).all(axis=None), "negatives carry no finding, and none is uncertain"
    assert negatives["normal"].fillna(0).eq(1).all(), "every negative is affirmed normal"
    assert merged[["pneumonia", "emphysema", "dome_relaxation"]].fillna(1).ne(1).all(axis=None), "no exclusion, not even uncertain"
    assert cohort["label"].value_counts().nunique() == 1, "balanced by undersampling"
    qc_failed = set(catalog["image_id"][~quality_for(catalog)["qc_pass"]])
    assert not qc_failed & set(cohort["image_id"])
    assert list(cohort["image_id"]) == sorted(cohort["image_id"])


def test_balance_none_keeps_every_class_image_and_max_per_class_caps_each_class():
    catalog = random_catalog(600, 11)
    unbalanced = {**COHORTS, "balance": "none"}
    kept, flow = build_cohort(catalog, None, unbalanced, "enlarged_heart", KEYS, seed=1)
    assert list(flow["step"]) == ["catalog", "view", "sex", "age", "exclusions", "exclusions: uncertain", "class",
                                  "negatives: a finding uncertain", "negatives: not affirmed normal"]
    counts = kept["label"].value_counts()
    assert counts[0] > 2 * counts[1] > 0, "without balancing the negatives outnumber the positives"

    capped, flow = build_cohort(catalog, None, {**unbalanced, "max_per_class": 40}, "enlarged_heart", KEYS, seed=1)
    assert list(flow["step"])[-2:] == ["negatives: not affirmed normal", "cap"]
    assert flow.iloc[-1]["reason"] == "more than 40 images in the class"
    assert_flow_adds_up(flow)
    assert capped["label"].value_counts().to_dict() == {0: 40, 1: min(40, counts[1])}
    assert set(capped["image_id"]) <= set(kept["image_id"])

    # The cap after undersampling: both classes first fall to the smaller one, then to the cap.
    both, flow = build_cohort(catalog, None, {**COHORTS, "max_per_class": 10}, "enlarged_heart", KEYS, seed=1)
    assert list(flow["step"])[-3:] == ["negatives: not affirmed normal", "balance", "cap"]
    assert both["label"].value_counts().to_dict() == {0: 10, 1: 10}


def test_a_cohorts_own_target_is_never_excluded():
    assert "dome_relaxation" not in exclusion_keys(COHORTS, "dome_relaxation")
    assert "emphysema" not in exclusion_keys(COHORTS, "scoliosis")
    catalog = random_catalog(400, 2)
    cohort, _ = build_cohort(catalog, None, COHORTS, "dome_relaxation", KEYS, seed=1)
    assert (cohort["label"] == 1).sum() > 0


def test_unknown_pathology_unknown_key_and_unlabelled_target_are_clear_errors():
    catalog = random_catalog(20, 3)
    with pytest.raises(CxrflowError, match="no entry 'cardio'"):
        build_cohort(catalog, None, COHORTS, "cardio", KEYS, seed=1)
    bad = {**COHORTS, "pathologies": {"x": {"positive": ["not_a_key"]}}}
    with pytest.raises(CxrflowError, match="not_a_key"):
        build_cohort(catalog, None, bad, "x", KEYS, seed=1)
    # A source that never labels the target (PadChest has no "compacted aorta"): every value is missing.
    unlabelled = catalog.assign(scoliosis=pd.array([pd.NA] * len(catalog), dtype="Int8"))
    with pytest.raises(CxrflowError, match=r"scoliosis.*never labels \['scoliosis'\].*cohorts.enabled"):
        build_cohort(unlabelled, None, COHORTS, "scoliosis", KEYS, seed=1)


def test_enabled_pathologies_select_and_check():
    assert enabled_pathologies(COHORTS) == ["dome_relaxation", "enlarged_heart", "scoliosis"]
    assert enabled_pathologies({**COHORTS, "enabled": ["scoliosis", "enlarged_heart"]}) == ["enlarged_heart", "scoliosis"]
    with pytest.raises(CxrflowError, match=r"cohorts.enabled: \['aorta'\] not in cohorts.pathologies"):
        enabled_pathologies({**COHORTS, "enabled": ["scoliosis", "aorta"]})
    with pytest.raises(CxrflowError, match="cohorts.enabled: the list is empty"):
        enabled_pathologies({**COHORTS, "enabled": []})


def test_cohorts_do_not_depend_on_row_order_and_build_cohorts_equals_build_cohort():
    catalog = random_catalog(500, 6)
    quality = quality_for(catalog)
    together = build_cohorts(catalog, quality, COHORTS, sorted(COHORTS["pathologies"]), KEYS, seed=3)
    shuffled = catalog.sample(frac=1, random_state=2).reset_index(drop=True)
    for pathology, (cohort, flow) in together.items():
        alone, alone_flow = build_cohort(shuffled, quality.sample(frac=1, random_state=5), COHORTS, pathology, KEYS, seed=3)
        pd.testing.assert_frame_equal(cohort, alone)
        pd.testing.assert_frame_equal(flow, alone_flow)


def test_changing_one_cohort_leaves_the_others_unchanged():
    catalog = random_catalog(300, 4)
    before, _ = build_cohort(catalog, None, COHORTS, "scoliosis", KEYS, seed=7)
    changed = {**COHORTS, "pathologies": {**COHORTS["pathologies"], "enlarged_heart": {"positive": ["enlarged_heart"], "exclude_add": ["scoliosis"]}}}
    after, _ = build_cohort(catalog, None, changed, "scoliosis", KEYS, seed=7)
    pd.testing.assert_frame_equal(before, after)
    first = patient_exclusive_split(before, SPLIT, 7, "scoliosis").to_csv(index=False)
    assert patient_exclusive_split(after, SPLIT, 7, "scoliosis").to_csv(index=False) == first


def test_undersampled_cohorts_draw_nested_negatives_from_one_seeded_order():
    """Every cohort ranks its negatives by one seeded order of the image ids, so a cohort with fewer positives takes
    a subset of the negatives of a cohort with more: a multi-label network on their union reads the normal pool once."""
    catalog = random_catalog(1500, 9)
    built = build_cohorts(catalog, None, COHORTS, sorted(COHORTS["pathologies"]), KEYS, seed=5)
    negatives = {p: set(c.loc[c["label"] == 0, "image_id"]) for p, (c, _) in built.items()}
    sizes = sorted(negatives, key=lambda p: len(negatives[p]))
    assert len(negatives[sizes[0]]) < len(negatives[sizes[-1]]) < 0.9 * (catalog["normal"] == 1).sum()
    for smaller, larger in zip(sizes, sizes[1:]):
        assert negatives[smaller] <= negatives[larger], (smaller, larger)
    union = set().union(*negatives.values())
    assert len(union) == max(map(len, negatives.values()))
    # The order is seeded: another seed draws other negatives, of the same number.
    other, _ = build_cohort(catalog, None, COHORTS, sizes[0], KEYS, seed=6)
    assert set(other.loc[other["label"] == 0, "image_id"]) != negatives[sizes[0]]
    assert (other["label"] == 0).sum() == len(negatives[sizes[0]])


def test_consort_figure_is_drawn(tmp_path):
    catalog = random_catalog(200, 8)
    _, flow = build_cohort(catalog, quality_for(catalog), COHORTS, "enlarged_heart", KEYS, seed=1)
    consort_figure(flow, "Cohort flow: Enlarged heart (Сердце расширено)", tmp_path / "flow.png")
    assert (tmp_path / "flow.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "flow.png").stat().st_size > 20_000


# --- splits -------------------------------------------------------------------------------------------------------

def test_too_small_cohort_fails_naming_the_cohort_and_counts():
    cohort = pd.DataFrame({"image_id": ["a", "b", "c", "d"], "patient_id": ["1", "2", "3", "3"], "label": [1, 0, 0, 1]})
    with pytest.raises(CxrflowError, match=r"cohort 'tiny' is too small to split: 2 positive and 2 negative patients "
                                           r"\(4 images: 2 positive, 2 negative\); 3 groups \(test, val, train\)"):
        patient_exclusive_split(cohort, SPLIT, 0, "tiny")


def random_cohort(n_patients, seed, positive_rate, mixed_rate=0.1):
    """Patients with 1-3 images: all positive, all negative, or (mixed_rate) some of each."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        n_images = int(rng.integers(1, 4))
        if n_images > 1 and rng.random() < mixed_rate:
            labels = [1] + [0] * (n_images - 1)
        else:
            labels = [int(rng.random() < positive_rate)] * n_images
        rows += [{"image_id": f"i{p}_{i}", "patient_id": f"p{p}", "label": label} for i, label in enumerate(labels)]
    return pd.DataFrame(rows)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_patients=st.integers(2, 150), seed=st.integers(0, 10_000), positive_rate=st.floats(0.02, 0.98),
       mixed_rate=st.sampled_from([0.0, 0.1, 0.5]), test=st.sampled_from([0.1, 0.25, 0.3]), val=st.sampled_from([0.1, 0.15, 0.2]),
       folds=st.sampled_from([None, None, 2, 5]), minimum=st.integers(1, 3))
def test_split_properties(n_patients, seed, positive_rate, mixed_rate, test, val, folds, minimum):
    cohort = random_cohort(n_patients, seed, positive_rate, mixed_rate)
    split_settings = {"val": val, "test": test, "folds": folds, "min_patients_per_class": minimum}
    groups = 1 + folds if folds else 3
    patients_with = {c: cohort.loc[cohort["label"] == c, "patient_id"].nunique() for c in (0, 1)}
    possible = min(patients_with.values()) >= groups * minimum
    if not possible:
        # Refusing is right exactly when a class has too few patients to give every group `minimum` of them.
        with pytest.raises(CxrflowError, match=rf"cohort 'prop' is too small to split: {patients_with[1]} positive and "
                                               rf"{patients_with[0]} negative patients"):
            patient_exclusive_split(cohort, split_settings, seed, "prop")
        return
    manifest = patient_exclusive_split(cohort, split_settings, seed, "prop")
    # Every image exactly once, with its label; no patient in two splits (or two folds).
    assert sorted(manifest["image_id"]) == sorted(cohort["image_id"])
    assert manifest.merge(cohort, on=["image_id", "patient_id", "label"]).shape[0] == len(cohort)
    group = manifest["split"] + ("/" + manifest["fold"].astype("string").fillna("-") if folds else "")
    assert (group.groupby(manifest["patient_id"]).nunique() == 1).all()
    # Both classes in every group, from at least `minimum` patients each.
    per_group = manifest.groupby([group, "label"])["patient_id"].nunique().unstack(fill_value=0)
    assert len(per_group) == groups and (per_group.reindex(columns=[0, 1], fill_value=0) >= minimum).all(axis=None), per_group
    if folds:
        assert manifest.loc[manifest["split"] == "test", "fold"].isna().all()
        assert set(manifest.loc[manifest["split"] == "val", "fold"]) == {0}
        assert set(manifest.loc[manifest["split"] == "train", "fold"]) == set(range(1, folds))
    # Determinism: byte-identical manifest from the same input and seed, whatever the row order.
    again = patient_exclusive_split(cohort.sample(frac=1, random_state=1), split_settings, seed, "prop")
    assert manifest.to_csv(index=False) == again.to_csv(index=False)


def test_split_fractions_are_about_right_and_stratified():
    cohort = random_cohort(2000, 5, 0.4)
    manifest = patient_exclusive_split(cohort, SPLIT, 3, "big")
    share = manifest["split"].value_counts(normalize=True)
    assert share["test"] == pytest.approx(0.25, abs=0.01)
    assert share["val"] == pytest.approx(0.15, abs=0.01)
    by_split = manifest.groupby("split")["label"].mean()
    assert by_split.max() - by_split.min() < 0.02, "stratified by label"


def test_k_folds_keep_the_test_set_and_are_stratified():
    cohort = random_cohort(3000, 9, 0.3)
    plain = patient_exclusive_split(cohort, SPLIT, 3, "big")
    folded = patient_exclusive_split(cohort, {**SPLIT, "folds": 5}, 3, "big")
    assert list(folded.columns) == ["image_id", "patient_id", "label", "split", "fold"]
    assert set(folded.loc[folded["split"] == "test", "image_id"]) == set(plain.loc[plain["split"] == "test", "image_id"])
    other_val = patient_exclusive_split(cohort, {**SPLIT, "val": 0.1}, 3, "big")
    assert set(other_val.loc[other_val["split"] == "test", "image_id"]) == set(plain.loc[plain["split"] == "test", "image_id"])
    rest = folded[folded["split"] != "test"]
    share = rest["fold"].value_counts(normalize=True)
    assert share.between(0.19, 0.21).all(), share
    by_fold = rest.groupby("fold")["label"].mean()
    assert by_fold.max() - by_fold.min() < 0.02
    written = folded.to_csv(index=False).splitlines()
    assert written[0] == "image_id,patient_id,label,split,fold"
    assert any(line.endswith(",test,") for line in written), "test rows have an empty fold"


# --- the real tables ----------------------------------------------------------------------------------------------

def test_nih_cardiomegaly_cohort_on_the_real_table(shared_data, root, keys_file, tmp_path):
    source = {"format": "nih", "annotations": str(shared_data / "nih" / "Data_Entry_2017_v2020.csv.gz"),
              "label_map": str(root / "config/labels/nih.yaml"), "check_files": False}
    catalog = build_catalog(source, keys_file, base="/").catalog
    keys = load_keys(keys_file)
    # Women, frontal views, and NIH's own findings that stand for the paper's confounders.
    cohorts = {"filters": {"views": ["PA", "AP"], "sex": "F", "age": [18, 120]}, "balance": "undersample",
               "exclusions": ["emphysema", "fibrosis", "pneumonia", "infiltration", "nodule_mass", "consolidation"],
               "pathologies": {"cardiomegaly": {"positive": ["enlarged_heart"]}}}
    cohort, flow = build_cohort(catalog, None, cohorts, "cardiomegaly", keys, seed=42)
    print("\nNIH ChestX-ray14, women-only Cardiomegaly cohort flow:\n" + flow.to_string(index=False))
    assert_flow_adds_up(flow)
    assert flow.iloc[0]["images"] == 112_120
    assert flow.iloc[-1]["positives"] == flow.iloc[-1]["negatives"] > 500
    manifest = patient_exclusive_split(cohort, SPLIT, 42, "cardiomegaly")
    table = manifest.groupby(["split", "label"]).size().unstack()
    print("split (images per label):\n" + table.to_string())
    assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()
    assert (table > 50).all(axis=None)
    consort_figure(flow, "NIH Cardiomegaly, women", tmp_path / "nih.png")
    assert (tmp_path / "nih.png").stat().st_size > 20_000


def padchest_config(root: Path) -> dict:
    """config/config.yaml with config/padchest.yaml on top, merged as `--configfile` merges them."""
    config = yaml.safe_load((root / "config" / "config.yaml").read_text(encoding="utf-8"))
    update_config(config, yaml.safe_load((root / "config" / "padchest.yaml").read_text(encoding="utf-8")))
    return config


def test_padchest_nine_cohorts_of_config_padchest_yaml_on_the_real_table(shared_data, root, keys_file):
    config = padchest_config(root)
    assert config["source"]["check_files"] is False and config["source"]["format"] == "padchest"
    source = {**config["source"], "annotations": str(shared_data / "padchest" / Path(config["source"]["annotations"]).name),
              "label_map": str(root / config["source"]["label_map"])}
    catalog = build_catalog(source, keys_file, base="/").catalog
    keys = load_keys(keys_file)
    cohorts = config["cohorts"]
    assert len(cohorts["pathologies"]) == 9
    enabled = enabled_pathologies(cohorts)
    built = build_cohorts(catalog, None, cohorts, enabled, keys, seed=config["seed"])
    finals = {}
    for pathology in sorted(cohorts["pathologies"]):
        if pathology not in enabled:
            # The three targets PadChest has no label for: left out by config/padchest.yaml, and a clear error if run.
            with pytest.raises(CxrflowError, match=f"{pathology}: the source never labels"):
                build_cohort(catalog, None, cohorts, pathology, keys, seed=config["seed"])
            continue
        cohort, flow = built[pathology]
        assert_flow_adds_up(flow)
        print(f"\nPadChest {pathology} flow:\n" + flow.to_string(index=False))
        manifest = patient_exclusive_split(cohort, config["split"], config["seed"], pathology)
        assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()
        finals[pathology] = flow.set_index("step")["images"]
        finals[pathology]["test images"] = int((manifest["split"] == "test").sum())
    table = pd.DataFrame(finals)
    print("\nPadChest cohorts of config/padchest.yaml (images after each filter):\n" + table.to_string())
    assert sorted(enabled) == sorted(table.columns) and len(enabled) == 6
    assert set(cohorts["pathologies"]) - set(enabled) == {"enlarged_heart_shadow", "aorta_compacted", "aortic_arch_sclerosis"}
    # The README's counts for frontal women (views PA, AP, AP_horizontal): 54,835 images, of which 5,553 cardiomegaly.
    assert 50_000 < table.loc["sex", "enlarged_heart"] <= 54_835
    assert table.loc["balance", "enlarged_heart"] > 4_000
    assert table.loc["balance", "dome_relaxation"] > 300


# --- the workflow: metadata only, real Snakemake ---------------------------------------------------------------------

def nih_format_table(n_patients: int, seed: int) -> pd.DataFrame:
    """A small table in NIH ChestX-ray14's own format (no images are needed with check_files: false)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(1, n_patients + 1):
        sex, age = rng.choice(["F", "M"]), int(rng.integers(20, 90))
        for k in range(int(rng.integers(1, 4))):
            finding = rng.choice(["No Finding", "Cardiomegaly", "Effusion", "Cardiomegaly|Effusion", "Atelectasis"],
                                 p=[0.5, 0.2, 0.2, 0.05, 0.05])
            rows.append({"Image Index": f"{p:08d}_{k:03d}.png", "Finding Labels": finding, "Follow-up #": k,
                         "Patient ID": p, "Patient Age": age + k, "Patient Gender": sex, "View Position": rng.choice(["PA", "AP"])})
    rows.append({"Image Index": "99999999_000.png", "Finding Labels": "Hernia", "Follow-up #": 0, "Patient ID": 99999999,
                 "Patient Age": 70, "Patient Gender": "F", "View Position": "PA"})
    return pd.DataFrame(rows)


def run_snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    snakemake = str(Path(sys.executable).parent / "snakemake")
    # --configfile last: it takes several values, and would swallow the targets after it.
    return subprocess.run([snakemake, *args, "--cores", "2", "--configfile", "config/meta.yaml"], cwd=workdir,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.e2e
def test_metadata_only_cohorts_and_splits_with_snakemake(tmp_path, root):
    for name in ["Snakefile", "workflow", "config", "src", "envs", "profiles"]:
        if (root / name).is_dir():
            shutil.copytree(root / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (root / name).exists():
            shutil.copy2(root / name, tmp_path / name)
    (tmp_path / "resources").mkdir()
    nih_format_table(150, 1).to_csv(tmp_path / "resources" / "Data_Entry.csv", index=False)
    overlay = {
        "source": {"format": "nih", "annotations": "resources/Data_Entry.csv", "label_map": "config/labels/nih.yaml",
                   "check_files": False},
        "cohorts": {"filters": {"views": ["PA", "AP"], "sex": "F", "require_qc_pass": False},
                    "pathologies": {"effusion": {"positive": ["pleural_effusion"]}, "hernia": {"positive": ["hernia"]}},
                    "enabled": ["enlarged_heart", "effusion", "hernia"]},
        "split": {"folds": 3},
    }
    (tmp_path / "config" / "meta.yaml").write_text(yaml.safe_dump(overlay), encoding="utf-8")
    targets = [f"results/splits/{p}.csv" for p in ("enlarged_heart", "effusion", "hernia")] + ["results/cohorts/flow_summary.csv"]

    # The hernia cohort (one positive image) cannot be split: its job fails naming it; --keep-going finishes the rest.
    result = run_snakemake(tmp_path, "--keep-going", *targets)
    assert result.returncode != 0
    log = (tmp_path / "results" / "logs" / "split" / "hernia.log").read_text(encoding="utf-8")
    assert "cohort 'hernia' is too small to split: 1 positive and" in log
    assert "cohort 'hernia' is too small to split" in result.stderr
    for pathology in ("enlarged_heart", "effusion"):
        manifest = pd.read_csv(tmp_path / "results" / "splits" / f"{pathology}.csv")
        assert list(manifest.columns) == ["image_id", "patient_id", "label", "split", "fold"]
        assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()
        assert (tmp_path / "results" / "cohorts" / f"{pathology}_flow.png").stat().st_size > 20_000
    assert (tmp_path / "results" / "cohorts" / "hernia_flow.png").exists(), "the flow shows why a cohort is too small"
    summary = pd.read_csv(tmp_path / "results" / "cohorts" / "flow_summary.csv").set_index("step")
    assert sorted(summary.columns) == ["effusion", "enlarged_heart", "hernia"]
    assert "quality" not in summary.index, "metadata only: no quality control"
    first = (tmp_path / "results" / "splits" / "enlarged_heart.csv").read_bytes()

    # Editing one cohort's entry reruns that cohort only.
    overlay["cohorts"]["pathologies"]["effusion"]["exclude_add"] = ["atelectasis"]
    (tmp_path / "config" / "meta.yaml").write_text(yaml.safe_dump(overlay), encoding="utf-8")
    dry = run_snakemake(tmp_path, "-n", "--keep-going", *targets[:2])
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "results/cohorts/effusion.parquet" in dry.stdout
    assert "results/cohorts/enlarged_heart.parquet" not in dry.stdout, dry.stdout[-3000:]
    # Deleting a manifest and rerunning gives the same bytes.
    (tmp_path / "results" / "splits" / "enlarged_heart.csv").unlink()
    assert run_snakemake(tmp_path, "results/splits/enlarged_heart.csv").returncode == 0
    assert (tmp_path / "results" / "splits" / "enlarged_heart.csv").read_bytes() == first
