"""The labeller benchmark keeps working: its --quick mode scores 60 dev notes per language against the labeller of
git HEAD (no floors here: tests/test_labels_corpus.py holds them)."""

import json

from conftest import run_benchmark


def test_labels_benchmark_quick_mode_runs(tmp_path):
    result = run_benchmark("labels", "--quick", "--json", str(tmp_path / "figures.json"), cwd=tmp_path)
    assert "micro" in result.stdout and "F1 before" in result.stdout
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert set(figures) == {"ru", "en"}
    for language, parts in figures.items():
        dev = parts["dev"]
        assert dev["notes"] == 60, language
        for name in ("micro", "uncertain_micro", "normal"):
            assert 0 <= dev[name]["f"] <= 1 and 0 <= dev[name]["p"] <= 1 and 0 <= dev[name]["r"] <= 1, (language, name)
        assert 0 <= dev["before"]["micro"]["f"] <= 1
        assert dev["positives_on_clean"] >= 0 and dev["seconds"] > 0
