"""Learning controls on the synthetic path (no ../shared needed): the real training and evaluation code learns the
labels, and nothing else. benchmarks/learning_control.py trains and evaluates one cohort twice, on the true and on
permuted training labels (`train.permute_labels`); its docstring justifies the bound."""

import json

from conftest import run_benchmark


def test_true_labels_are_learnt_and_permuted_labels_give_chance(tmp_path):
    result = run_benchmark("learning_control", "--json", str(tmp_path / "control.json"), "--figure",
                           str(tmp_path / "control.png"), cwd=tmp_path)
    figures = json.loads((tmp_path / "control.json").read_text())
    true, permuted = figures["true"], figures["permuted"]
    # The test split is large enough for the bound to separate chance from learning.
    assert figures["null_sd"] < 0.1, result.stdout
    assert true["auc"] >= 0.9 and not true["permuted_labels"], result.stdout
    assert abs(permuted["auc"] - 0.5) <= figures["bound"] and permuted["permuted_labels"], result.stdout
    assert true["auc_ci95"][0] > 0.5  # the true model's interval lies above chance
    assert true["config_hash"] != permuted["config_hash"]  # the control is a different configuration, recorded as such
    # The synthetic metadata (age, follow-up index) carry no planted sign: only the true-label network beats them.
    assert true["network_beats_baseline"] and not permuted["network_beats_baseline"]
