"""Multi-label mode (cxrflow.multilabel): one split shared by every cohort, the training table, the masked loss,
and one network trained on the union of the cohorts."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from cxrflow.errors import CxrflowError
from cxrflow.multilabel import (AUX_PREFIX, build_multilabel_model, masked_bce, output_columns, output_weights,
                                shared_split, split_conflicts, training_table)
from cxrflow.splits import patient_exclusive_split

SPLIT = {"val": 0.15, "test": 0.25, "min_patients_per_class": 1}


def overlapping_cohorts(n_cohorts=9, n_patients=600, seed=0) -> dict[str, pd.DataFrame]:
    """Cohorts as the pipeline makes them: each its own positives (some patients positive for several findings)
    against a draw from one shared pool of normal patients, 1-4 images per patient, a few rare findings."""
    rng = np.random.default_rng(seed)
    images = {p: [f"p{p:04d}_{i}" for i in range(rng.integers(1, 5))] for p in range(n_patients)}
    normal = rng.random(n_patients) < 0.5
    cohorts = {}
    for c in range(n_cohorts):
        rate = 0.03 if c % 3 == 0 else 0.15  # rare cohorts: about 9 positive patients
        positive = np.flatnonzero(~normal & (rng.random(n_patients) < rate))
        negative = rng.choice(np.flatnonzero(normal), size=min(normal.sum(), 3 * len(positive) + 10), replace=False)
        rows = [(img, f"P{p:04d}", 1) for p in positive for img in images[p]]
        rows += [(img, f"P{p:04d}", 0) for p in negative for img in images[p]]
        cohorts[f"finding_{c}"] = pd.DataFrame(rows, columns=["image_id", "patient_id", "label"])
    return cohorts


def leaked_patients(manifests) -> set:
    """Patients in the test split of any cohort that are in train or val of any cohort."""
    test = set().union(*(set(m.loc[m["split"] == "test", "patient_id"]) for m in manifests.values()))
    fitted = set().union(*(set(m.loc[m["split"] != "test", "patient_id"]) for m in manifests.values()))
    return test & fitted


def test_shared_split_leaks_no_patient_across_all_cohorts_at_once():
    cohorts = overlapping_cohorts()
    independent = {p: patient_exclusive_split(c, SPLIT, 42, p) for p, c in cohorts.items()}
    shared = shared_split(cohorts, SPLIT, 42)
    # Nine independent splits put shared normal patients in test for one cohort and train for another.
    print(f"\npatients in test of one cohort and train/val of another: independent splits "
          f"{len(leaked_patients(independent))}, shared split {len(leaked_patients(shared))}")
    assert len(leaked_patients(independent)) > 20
    assert leaked_patients(shared) == set()
    assert split_conflicts(shared).empty and not split_conflicts(independent).empty
    for pathology, manifest in shared.items():
        cohort = cohorts[pathology]
        assert sorted(manifest["image_id"]) == sorted(cohort["image_id"])  # every image once, none added
        # Every group holds both classes; the test split keeps about its share of positives and of negatives.
        counts = manifest.groupby(["split", "label"]).size().unstack(fill_value=0)
        assert (counts.reindex(index=["train", "val", "test"], columns=[0, 1], fill_value=0) > 0).all().all(), pathology
        share = counts[1] / counts[1].sum()
        if cohort["label"].sum() > 100:
            assert 0.12 <= share["test"] <= 0.40, (pathology, share.to_dict())
    # Seeded: the same call gives the same manifests; another seed another split.
    again = shared_split(cohorts, SPLIT, 42)
    assert all(again[p].equals(shared[p]) for p in shared)
    other = shared_split(cohorts, SPLIT, 7)
    assert not all(other[p]["split"].equals(shared[p]["split"]) for p in shared)


def test_shared_split_keeps_duplicate_linked_patients_together_and_works_with_folds():
    cohorts = overlapping_cohorts(n_cohorts=4, seed=1)
    first, second = cohorts["finding_1"], cohorts["finding_2"]
    a = first.loc[first["label"] == 1].iloc[0]
    b = second.loc[~second["patient_id"].isin(first["patient_id"])].iloc[0]
    duplicates = pd.DataFrame({"image_id": [a["image_id"], b["image_id"]], "group": ["g1", "g1"]})
    for settings in (SPLIT, {"test": 0.25, "folds": 3}):
        manifests = shared_split(cohorts, settings, 3, duplicates)
        assert leaked_patients(manifests) == set()
        split_of = pd.concat(manifests.values()).drop_duplicates("image_id").set_index("image_id")["split"]
        assert split_of[a["image_id"]] == split_of[b["image_id"]]
        if "folds" in settings:
            fold_of = pd.concat(manifests.values()).groupby("patient_id")["fold"].nunique(dropna=False)
            assert (fold_of == 1).all()  # a patient is in one fold in every cohort


def test_shared_split_moves_units_when_other_cohorts_placed_all_of_a_class():
    """Small cohorts whose negatives all come from one pool that earlier cohorts already placed: without a move,
    some group of the later cohort would have no negative patient (the tiny workflow config hit this)."""
    needed = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        pool = [f"N{i:02d}" for i in range(40)]
        cohorts = {}
        for c in range(5):
            positives = [f"P{c}_{i}" for i in range(8)]
            negatives = list(rng.choice(pool, size=30 if c == 0 else 4, replace=False))
            cohorts[f"c{c}"] = pd.DataFrame({"image_id": [f"{p}_img" for p in positives + negatives],
                                             "patient_id": positives + negatives, "label": [1] * 8 + [0] * len(negatives)})
        stats = {}
        manifests = shared_split(cohorts, SPLIT, seed, stats=stats)
        needed += stats["moved_units"] > 0
        assert leaked_patients(manifests) == set()
        for pathology, manifest in manifests.items():
            per_group = manifest.groupby(["split", "label"])["patient_id"].nunique()
            assert len(per_group) == 6 and (per_group >= 1).all(), (seed, pathology, per_group.to_dict())
    print(f"\n{needed} of 12 seeds needed units moved")
    assert needed > 0


def pooled_cohorts(n_cohorts=6, n_patients=900, seed=0) -> dict[str, pd.DataFrame]:
    """Cohorts before balancing, as build_cohort(with_pool=True) gives them: each its positives against the whole
    shared normal pool, and `selected` marking the balanced cohort (all positives, as many negatives drawn)."""
    rng = np.random.default_rng(seed)
    images = {p: [f"p{p:04d}_{i}" for i in range(rng.integers(1, 4))] for p in range(n_patients)}
    normal = rng.random(n_patients) < 0.6
    cohorts = {}
    for c in range(n_cohorts):
        positive = np.flatnonzero(~normal & (rng.random(n_patients) < 0.15))
        rows = [(img, f"P{p:04d}", 1) for p in positive for img in images[p]]
        rows += [(img, f"P{p:04d}", 0) for p in np.flatnonzero(normal) for img in images[p]]
        pool = pd.DataFrame(rows, columns=["image_id", "patient_id", "label"])
        keep = rng.choice(pool.index[pool["label"] == 0], size=int(pool["label"].sum()), replace=False)
        cohorts[f"finding_{c}"] = pool.assign(selected=(pool["label"] == 1) | pool.index.isin(keep))
    return cohorts


def test_shared_split_with_a_natural_test_prevalence_leaks_nothing_and_keeps_train_and_val():
    cohorts = pooled_cohorts()
    balanced = shared_split(cohorts, SPLIT, 42)
    natural = shared_split(cohorts, {**SPLIT, "test_prevalence": "natural"}, 42)
    assert leaked_patients(natural) == set()
    fitted = set().union(*(set(m.loc[m["split"] != "test", "image_id"]) for m in natural.values()))
    in_any_cohort_proper = set().union(*(set(c.loc[c["selected"], "patient_id"]) for c in cohorts.values()))
    test_patients = set().union(*(set(m.loc[m["split"] == "test", "patient_id"]) for m in balanced.values()))
    added_total = 0
    for pathology, manifest in natural.items():
        cohort = cohorts[pathology]
        # Train and val are exactly the balanced shared split's; only test images are added.
        for frame in (manifest, balanced[pathology]):
            assert not frame["image_id"].duplicated().any()
        assert manifest[manifest["split"] != "test"].reset_index(drop=True).equals(
            balanced[pathology][balanced[pathology]["split"] != "test"].reset_index(drop=True))
        added = manifest[~manifest["image_id"].isin(balanced[pathology]["image_id"])]
        assert (added["split"] == "test").all() and not set(added["image_id"]) & fitted
        selected = cohort.set_index("image_id")["selected"]
        assert not selected[added["image_id"]].any()  # only images balancing left out are added
        # Each added image's patient is a shared test patient or in no cohort proper at all.
        assert set(added["patient_id"]) <= test_patients | (set(added["patient_id"]) - in_any_cohort_proper)
        assert not (set(added["patient_id"]) & in_any_cohort_proper) - test_patients
        added_total += len(added)
        # The test split now has about the pool's prevalence, far from the balanced 1:1.
        pool_prevalence = cohort["label"].mean()
        test = manifest[manifest["split"] == "test"]
        assert abs(test["label"].mean() - pool_prevalence) < 0.12, (pathology, test["label"].mean(), pool_prevalence)
        assert test["label"].mean() < balanced[pathology].query("split == 'test'")["label"].mean() - 0.1, pathology
    assert added_total > 100
    assert all(natural[p].equals(shared_split(cohorts, {**SPLIT, "test_prevalence": "natural"}, 42)[p]) for p in natural)


def test_shared_split_refuses_conflicting_patient_ids():
    cohorts = overlapping_cohorts(n_cohorts=2)
    broken = dict(cohorts)
    row = cohorts["finding_0"].iloc[[0]].assign(patient_id="someone else")
    broken["finding_1"] = pd.concat([cohorts["finding_1"], row], ignore_index=True)
    with pytest.raises(CxrflowError, match="different patient ids"):
        shared_split(broken, SPLIT, 0)


def test_training_table_is_the_union_with_missing_labels_outside_a_cohort():
    manifests = {
        "heart": pd.DataFrame({"image_id": ["a", "b", "c", "t"], "patient_id": ["1", "2", "3", "9"],
                               "label": [1, 0, 0, 1], "split": ["train", "train", "val", "test"]}),
        "aorta": pd.DataFrame({"image_id": ["b", "d", "e"], "patient_id": ["2", "4", "5"], "label": [0, 1, 1],
                               "split": ["train", "train", "train"]}),
    }
    catalog = pd.DataFrame({"image_id": ["a", "b", "c", "d", "e", "t", "x", "y", "z"],
                            "patient_id": ["1", "2", "3", "4", "5", "9", "6", "9", "3"],
                            "effusion": pd.array([1, 0, None, 0, 1, 1, 1, 0, 1], dtype="Int8")})
    table = training_table(manifests, catalog, ["effusion"])
    assert list(table["image_id"]) == ["a", "b", "c", "d", "e"]  # the test image never trains
    assert output_columns(table) == ["heart", "aorta", AUX_PREFIX + "effusion"]
    expected = np.array([[1, np.nan, 1], [0, 0, 0], [0, np.nan, np.nan], [np.nan, 1, 0], [np.nan, 1, 1]])
    np.testing.assert_array_equal(table[output_columns(table)].to_numpy(), expected)
    assert list(table["split"]) == ["train", "train", "val", "train", "train"]
    # Extra catalog images for the auxiliary outputs: x (a new patient) joins train; y belongs to the test patient
    # 9 and z to the val patient 3, so they stay out.
    wider = training_table(manifests, catalog, ["effusion"], extra_images=catalog["image_id"])
    assert list(wider["image_id"]) == ["a", "b", "c", "d", "e", "x"]
    assert wider.set_index("image_id").loc["x", "split"] == "train"
    assert np.isnan(wider.set_index("image_id").loc["x", "heart"])
    # A duplicate of the test image under another patient stays out too.
    dup = pd.DataFrame({"image_id": ["t", "x"], "group": ["g", "g"]})
    assert "x" not in set(training_table(manifests, catalog, ["effusion"], catalog["image_id"], dup)["image_id"])
    split_apart = {**manifests, "aorta": manifests["aorta"].assign(split=["val", "train", "train"])}
    with pytest.raises(CxrflowError, match="shared split"):
        training_table(split_apart)
    with pytest.raises(CxrflowError, match="not catalog label columns"):
        training_table(manifests, catalog, ["nonsense"])


def test_output_weights_balance_each_output_over_its_defined_labels():
    table = pd.DataFrame({"image_id": list("abcde"), "patient_id": list("12345"), "split": "train",
                          "heart": [1, 0, 0, 0, np.nan], "aorta": [np.nan, np.nan, 1, 0, 1]})
    weights = output_weights(table, ["heart", "aorta"], "class")
    # heart: 1 positive, 3 negatives -> the positive 2.0, each negative 2/3; aorta: 2 positives, 1 negative.
    np.testing.assert_allclose(weights[:, 0], [2.0, 2 / 3, 2 / 3, 2 / 3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(weights[:, 1], [0.0, 0.0, 0.75, 1.5, 0.75], rtol=1e-6)


def test_masked_bce_against_a_hand_computation():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0], [-2.0, 0.0]])
    targets = torch.tensor([[1.0, float("nan")], [0.0, 1.0], [float("nan"), 0.0]])
    weights = torch.tensor([[2.0, 0.0], [0.5, 1.5], [0.0, 1.0]])

    def bce(z, y):  # -[y log s(z) + (1 - y) log(1 - s(z))]
        s = 1 / (1 + math.exp(-z))
        return -(y * math.log(s) + (1 - y) * math.log(1 - s))

    by_hand = (2.0 * bce(2.0, 1) + 0.5 * bce(0.5, 0) + 1.5 * bce(3.0, 1) + 1.0 * bce(0.0, 0)) / 3
    assert masked_bce(logits, targets, weights).item() == pytest.approx(by_hand, rel=1e-6)
    # An undefined label contributes nothing, whatever its weight and logit, and its gradient is zero.
    noisy = logits.clone().requires_grad_(True)
    masked_bce(noisy, targets, weights.masked_fill(torch.isnan(targets), 9.0)).backward()
    assert noisy.grad[0, 1] == 0 and noisy.grad[2, 0] == 0 and noisy.grad[1, 1] != 0
    # One output, every label defined: the binary models' weighted BCE.
    z, y, w = torch.randn(8, 1), (torch.rand(8, 1) > 0.5).float(), torch.rand(8, 1)
    reference = torch.nn.functional.binary_cross_entropy_with_logits(z, y, weight=w)
    assert masked_bce(z, y, w).item() == pytest.approx(reference.item(), rel=1e-6)
    # Micro-batches weighted by their share of the batch (cxrflow.train.forward_backward) sum to the whole batch.
    z, y, w = torch.randn(8, 3), torch.where(torch.rand(8, 3) > 0.3, (torch.rand(8, 3) > 0.5).float(), torch.nan), torch.rand(8, 3)
    halves = sum(masked_bce(z[i : i + 2], y[i : i + 2], w[i : i + 2]) * 2 / 8 for i in range(0, 8, 2))
    assert halves.item() == pytest.approx(masked_bce(z, y, w).item(), rel=1e-6)


@pytest.mark.parametrize("spec", [{"library": "timm", "name": "resnet10t"}, {"library": "timm", "name": "efficientnet_b0"}])
def test_multilabel_model_has_one_logit_per_output(spec):
    model = build_multilabel_model(spec, 5).eval()
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 5)


def test_train_multilabel_on_three_synthetic_cohorts_resumes_and_evaluates(tiny_pipeline, tmp_path):
    """One network for three cohorts of the synthetic archive: the shared split, the table, two epochs; an
    interrupted run resumed from its checkpoint ends where an uninterrupted one does; per-pathology predictions go
    through the binary models' metrics code."""
    import yaml

    from cxrflow.cohorts import build_cohort
    from cxrflow.evaluate import evaluate_predictions
    from cxrflow.labels import load_keys
    from cxrflow.multilabel import load_for_pathology, load_multilabel, pathology_predictions, train_multilabel
    from cxrflow.tensors import TensorCache

    from conftest import ROOT

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["cohorts"]["filters"]["require_qc_pass"] = False
    keys = load_keys(ROOT / "config" / "labels" / "keys.yaml")
    chosen = ["aorta_unfolded", "enlarged_heart", "scoliosis"]
    cohorts = {p: build_cohort(tiny_pipeline["catalog"], None, config["cohorts"], p, keys, seed=42)[0] for p in chosen}
    manifests = shared_split(cohorts, config["split"], 42)
    assert leaked_patients(manifests) == set()
    table = training_table(manifests, tiny_pipeline["catalog"], ["normal"])
    cache = TensorCache.open(tiny_pipeline["index"], tiny_pipeline["shards"])
    cfg = {**tiny_pipeline["config"], "train": {**tiny_pipeline["config"]["train"], "epochs": 2}}
    full = train_multilabel(table, cache, cfg, tmp_path / "full", seed=1, log=lambda *_: None)
    assert full.metadata["outputs"] == chosen + ["aux:normal"] and full.metadata["epochs_run"] == 2
    assert full.metadata["training_images"] == int((table["split"] == "train").sum())
    one = {**cfg, "train": {**cfg["train"], "epochs": 1}}
    train_multilabel(table, cache, one, tmp_path / "resumed", seed=1, log=lambda *_: None)
    resumed = train_multilabel(table, cache, cfg, tmp_path / "resumed", seed=1, log=lambda *_: None)
    assert resumed.history["train_loss"].tolist() == full.history["train_loss"].tolist()
    model = load_multilabel(tmp_path / "full" / "best.pt", full.metadata["architecture"], 4)
    probs = {}
    for k, pathology in enumerate(chosen):
        predictions = pathology_predictions(model, cache, manifests[pathology], k, 4, zscore=False)
        metrics = evaluate_predictions(predictions, bootstrap=20, seed=0)
        assert metrics["n_test"] == int((manifests[pathology]["split"] == "test").sum()) > 0
        assert np.isfinite(metrics["auc"]) and np.isfinite(metrics["auc_ci95"]).all()
        probs[pathology] = predictions.set_index("image_id")["prob"]
    # Each pathology reads its own output: on the images two cohorts share, the probabilities differ.
    common = probs["enlarged_heart"].index.intersection(probs["scoliosis"].index)
    assert len(common) > 0 and not np.allclose(probs["enlarged_heart"][common], probs["scoliosis"][common])
    with pytest.raises(CxrflowError, match="with 3 outputs"):
        load_multilabel(tmp_path / "full" / "best.pt", full.metadata["architecture"], 3)
    # Evaluation's loader: a pathology's output as a one-logit model.
    single = load_for_pathology(tmp_path / "full" / "best.pt", full.metadata, "scoliosis")
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(single(x), model(x)[:, 2:3])
    with pytest.raises(CxrflowError, match="no output 'pneumonia'"):
        load_for_pathology(tmp_path / "full" / "best.pt", full.metadata, "pneumonia")


def test_benchmark_quick_mode_prints_both_tables(tmp_path):
    """benchmarks/multilabel.py synthetic --quick: both modes on every cohort, the side-by-side table and the cost."""
    from conftest import run_benchmark

    out = run_benchmark("multilabel", "synthetic", "--quick", "--json", str(tmp_path / "r.json"), cwd=tmp_path).stdout
    assert "| pathology | test images (pos) | binary AUC (95% CI) | multilabel AUC (95% CI) |" in out
    figures = __import__("json").loads((tmp_path / "r.json").read_text())
    assert len(figures["rows"]) == 9 and {r["pathology"] for r in figures["rows"]} >= {"enlarged_heart", "scoliosis"}
    cost = figures["cost"]
    # One network reads the union of the cohorts' train images once per epoch: fewer than the nine together.
    assert 0 < cost["multilabel"]["image_epochs"] < cost["binary"]["image_epochs"]
