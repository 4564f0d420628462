"""The "no pathology" class done right (issue 13), and the split's natural-prevalence test set (issue 16) and
duplicate images (issue 19): property tests over random catalogs with missing values, hand-made flows, a
VinDr-like catalog without sex, age or view, and the real NIH and PadChest tables.

Every assertion on a nullable Int8 column fills missing values with a value that fails (`NA == 1` is NA, and
`.all()` would skip it)."""

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from snakemake.utils import update_config

from cxrflow.cohorts import build_cohort, build_cohorts, enabled_pathologies
from cxrflow.config_checks import schema_errors
from cxrflow.errors import CxrflowError
from cxrflow.ingest import build_catalog
from cxrflow.labels import load_keys
from cxrflow.pipeline import run_cohort, run_split
from cxrflow.splits import patient_exclusive_split

FINDINGS = ["enlarged_heart", "scoliosis", "pneumonia", "emphysema", "atelectasis", "other_finding"]
KEYS = FINDINGS + ["normal"]
EXCLUSIONS = ["pneumonia", "emphysema"]
COHORTS = {
    "filters": {"views": None, "sex": None, "age": None},
    "exclusions": EXCLUSIONS,
    "balance": "none",
    "pathologies": {"enlarged_heart": {"positive": ["enlarged_heart"]}, "scoliosis": {"positive": ["scoliosis"]}},
}
SPLIT = {"val": 0.15, "test": 0.25}


def random_catalog(n_images: int, seed: int, na_rate: float, unlabelled: frozenset = frozenset(),
                   quality_tag: bool = False, images_per_patient: int = 3) -> pd.DataFrame:
    """Images with findings, uncertain (missing) values, normal affirmations that may contradict the findings,
    keys the source never labels (all missing), and optionally a quality tag."""
    rng = np.random.default_rng(seed)
    patient = rng.integers(0, max(1, n_images // images_per_patient), n_images)
    frame = pd.DataFrame({"image_id": [f"i{i:05d}" for i in range(n_images)], "patient_id": [f"p{p:05d}" for p in patient],
                          "sex": pd.array([None] * n_images, dtype="string"), "age": pd.array([None] * n_images, dtype="Int16"),
                          "view": pd.array([None] * n_images, dtype="string")})
    has_finding = rng.random(n_images) < 0.4
    for key in FINDINGS:
        present = has_finding & (rng.random(n_images) < 0.3)
        frame[key] = pd.arrays.IntegerArray(present.astype(np.int8), rng.random(n_images) < na_rate)
    # Mostly the images without findings are affirmed normal, but not always, and a few with findings are too.
    normal = np.where(has_finding, rng.random(n_images) < 0.05, rng.random(n_images) < 0.8)
    frame["normal"] = pd.arrays.IntegerArray(normal.astype(np.int8), rng.random(n_images) < na_rate)
    for key in unlabelled:
        frame[key] = pd.array([pd.NA] * n_images, dtype="Int8")
    if quality_tag:
        frame["quality_tag"] = pd.arrays.IntegerArray((rng.random(n_images) < 0.05).astype(np.int8), rng.random(n_images) < 0.5)
    return frame


def labelled(catalog: pd.DataFrame, keys: list[str]) -> list[str]:
    return [k for k in keys if catalog[k].notna().any()]


def expected_classes(catalog: pd.DataFrame, cohorts: dict, target: str) -> tuple[set, set]:
    """An independent oracle, row by row in plain Python: the image ids of each class after the class rules
    (no filters, no balancing)."""
    exclusions = [k for k in cohorts["exclusions"] if k != target]
    normal_rule = cohorts.get("negatives", "normal") == "normal"
    remove_uncertain = cohorts.get("uncertain_exclusions", "remove") == "remove"
    known = labelled(catalog, KEYS)
    positives, negatives = set(), set()
    for row in catalog.to_dict("records"):
        value = {k: (None if pd.isna(row[k]) else int(row[k])) for k in KEYS}
        if normal_rule and row.get("quality_tag") is not None and not pd.isna(row["quality_tag"]) and row["quality_tag"] == 1:
            continue
        if any(value[k] == 1 for k in exclusions):
            continue
        if remove_uncertain and any(value[k] is None for k in exclusions if k in known):
            continue
        if value[target] == 1:
            positives.add(row["image_id"])
            continue
        if value[target] != 0 or any(value[k] == 1 for k in FINDINGS):
            continue
        if normal_rule and (value["normal"] != 1 or any(value[k] is None for k in FINDINGS if k in known)):
            continue
        negatives.add(row["image_id"])
    return positives, negatives


def assert_flow_adds_up(flow):
    images, patients = flow["images"].to_numpy(), flow["patients"].to_numpy()
    assert (images[:-1] - images[1:] == flow["removed_images"].iloc[1:].to_numpy()).all()
    assert (patients[:-1] - patients[1:] == flow["removed_patients"].iloc[1:].to_numpy()).all()
    assert (flow["reason"].iloc[1:] != "").all(), "every removal has a reason"


# --- the class rules: properties over random catalogs -----------------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 300), seed=st.integers(0, 10_000), na_rate=st.sampled_from([0.0, 0.02, 0.1, 0.4]),
       unlabelled=st.frozensets(st.sampled_from(["scoliosis", "emphysema", "atelectasis", "other_finding"]), max_size=3),
       quality_tag=st.booleans(), negatives=st.sampled_from(["normal", "unlabelled"]),
       uncertain=st.sampled_from(["remove", "keep"]), balance=st.sampled_from(["none", "undersample"]))
def test_every_negative_is_affirmed_normal_and_every_class_is_exactly_its_rule(n, seed, na_rate, unlabelled, quality_tag,
                                                                               negatives, uncertain, balance):
    catalog = random_catalog(n, seed, na_rate, unlabelled, quality_tag)
    cohorts = {**COHORTS, "negatives": negatives, "uncertain_exclusions": uncertain, "balance": balance}
    target = "enlarged_heart"
    if catalog[target].isna().all():
        with pytest.raises(CxrflowError, match="never labels"):
            build_cohort(catalog, None, cohorts, target, KEYS, seed=1)
        return
    if negatives == "normal" and not catalog["normal"].eq(1).any():
        with pytest.raises(CxrflowError, match="never affirms a normal study"):
            build_cohort(catalog, None, cohorts, target, KEYS, seed=1)
        return
    cohort, flow = build_cohort(catalog, None, cohorts, target, KEYS, seed=1)
    assert_flow_adds_up(flow)
    merged = cohort.merge(catalog, on=["image_id", "patient_id"], how="left", validate="one_to_one")
    positives, negatives_ = merged[merged["label"] == 1], merged[merged["label"] == 0]
    assert positives[target].fillna(0).eq(1).all(), "every positive has its target == 1"
    known = labelled(catalog, FINDINGS)
    if negatives == "normal":
        assert negatives_["normal"].fillna(0).eq(1).all(), "every negative is affirmed normal"
        assert negatives_[known].fillna(1).eq(0).all(axis=None), "no negative has a 1 or a missing value on a labelled key"
        if quality_tag:
            assert merged["quality_tag"].fillna(0).ne(1).all(), "a quality-tagged image is in neither class"
    else:
        assert negatives_[FINDINGS].fillna(0).ne(1).all(axis=None) and negatives_[target].fillna(1).eq(0).all()
    excluded_known = [k for k in EXCLUSIONS if k in known]
    assert merged[EXCLUSIONS].fillna(0).ne(1).all(axis=None), "an exclusion finding is in neither class"
    if uncertain == "remove":
        assert merged[excluded_known].notna().all(axis=None), "an uncertain exclusion is in neither class"

    # Exactly the images of the rule, no more, no fewer (before balancing): an oracle written row by row.
    want_pos, want_neg = expected_classes(catalog, cohorts, target)
    if balance == "none":
        assert set(positives["image_id"]) == want_pos and set(negatives_["image_id"]) == want_neg
    else:
        assert set(positives["image_id"]) <= want_pos and set(negatives_["image_id"]) <= want_neg
        assert len(positives) == len(negatives_) == min(len(want_pos), len(want_neg))
    pool, _ = build_cohort(catalog, None, cohorts, target, KEYS, seed=1, with_pool=True)
    assert set(pool.loc[pool["label"] == 1, "image_id"]) == want_pos and set(pool.loc[pool["label"] == 0, "image_id"]) == want_neg
    pd.testing.assert_frame_equal(pool.loc[pool["selected"], ["image_id", "patient_id", "label"]].reset_index(drop=True), cohort,
                                  check_index_type=False, check_dtype=False)


def test_each_removal_is_a_flow_step_with_its_count():
    rows = [  # image, normal, enlarged_heart, pneumonia, atelectasis, quality_tag
        ("a", 1, 0, 0, 0, 0),        # negative
        ("b", 1, 0, 0, 0, pd.NA),    # negative (no tag)
        ("c", 0, 0, 0, 0, 0),        # not affirmed normal
        ("d", pd.NA, 0, 0, 0, 0),    # not affirmed normal
        ("e", 1, 0, 0, pd.NA, 0),    # another finding uncertain
        ("f", 1, 0, pd.NA, 0, 0),    # uncertain exclusion (both classes)
        ("g", 0, 1, pd.NA, 0, 0),    # uncertain exclusion, a positive
        ("h", 1, 0, 1, 0, 0),        # exclusion
        ("i", 1, 0, 0, 1, 0),        # another finding
        ("j", 1, 0, 0, 0, 1),        # quality tag
        ("k", 0, 1, 0, 0, 1),        # quality tag, a positive
        ("l", 0, 1, 0, 1, 0),        # positive
    ]
    catalog = pd.DataFrame(rows, columns=["image_id", "normal", "enlarged_heart", "pneumonia", "atelectasis", "quality_tag"])
    catalog = catalog.astype({c: "Int8" for c in catalog.columns[1:]}).assign(
        patient_id=catalog["image_id"] + "_p", sex="F", age=50, view="PA")
    keys = ["enlarged_heart", "pneumonia", "atelectasis", "normal"]
    cohorts = {"filters": {"views": ["PA"]}, "exclusions": ["pneumonia"], "balance": "none",
               "pathologies": {"enlarged_heart": {"positive": ["enlarged_heart"]}}}
    cohort, flow = build_cohort(catalog, None, cohorts, "enlarged_heart", keys, seed=0)
    removed = flow.set_index("step")["removed_images"].to_dict()
    assert removed == {"catalog": 0, "view": 0, "quality tag": 2, "exclusions": 1, "exclusions: uncertain": 2, "class": 1,
                       "negatives: a finding uncertain": 1, "negatives: not affirmed normal": 2}
    assert dict(zip(cohort["image_id"], cohort["label"])) == {"a": 0, "b": 0, "l": 1}

    # The older rule, as a user can still choose it: everything without a 1 is a negative.
    old, old_flow = build_cohort(catalog, None, {**cohorts, "negatives": "unlabelled", "uncertain_exclusions": "keep"},
                                 "enlarged_heart", keys, seed=0)
    assert list(old_flow["step"]) == ["catalog", "view", "exclusions", "class"]
    assert dict(zip(old["image_id"], old["label"])) == {"a": 0, "b": 0, "c": 0, "d": 0, "e": 0, "f": 0, "g": 1, "j": 0,
                                                         "k": 1, "l": 1}


def test_a_source_that_never_affirms_normal_is_a_clear_error():
    catalog = random_catalog(50, 1, 0.0).assign(normal=pd.array([0] * 50, dtype="Int8"))
    with pytest.raises(CxrflowError, match=r"never affirms a normal study.*cohorts.negatives: unlabelled"):
        build_cohort(catalog, None, COHORTS, "enlarged_heart", KEYS, seed=1)
    cohort, _ = build_cohort(catalog, None, {**COHORTS, "negatives": "unlabelled"}, "enlarged_heart", KEYS, seed=1)
    assert (cohort["label"] == 0).sum() > 0


# --- VinDr-like: no sex, age or view ---------------------------------------------------------------------------------

def test_null_filters_switch_off_and_a_vindr_like_catalog_forms_a_cohort(root):
    catalog = random_catalog(400, 3, 0.0)  # sex, age and view all missing
    assert catalog[["sex", "age", "view"]].isna().all(axis=None)
    config = yaml.safe_load((root / "config" / "config.yaml").read_text(encoding="utf-8"))
    update_config(config, {"cohorts": {"filters": {"views": None, "sex": None, "age": None}}})
    schema_errors(config, root / "workflow" / "schemas" / "config.schema.yaml")  # null is allowed for each
    cohorts = {**COHORTS, "filters": config["cohorts"]["filters"], "balance": "undersample"}
    cohort, flow = build_cohort(catalog, None, cohorts, "enlarged_heart", KEYS, seed=1)
    assert not {"view", "sex", "age"} & set(flow["step"])
    assert (cohort["label"] == 1).sum() == (cohort["label"] == 0).sum() > 10
    patient_exclusive_split(cohort, SPLIT, 1, "enlarged_heart")  # and it splits
    # The old behaviour the issue met: an age range removes every image whose age is unknown.
    _, flow = build_cohort(catalog, None, {**cohorts, "filters": {"age": [0, 130]}}, "enlarged_heart", KEYS, seed=1)
    assert flow.set_index("step").loc["age", "images"] == 0


def test_the_schema_rejects_a_bad_negatives_rule(root):
    config = yaml.safe_load((root / "config" / "config.yaml").read_text(encoding="utf-8"))
    update_config(config, {"cohorts": {"negatives": "healthy"}})
    with pytest.raises(CxrflowError, match="cohorts.negatives"):
        schema_errors(config, root / "workflow" / "schemas" / "config.schema.yaml")


# --- splits: natural prevalence --------------------------------------------------------------------------------------

def natural_case(n=6000, seed=5):
    catalog = random_catalog(n, seed, 0.01)
    cohorts = {**COHORTS, "balance": "undersample"}
    pool, _ = build_cohort(catalog, None, cohorts, "enlarged_heart", KEYS, seed=2, with_pool=True)
    return pool


@pytest.mark.parametrize("folds", [None, 4])
def test_natural_prevalence_test_split_keeps_train_and_val_balanced(folds):
    pool = natural_case()
    prevalence = pool["label"].mean()
    assert 0.05 < prevalence < 0.35, "the pool is imbalanced, as real cohorts are"
    settings_ = {**SPLIT, "folds": folds}
    balanced = patient_exclusive_split(pool, settings_, 2, "eh")
    natural = patient_exclusive_split(pool, {**settings_, "test_prevalence": "natural"}, 2, "eh")
    assert set(balanced["image_id"]) == set(pool.loc[pool["selected"], "image_id"]), "balanced: the cohort proper only"
    # train and val are exactly the balanced ones; test is a superset of the balanced test.
    not_test = natural[natural["split"] != "test"].reset_index(drop=True)
    pd.testing.assert_frame_equal(not_test, balanced[balanced["split"] != "test"].reset_index(drop=True))
    assert set(balanced.loc[balanced["split"] == "test", "image_id"]) < set(natural.loc[natural["split"] == "test", "image_id"])
    assert (natural.groupby("patient_id")["split"].nunique() == 1).all(), "patient-exclusive"
    assert natural["image_id"].is_unique and set(natural["image_id"]) <= set(pool["image_id"])
    assert natural.merge(pool, on=["image_id", "patient_id", "label"]).shape[0] == len(natural)
    test = natural[natural["split"] == "test"]
    assert test["label"].mean() == pytest.approx(prevalence, abs=0.03), "the test split has the natural prevalence"
    share = test.groupby("label").size() / pool.groupby("label").size()
    assert share.between(0.2, 0.3).all(), share  # about split.test of each class's eligible images
    assert balanced[balanced["split"] != "test"].groupby("split")["label"].mean().between(0.4, 0.6).all()
    if folds:
        assert natural.loc[natural["split"] == "test", "fold"].isna().all()
        assert natural.loc[natural["split"] != "test", "fold"].notna().all()


def test_natural_prevalence_through_the_pipeline_functions(tmp_path):
    catalog = random_catalog(3000, 8, 0.01)
    catalog.to_parquet(tmp_path / "catalog.parquet", index=False)
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": {k: {} for k in KEYS}}), encoding="utf-8")
    cohorts = {**COHORTS, "balance": "undersample"}
    run_cohort(tmp_path / "catalog.parquet", None, keys_file, cohorts, "enlarged_heart", 3, tmp_path / "c.parquet",
               tmp_path / "flow.csv")
    written = pd.read_parquet(tmp_path / "c.parquet")
    assert list(written.columns) == ["image_id", "patient_id", "label", "selected"]
    assert written["selected"].sum() < len(written)
    run_split(tmp_path / "c.parquet", {**SPLIT, "test_prevalence": "natural"}, 3, "enlarged_heart", tmp_path / "m.csv")
    manifest = pd.read_csv(tmp_path / "m.csv")
    test = manifest[manifest["split"] == "test"]
    assert test["label"].mean() == pytest.approx(written["label"].mean(), abs=0.05)
    assert manifest.loc[manifest["split"] != "test", "label"].mean() == pytest.approx(0.5, abs=0.1)


# --- splits: duplicate images ---------------------------------------------------------------------------------------

def plant_duplicates(cohort: pd.DataFrame, n_groups: int, seed: int) -> pd.DataFrame:
    """Duplicate groups of 2-3 images of different patients, with labels that may disagree (re-exported copies)."""
    rng = np.random.default_rng(seed)
    patients = cohort["patient_id"].drop_duplicates().to_numpy()
    rows = []
    for g in range(n_groups):
        chosen = rng.choice(patients, size=int(rng.integers(2, 4)), replace=False)
        for patient in chosen:
            image = rng.choice(cohort.loc[cohort["patient_id"] == patient, "image_id"].to_numpy())
            rows.append({"image_id": image, "group": f"g{g}"})
    return pd.DataFrame(rows).drop_duplicates("image_id")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n_groups=st.integers(1, 60), folds=st.sampled_from([None, 3]),
       prevalence=st.sampled_from(["balanced", "natural"]))
def test_duplicates_never_land_in_two_splits(seed, n_groups, folds, prevalence):
    pool = natural_case(1500, seed)
    duplicates = plant_duplicates(pool, n_groups, seed)
    manifest = patient_exclusive_split(pool, {**SPLIT, "folds": folds, "test_prevalence": prevalence}, seed, "eh", duplicates)
    placed = manifest.merge(duplicates, on="image_id")
    group = placed["split"] + ("/" + placed["fold"].astype("string").fillna("-") if folds else "")
    assert (group.groupby(placed["group"]).nunique() == 1).all(), "a duplicate group in two splits (or folds)"
    whole_patients = manifest["split"] + ("/" + manifest["fold"].astype("string").fillna("-") if folds else "")
    assert (whole_patients.groupby(manifest["patient_id"]).nunique() == 1).all(), "still patient-exclusive"


def test_the_same_image_under_other_ids_and_patients_leaks_without_the_table_and_not_with_it():
    pool = natural_case(3000, 11)
    cohort = pool[pool["selected"]].drop(columns="selected")
    duplicates = plant_duplicates(cohort, 150, 1)
    without = patient_exclusive_split(cohort, SPLIT, 1, "eh").merge(duplicates, on="image_id")
    assert (without.groupby("group")["split"].nunique() > 1).any(), "the planted copies do cross splits without the table"
    grouped = patient_exclusive_split(cohort, SPLIT, 1, "eh", duplicates).merge(duplicates, on="image_id")
    assert (grouped.groupby("group")["split"].nunique() == 1).all()
    # No duplicates table: the same manifest as before this feature.
    pd.testing.assert_frame_equal(patient_exclusive_split(cohort, SPLIT, 1, "eh", pd.DataFrame(columns=["image_id", "group"])),
                                  patient_exclusive_split(cohort, SPLIT, 1, "eh"))


def test_drop_keeps_the_first_image_of_each_duplicate_group_with_a_flow_step():
    catalog = random_catalog(600, 4, 0.0)
    duplicates = pd.DataFrame({"image_id": ["i00010", "i00003", "i00007", "i00100", "i00200", "nowhere"],
                               "group": ["x", "x", "x", "y", "y", "z"]})
    cohort, flow = build_cohort(catalog, None, COHORTS, "enlarged_heart", KEYS, seed=1, duplicates=duplicates)
    step = flow.set_index("step").loc["duplicates"]
    assert step["removed_images"] == 3 and "first by image_id is kept" in step["reason"]
    kept, _ = build_cohort(catalog[~catalog["image_id"].isin(["i00007", "i00010", "i00200"])], None, COHORTS,
                           "enlarged_heart", KEYS, seed=1)
    pd.testing.assert_frame_equal(cohort, kept)


# --- the real tables --------------------------------------------------------------------------------------------------

def non_normal_share(cohort: pd.DataFrame, is_normal: pd.Series) -> tuple[int, int, float]:
    negatives = cohort.loc[cohort["label"] == 0, "image_id"]
    normal = negatives.map(is_normal)
    assert normal.notna().all(), "every negative is in the source table"
    bad = int((~normal.astype(bool)).sum())
    return len(negatives), bad, bad / max(len(negatives), 1)


def before_after(catalog, cohorts, pathologies, keys, seed, is_normal, label):
    before = build_cohorts(catalog, None, {**cohorts, "negatives": "unlabelled", "uncertain_exclusions": "keep"},
                           pathologies, keys, seed)
    after = build_cohorts(catalog, None, cohorts, pathologies, keys, seed)
    rows = []
    for p in pathologies:
        (old, _), (new, flow) = before[p], after[p]
        n_old, bad_old, share_old = non_normal_share(old, is_normal)
        n_new, bad_new, share_new = non_normal_share(new, is_normal)
        rows.append({"cohort": p, "images before": len(old), "negatives before": n_old, "non-normal before": bad_old,
                     "share before": round(share_old, 4), "images after": len(new), "negatives after": n_new,
                     "non-normal after": bad_new, "share after": round(share_new, 4)})
        steps = flow[flow["step"].isin(["quality tag", "exclusions: uncertain", "class", "negatives: a finding uncertain",
                                         "negatives: not affirmed normal", "balance"])]
        print(f"\n{label} {p}: flow rows of the negative rules\n" + steps.to_string(index=False))
        assert_flow_adds_up(flow)
        assert bad_new == 0, f"{p}: {bad_new} negatives are not normal studies in the source table"
        assert n_new > 0
    table = pd.DataFrame(rows)
    print(f"\n{label}: cohort sizes and non-normal negatives, before (negatives: unlabelled) and after (normal)\n"
          + table.to_string(index=False))
    return table


def test_nih_cardiomegaly_negatives_are_no_finding_studies(shared_data, root, keys_file):
    table_path = shared_data / "nih" / "Data_Entry_2017_v2020.csv.gz"
    source = {"format": "nih", "annotations": str(table_path), "label_map": str(root / "config/labels/nih.yaml"),
              "check_files": False}
    catalog = build_catalog(source, keys_file, base="/").catalog
    native = pd.read_csv(table_path, usecols=["Image Index", "Finding Labels"])
    is_normal = pd.Series((native["Finding Labels"] == "No Finding").to_numpy(), index=native["Image Index"].to_numpy())
    cohorts = {"filters": {"views": ["PA", "AP"], "sex": "F", "age": [18, 120]}, "balance": "undersample",
               "exclusions": ["emphysema", "fibrosis", "pneumonia", "infiltration", "nodule_mass", "consolidation"],
               "pathologies": {"cardiomegaly": {"positive": ["enlarged_heart"]}}}
    # NIH labels all 14 findings on every image, so "no finding is 1" already meant "No Finding" here; the test
    # guards that the normal rule keeps it so (and that the cohort keeps its size).
    table = before_after(catalog, cohorts, ["cardiomegaly"], load_keys(keys_file), 42, is_normal, "NIH ChestX-ray14")
    assert table.loc[0, "images after"] > 1000


def test_padchest_negatives_are_normal_studies(shared_data, root, keys_file):
    config = yaml.safe_load((root / "config" / "config.yaml").read_text(encoding="utf-8"))
    update_config(config, yaml.safe_load((root / "config" / "padchest.yaml").read_text(encoding="utf-8")))
    table_path = shared_data / "padchest" / Path(config["source"]["annotations"]).name
    source = {**config["source"], "annotations": str(table_path), "label_map": str(root / config["source"]["label_map"])}
    catalog = build_catalog(source, keys_file, base="/").catalog
    native = pd.read_csv(table_path, usecols=["ImageID", "Labels"])

    def only_normal(labels) -> bool:
        if not isinstance(labels, str):
            return False
        parsed = ast.literal_eval(labels)
        return isinstance(parsed, list) and {str(x).strip() for x in parsed} == {"normal"}

    is_normal = pd.Series(native["Labels"].map(only_normal).to_numpy(), index=native["ImageID"].to_numpy())
    pathologies = enabled_pathologies(config["cohorts"])
    assert len(pathologies) == 6
    table = before_after(catalog, config["cohorts"], pathologies, load_keys(keys_file), config["seed"], is_normal, "PadChest")
    assert (table["share before"] > 0.05).all(), "the old rule let non-normal studies in ('unchanged', 'exclude', ...)"


# --- the workflow: which job reads the duplicate table ------------------------------------------------------------------

@pytest.mark.e2e
def test_the_duplicate_table_is_an_input_of_the_split_or_the_cohort_by_config(tmp_path):
    import subprocess
    import sys

    from conftest import copy_repo

    work = copy_repo(tmp_path / "wf")
    snakemake = str(Path(sys.executable).parent / "snakemake")

    def inputs(overlay: dict) -> dict:
        (work / "config" / "overlay.yaml").write_text(yaml.safe_dump(overlay), encoding="utf-8")
        result = subprocess.run([snakemake, "-n", "results/splits/enlarged_heart.csv", "--cores", "1", "--configfile",
                                 "config/overlay.yaml"], cwd=work, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        lines = result.stdout.splitlines()
        return {line.split()[1].rstrip(":"): lines[i + 1] for i, line in enumerate(lines)
                if line.startswith("rule ") and line.split()[1].rstrip(":") in ("cohort", "split")}

    table = "results/quality/duplicates.parquet"
    grouped = inputs({"split": {"duplicates": "group"}})
    assert table in grouped["split"] and table not in grouped["cohort"]
    dropped = inputs({"split": {"duplicates": "drop"}})
    assert table in dropped["cohort"] and table not in dropped["split"]
    metadata_only = inputs({"source": {"check_files": False}, "cohorts": {"filters": {"require_qc_pass": False}}})
    assert table not in metadata_only["split"] and table not in metadata_only["cohort"]


def test_vindr_kaggle_table_alone_forms_a_cohort_with_the_filters_off(shared_data, root, keys_file):
    config = yaml.safe_load((root / "config" / "config.yaml").read_text(encoding="utf-8"))
    update_config(config, yaml.safe_load((root / "config" / "vindr.yaml").read_text(encoding="utf-8")))
    assert all(config["cohorts"]["filters"][k] is None for k in ("views", "sex", "age"))
    source = {**config["source"], "annotations": str(shared_data / "vindr" / "vinbigdata-train.csv.gz"),
              "label_map": str(root / config["source"]["label_map"])}
    catalog = build_catalog(source, keys_file, base="/").catalog
    assert catalog[["sex", "age", "view"]].isna().all(axis=None), "the Kaggle table has no sex, age or view"
    cohort, flow = build_cohort(catalog, None, config["cohorts"], "enlarged_heart", load_keys(keys_file), config["seed"])
    print("\nVinDr-CXR (Kaggle table) enlarged_heart flow:\n" + flow.to_string(index=False))
    assert not {"view", "sex", "age"} & set(flow["step"])
    merged = cohort.merge(catalog, on=["image_id", "patient_id"], validate="one_to_one")
    assert merged.loc[merged["label"] == 0, "normal"].fillna(0).eq(1).all()
    assert (cohort["label"] == 1).sum() == (cohort["label"] == 0).sum() > 1000
    manifest = patient_exclusive_split(cohort, config["split"], config["seed"], "enlarged_heart")
    assert set(manifest["split"]) == {"train", "val", "test"}


def test_run_split_reads_the_duplicate_table(tmp_path):
    pool = natural_case(1500, 3)
    pool.to_parquet(tmp_path / "c.parquet", index=False)
    duplicates = plant_duplicates(pool[pool["selected"]], 40, 3)
    duplicates.to_parquet(tmp_path / "d.parquet", index=False)
    run_split(tmp_path / "c.parquet", SPLIT, 3, "eh", tmp_path / "m.csv", duplicates_path=tmp_path / "d.parquet")
    placed = pd.read_csv(tmp_path / "m.csv").merge(duplicates, on="image_id")
    assert len(placed) == len(duplicates) and (placed.groupby("group")["split"].nunique() == 1).all()
