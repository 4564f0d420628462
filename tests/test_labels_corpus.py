"""The labeller on the hand-written corpora of tests/data/labels/ (Russian and English, written independently of the
vocabularies; see the *_guidelines.md files there), over every note, and over the held-out part alone.

The held-out part is the batch written in session 5 by an author who read neither the vocabularies nor the
labeller, and was measured once, after the labeller's last change (the earlier held-out part had been examined
while fixing errors, and is now `dev`). The floors sit a little under what the labeller reached
(benchmarks/labels.py prints the tables, dev and heldout apart, with the figures of the labeller before):

| corpus | notes (held out) | micro F1 positives, all (held out) | micro F1 uncertain | F1 normal | positives on normal / fully negated notes |
| --- | --- | --- | --- | --- | --- |
| ru | 961 (270) | 0.996 (0.990; before 0.982) | 0.991 | 0.994 | 1, in the held-out part (before: 5) |
| en | 579 (206) | 0.990 (0.974; before 0.940) | 0.986 | 0.997 | 0 (before: 4) |
"""

import importlib.util
from pathlib import Path

import pytest

from cxrflow.labels import label_texts, load_keys, load_vocabulary

ROOT = Path(__file__).resolve().parents[1]
KEYS = load_keys(ROOT / "config/labels/keys.yaml")
_spec = importlib.util.spec_from_file_location("benchmark_labels", ROOT / "benchmarks" / "labels.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

FLOORS = {
    # language: (micro F1 positives, micro F1 uncertain, F1 normal, most positives + uncertain on clean notes)
    "ru": (0.99, 0.98, 0.985, 1),
    "en": (0.985, 0.975, 0.99, 0),
}
HELDOUT_FLOORS = {"ru": 0.98, "en": 0.965}  # micro F1 of the positives on the held-out part alone (goal: 0.97)


@pytest.fixture(scope="module", params=sorted(FLOORS))
def measured(request):
    language = request.param
    corpus = bench.read_corpus(language)
    vocab = load_vocabulary(ROOT / "config/labels" / f"{language}.yaml", KEYS)
    predicted = label_texts(corpus["text"], vocab, KEYS)
    return language, corpus, bench.score(corpus, predicted)


def test_corpora_are_large_and_split(measured):
    language, corpus, _ = measured
    assert len(corpus) >= {"ru": 400, "en": 200}[language]
    assert set(corpus["part"]) == {"dev", "heldout"}
    assert corpus["note_id"].is_unique


def test_micro_f1_floors(measured):
    language, _, result = measured
    positive, uncertain, normal, _ = FLOORS[language]
    assert result["micro"]["f"] >= positive, result["micro"]
    assert result["uncertain_micro"]["f"] >= uncertain, result["uncertain_micro"]
    assert result["normal"]["f"] >= normal, result["normal"]


def test_micro_f1_floor_on_the_held_out_part(measured):
    language, corpus, _ = measured
    vocab = load_vocabulary(ROOT / "config/labels" / f"{language}.yaml", KEYS)
    heldout = corpus[corpus["part"] == "heldout"].reset_index(drop=True)
    assert len(heldout) >= {"ru": 250, "en": 200}[language]
    result = bench.score(heldout, label_texts(heldout["text"], vocab, KEYS))
    assert result["micro"]["f"] >= HELDOUT_FLOORS[language], result["micro"]


def test_few_findings_on_normal_or_fully_negated_notes(measured):
    language, _, result = measured
    emitted = result["positives_on_clean"] + result["uncertain_on_clean"]
    assert result["clean_notes"] > 100
    assert emitted <= FLOORS[language][3], result["clean_notes_hit"]


def test_score_can_fail():
    """The scorer is no constant: labels that say nothing score 0 recall, and a wrong label costs precision."""
    corpus = bench.read_corpus("en").head(40)
    vocab = load_vocabulary(ROOT / "config/labels/en.yaml", KEYS)
    predicted = label_texts(corpus["text"], vocab, KEYS)
    silent = predicted.copy()
    silent.loc[:, :] = 0
    result = bench.score(corpus, silent)
    assert result["micro"]["r"] == 0 and result["normal"]["r"] == 0
    noisy = predicted.copy()
    noisy["fracture"] = 1
    assert bench.score(corpus, noisy)["micro"]["p"] < bench.score(corpus, predicted)["micro"]["p"]
