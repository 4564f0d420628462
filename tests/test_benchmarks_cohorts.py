"""The cohorts benchmark keeps working: its --quick mode builds the nine cohorts and their splits from a synthetic
catalog, through the API and as the workflow's jobs do (no timing asserts)."""

import json

from conftest import run_benchmark


def test_cohorts_benchmark_quick_mode_runs(tmp_path):
    result = run_benchmark("cohorts", "--quick", "--json", str(tmp_path / "figures.json"), cwd=tmp_path)
    assert "cohort flows (images after each filter):" in result.stdout and "goal <= 30 s and <= 4 GiB" in result.stdout
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert figures["rows"] == 20_000 and len(figures["cohorts"]) == 9
    for name, row in figures["cohorts"].items():
        assert row["images"] > 0 and row["positives"] * 2 == row["images"], name  # balanced by undersampling
        assert row["job_manifest_identical_to_api"], f"{name}: the job path and the API path disagree"
    assert figures["baseline_same_cohort_size"], "the baseline builds the same cohort size as the new code"
    for phase in ("synthesize", "api", "jobs", "unbalanced_split", "baseline_build", "baseline_split"):
        assert figures["phases"][phase]["cpu_s"] >= 0 and figures["phases"][phase]["peak_rss_mb"] > 0, phase
    assert figures["speedup_one_cohort_cpu"] > 0
