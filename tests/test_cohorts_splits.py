"""Cohorts and patient-exclusive splits: unit tests, property-based tests, and the real NIH / PadChest tables."""

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxrflow.cohorts import build_cohort, exclusion_keys
from cxrflow.errors import CxrflowError
from cxrflow.ingest import build_catalog
from cxrflow.splits import patient_exclusive_split

KEYS = ["enlarged_heart", "scoliosis", "dome_relaxation", "pneumonia", "emphysema"]
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
            labels = {k: 0 for k in KEYS}
            r = rng.random()
            if r < 0.3:
                labels[rng.choice(KEYS)] = 1
            rows.append({"image_id": f"p{p:04d}_{i}", "patient_id": f"pt{p:04d}", "sex": sex, "age": int(rng.integers(10, 95)),
                         "view": rng.choice(["PA", "PA", "PA", "LAT"]), **labels})
    frame = pd.DataFrame(rows)
    frame[KEYS] = frame[KEYS].astype("Int8")
    return frame


def quality_for(catalog, fail_every=17):
    return pd.DataFrame({"image_id": catalog["image_id"], "qc_pass": np.arange(len(catalog)) % fail_every != 0})


def test_cohort_filters_in_order_with_a_flow_that_adds_up():
    catalog = random_catalog(400, 0)
    cohort, flow = build_cohort(catalog, quality_for(catalog), COHORTS, "enlarged_heart", KEYS, seed=1)
    assert list(flow["step"]) == ["catalog", "view", "sex", "age", "quality", "exclusions", "class", "balance"]
    assert (flow["images"].iloc[:-1].to_numpy() - flow["images"].iloc[1:].to_numpy() == flow["removed_images"].iloc[1:].to_numpy()).all()
    merged = cohort.merge(catalog, on=["image_id", "patient_id"])
    assert (merged["sex"] == "F").all() and (merged["view"] == "PA").all() and merged["age"].between(18, 120).all()
    assert (merged.loc[merged["label"] == 1, "enlarged_heart"] == 1).all()
    negatives = merged[merged["label"] == 0]
    assert (negatives[KEYS] == 0).all(axis=None), "negatives carry no pathology label at all"
    assert (merged[["pneumonia", "emphysema", "dome_relaxation"]] != 1).all(axis=None)
    assert cohort["label"].value_counts().nunique() == 1, "balanced by undersampling"
    qc_failed = set(catalog["image_id"][~quality_for(catalog)["qc_pass"]])
    assert not qc_failed & set(cohort["image_id"])


def test_a_cohorts_own_target_is_never_excluded():
    assert "dome_relaxation" not in exclusion_keys(COHORTS, "dome_relaxation")
    assert "emphysema" not in exclusion_keys(COHORTS, "scoliosis")
    catalog = random_catalog(400, 2)
    cohort, _ = build_cohort(catalog, None, COHORTS, "dome_relaxation", KEYS, seed=1)
    assert (cohort["label"] == 1).sum() > 0


def test_unknown_pathology_and_unknown_key_are_clear_errors():
    catalog = random_catalog(20, 3)
    with pytest.raises(CxrflowError, match="no entry 'cardio'"):
        build_cohort(catalog, None, COHORTS, "cardio", KEYS, seed=1)
    bad = {**COHORTS, "pathologies": {"x": {"positive": ["not_a_key"]}}}
    with pytest.raises(CxrflowError, match="not_a_key"):
        build_cohort(catalog, None, bad, "x", KEYS, seed=1)


def test_changing_one_cohort_leaves_the_others_unchanged():
    catalog = random_catalog(300, 4)
    before, _ = build_cohort(catalog, None, COHORTS, "scoliosis", KEYS, seed=7)
    changed = {**COHORTS, "pathologies": {**COHORTS["pathologies"], "enlarged_heart": {"positive": ["enlarged_heart"], "exclude_add": ["scoliosis"]}}}
    after, _ = build_cohort(catalog, None, changed, "scoliosis", KEYS, seed=7)
    pd.testing.assert_frame_equal(before, after)


def test_too_small_cohort_fails_naming_the_cohort_and_counts():
    cohort = pd.DataFrame({"image_id": ["a", "b", "c"], "patient_id": ["1", "2", "3"], "label": [1, 0, 0]})
    with pytest.raises(CxrflowError, match=r"'tiny'.*1 positive and 2 negative"):
        patient_exclusive_split(cohort, SPLIT, 0, "tiny")


def random_cohort(n_patients, seed, positive_rate):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for i in range(int(rng.integers(1, 4))):
            rows.append({"image_id": f"i{p}_{i}", "patient_id": f"p{p}", "label": int(rng.random() < positive_rate)})
    return pd.DataFrame(rows)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_patients=st.integers(8, 300), seed=st.integers(0, 10_000), positive_rate=st.floats(0.1, 0.9),
       test=st.sampled_from([0.2, 0.25, 0.3]), val=st.sampled_from([0.1, 0.15, 0.2]))
def test_split_properties(n_patients, seed, positive_rate, test, val):
    cohort = random_cohort(n_patients, seed, positive_rate)
    fractions = {"val": val, "test": test}
    try:
        manifest = patient_exclusive_split(cohort, fractions, seed, "prop")
    except CxrflowError as err:
        # Refusing is only allowed when a class truly has too few patients for the fractions.
        counts = cohort.groupby("label")["patient_id"].nunique().reindex([0, 1], fill_value=0)
        assert counts.min() < 12 or "lacks a class" in str(err)
        return
    # No patient in two splits.
    assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()
    # Every image kept exactly once; both classes in every split.
    assert sorted(manifest["image_id"]) == sorted(cohort["image_id"])
    assert (manifest.groupby("split")["label"].nunique() == 2).all()
    # Determinism: byte-identical manifest from the same input and seed, whatever the row order.
    again = patient_exclusive_split(cohort.sample(frac=1, random_state=1), fractions, seed, "prop")
    assert manifest.to_csv(index=False) == again.to_csv(index=False)


def test_split_fractions_are_about_right():
    cohort = random_cohort(2000, 5, 0.4)
    manifest = patient_exclusive_split(cohort, SPLIT, 3, "big")
    share = manifest["split"].value_counts(normalize=True)
    assert share["test"] == pytest.approx(0.25, abs=0.03)
    assert share["val"] == pytest.approx(0.15, abs=0.03)
    by_split = manifest.groupby("split")["label"].mean()
    assert by_split.max() - by_split.min() < 0.05, "stratified by label"


def test_nih_cardiomegaly_cohort_on_the_real_table(shared_data, root, keys_file):
    source = {"format": "nih", "annotations": str(shared_data / "nih" / "Data_Entry_2017_v2020.csv.gz"),
              "label_map": str(root / "config/labels/nih.yaml"), "check_files": False}
    catalog = build_catalog(source, keys_file, base="/").catalog
    keys = list(catalog.columns[7:])
    cohorts = {"filters": {"views": ["PA", "AP"], "sex": "F"}, "balance": "undersample",
               "exclusions": ["emphysema", "fibrosis", "pneumonia", "infiltration", "nodule_mass", "consolidation"],
               "pathologies": {"cardiomegaly": {"positive": ["enlarged_heart"]}}}
    cohort, flow = build_cohort(catalog, None, cohorts, "cardiomegaly", keys, seed=42)
    print("\nNIH women-only Cardiomegaly cohort flow:\n" + flow.to_string(index=False))
    assert flow.iloc[-1]["positives"] == flow.iloc[-1]["negatives"] > 500
    manifest = patient_exclusive_split(cohort, SPLIT, 42, "cardiomegaly")
    assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()


def test_padchest_nine_cohorts_on_the_real_table(shared_data, root, keys_file):
    config = yaml.safe_load((root / "config" / "config.yaml").read_text())
    source = {"format": "padchest", "annotations": str(shared_data / "padchest" / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"),
              "label_map": str(root / "config/labels/padchest.yaml"), "check_files": False}
    catalog = build_catalog(source, keys_file, base="/").catalog
    keys = list(catalog.columns[7:])
    cohorts = {**config["cohorts"], "filters": {"views": ["PA", "AP"], "sex": "F"}}
    finals = {}
    for pathology in cohorts["pathologies"]:
        cohort, flow = build_cohort(catalog, None, cohorts, pathology, keys, seed=42)
        finals[pathology] = flow.set_index("step")["images"]
    table = pd.DataFrame(finals)
    print("\nPadChest cohorts (images after each filter):\n" + table.to_string())
    assert table.loc["class", "enlarged_heart"] > 1000
    # Targets PadChest cannot express are missing, not 0: such a cohort is empty rather than all-negative.
    assert table.loc["class", "aorta_compacted"] == 0
