"""Coverage of the free-text labeler on an archive, near-miss words, audit sheets and their precision (issue 12)."""

import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, snakemake_tiny

from cxrflow import label_audit as la
from cxrflow.errors import CxrflowError
from cxrflow.labels import find_mentions, load_keys, load_vocabulary, normalise, split_units

KEYS_FILE = ROOT / "config" / "labels" / "keys.yaml"
RU = ROOT / "config" / "labels" / "ru.yaml"

# A small archive in plain wording: (note, images carrying it).
ARCHIVE = [
    ("Сердце расширено. Синусы свободны.", 5),
    ("Сердце расширено.", 2),
    ("Возможно, пневмония.", 3),
    ("Пневмонии нет.", 4),
    ("Норма.", 20),
    ("Рентгенограмма выполнена в прямой проекции.", 7),
    ("Аортв без особенностей.", 6),
    ("Аорта уплотнена. Рентгенограмма выполнена в прямой проекции.", 3),
    ("Сколиоз грудного отдела позвоночника.", 1),
]


@pytest.fixture(scope="module")
def vocab():
    return load_vocabulary(RU, load_keys(KEYS_FILE))


@pytest.fixture(scope="module")
def keys():
    return load_keys(KEYS_FILE)


@pytest.fixture(scope="module")
def texts():
    rows = [note for note, images in ARCHIVE for _ in range(images)]
    return pd.Series(rows + [None, "   "])  # two images without a note


@pytest.fixture(scope="module")
def scan(texts, vocab, keys):
    return la.scan_archive(texts, vocab, keys)


def test_wilson_interval_matches_newcombe_1998():
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score, no continuity correction).
    published = {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605), (0, 20): (0.0, 0.1611),
                 (1, 29): (0.0061, 0.1718)}
    for (k, n), (low, high) in published.items():
        got = la.wilson_interval(k, n)
        assert got[0] == pytest.approx(low, abs=1e-4) and got[1] == pytest.approx(high, abs=1e-4), (k, n, got)
    low, high = la.wilson_interval(np.array([10, 5]), np.array([10, 10]))
    assert high[0] == pytest.approx(1.0) and low[0] == pytest.approx(0.7225, abs=1e-4)  # 10/10: [0.7225, 1]
    assert low[1] + high[1] == pytest.approx(1.0)  # 5/10 is symmetric about 0.5
    assert np.isnan(la.wilson_interval(0, 0)).all()


def test_scanning_sentences_alone_gives_each_notes_mentions(texts, vocab):
    # scan_archive labels distinct sentences on their own: a sentence must be its own only unit, with the mentions
    # it has inside the note.
    for note in texts.dropna().unique():
        units = split_units(normalise(note, vocab), vocab)
        alone = [m for unit in units for m in find_mentions(unit, vocab)]
        assert alone == find_mentions(note, vocab), note


def test_coverage_counts_images_notes_and_states(scan):
    table = la.coverage_table(scan)
    row = table[table["key"] == ""].set_index("measure")
    assert row.loc["images", "count"] == 53 and row.loc["images_without_note", "count"] == 2
    assert row.loc["notes", "count"] == 51 and row.loc["notes", "distinct"] == 9
    # Unmatched: the projection note (7 images) and the typo note (6); the note with "Аорта уплотнена" is matched.
    assert row.loc["notes_unmatched", "count"] == 13 and row.loc["notes_unmatched", "distinct"] == 2
    assert row.loc["notes_matched", "count"] + row.loc["notes_unmatched", "count"] == 51
    assert row.loc["notes_with_normal_phrase", "count"] == 20
    assert row.loc["notes_matched", "share"] == pytest.approx(38 / 51, abs=1e-6)
    assert row.loc["sentences", "count"] == 5 * 2 + 2 + 3 + 4 + 20 + 7 + 6 + 3 * 2 + 1
    state = table[table["key"] != ""].set_index(["key", "measure"])
    assert state.loc[("enlarged_heart", "affirmed"), "count"] == 7
    assert state.loc[("enlarged_heart", "affirmed"), "distinct"] == 2
    assert state.loc[("pneumonia", "uncertain"), "count"] == 3 and state.loc[("pneumonia", "negated"), "count"] == 4
    assert state.loc[("aorta_compacted", "affirmed"), "count"] == 3
    assert state.loc[("scoliosis", "affirmed"), "count"] == 1


def test_unmatched_text_ranks_by_images_and_keeps_the_top(scan):
    table = la.unmatched_text(scan, top=200)
    notes = table[table["kind"] == "note"]
    assert notes["text"].tolist() == ["Рентгенограмма выполнена в прямой проекции.", "Аортв без особенностей."]
    assert notes["images"].tolist() == [7, 6]
    sentences = table[table["kind"] == "sentence"].set_index("text")
    # The projection sentence also sits in a matched note: 7 + 3 images, 2 distinct notes.
    projection = "рентгенограмма выполнена в прямой проекции."
    assert sentences.loc[projection, "images"] == 10 and sentences.loc[projection, "distinct_notes"] == 2
    assert "норма." not in sentences.index and "сердце расширено." not in sentences.index
    assert len(la.unmatched_text(scan, top=1)) == 2  # one note and one sentence


def test_near_misses_are_close_to_an_accepted_word_and_never_accepted(scan):
    from rapidfuzz.distance import OSA

    table = la.near_miss_words(scan, max_distance=2, min_length=5)
    accepted = {word for mentions in scan.unit_mentions for m in mentions for word in la._WORD.findall(m.text)}
    row = table.set_index("word").loc["аортв"]  # a typo of "аорта" the labeler (rightly) did not take
    assert row["term"] == "аорта" and row["distance"] == 1 and row["images"] == 6
    assert "aorta_compacted" in row["keys"].split(";") and row["example"] == "аортв без особенностей."
    assert not set(table["word"]) & accepted
    assert (table["word"].str.len() >= 5).all()
    for word, term, distance in zip(table["word"], table["term"], table["distance"]):
        assert term in accepted or term == "норма"
        assert OSA.distance(word, term) == distance <= la.allowed_distance(word, 2)
    assert la.near_miss_words(scan, max_distance=0).empty
    assert "аортв" not in set(la.near_miss_words(scan, min_length=6)["word"])


def test_a_word_the_labeler_accepted_is_no_near_miss(vocab, keys):
    # "уплотенна" is one transposition from "уплотнена": a near miss if the labeler refuses it, none if it accepts it.
    scan = la.scan_archive(pd.Series(["Аорта уплотнена.", "Аорта уплотенна.", "Сердце расширено."]), vocab, keys)
    accepted = any(m.key == "aorta_compacted" for m in find_mentions("Аорта уплотенна.", vocab))
    near = set(la.near_miss_words(scan)["word"])
    assert ("уплотенна" in near) != accepted
    if accepted:
        assert la.mark_mentions("Аорта уплотенна. Норма.", "aorta_compacted", vocab).startswith("[[Аорта уплотенна]]")


def test_audit_sheets_are_seeded_sized_and_marked(scan, vocab, keys):
    per_state = {"affirmed": 1, "uncertain": 5, "negated": 5, "unmentioned": 2}
    sheets = la.audit_sheets(scan, vocab, per_state, seed=7)
    assert set(sheets) == set(keys)
    heart = sheets["enlarged_heart"]
    assert list(heart.columns) == la.SHEET_COLUMNS
    assert heart["state"].value_counts().to_dict() == {"affirmed": 1, "unmentioned": 2}  # none uncertain or negated
    affirmed = heart[heart["state"] == "affirmed"].iloc[0]
    assert "[[Сердце расширено]]" in affirmed["note"] and affirmed["images"] in (5, 2)
    assert (heart["verdict"] == "").all()
    pneumonia = sheets["pneumonia"].set_index("state")
    assert pneumonia.loc["uncertain", "note"] == "Возможно, [[пневмония]]."
    assert pneumonia.loc["negated", "note"] == "[[Пневмонии]] нет."
    assert sheets["smoothed_cardiac_waist"].query("state != 'unmentioned'").empty
    again = la.audit_sheets(scan, vocab, per_state, seed=7)
    assert all(again[key].equals(sheets[key]) for key in keys)
    # Seeded per key and state: scanning with the keys in another order changes no sheet.
    reordered = la.audit_sheets(la.scan_archive(pd.Series(scan.notes.tolist()), vocab, keys[::-1]), vocab,
                                per_state, seed=7)
    assert reordered["enlarged_heart"]["note"].tolist() == heart["note"].tolist()
    draws = {tuple(la.audit_sheets(scan, vocab, {"unmentioned": 2}, seed)["enlarged_heart"]["note"])
             for seed in range(6)}
    assert len(draws) > 1  # the seed matters
    with pytest.raises(CxrflowError, match="unknown state 'maybe'"):
        la.audit_sheets(scan, vocab, {"maybe": 1}, seed=7)


def test_marks_fall_back_to_the_normalised_text_when_normalising_changes_the_length(vocab):
    note = "İ. Сердце расширено."  # "İ".lower() is two characters
    assert la.mark_mentions(note, "enlarged_heart", vocab) == "i̇. [[сердце расширено]]."
    twice = "Сердце расширено. Сердце расширено."
    assert la.mark_mentions(twice, "enlarged_heart", vocab) == "[[Сердце расширено]]. [[Сердце расширено]]."
    assert la.mark_mentions(twice, "scoliosis", vocab) == twice


def test_spans_of_a_sentence_the_labeler_rewrote_are_carried_back():
    from cxrflow.labels import Mention

    unit = "ао уплотнена, кардиомегалиия."
    read = "аорта уплотнена, кардиомегалия."  # an abbreviation expanded, a typo corrected
    mentions = [Mention("aorta_compacted", read, 0, 15, "аорта уплотнена", 3),
                Mention("enlarged_heart", read, 17, 30, "кардиомегалия", 3)]
    spans = la.original_spans(unit, mentions)
    assert [unit[a:b] for a, b in spans] == ["ао уплотнена", "кардиомегалиия"]
    assert la.original_spans(read, mentions) == [(0, 15), (17, 30)]


def test_verdicts_from_spreadsheets_give_precision_with_wilson_intervals(tmp_path, keys):
    sheet = pd.DataFrame({"key": ["scoliosis"] * 6 + ["pneumonia"] * 3,
                          "state": ["affirmed"] * 5 + ["negated"] + ["affirmed"] * 3,
                          "note": "Сколиоз грудного отдела позвоночника.",
                          "verdict": ["correct", "Correct ", "incorrect", "", "верно", "correct", "incorrect",
                                      "incorrect", None]})
    # A Russian-locale spreadsheet saves ';'-separated Windows-1251; another user keeps UTF-8 with a BOM.
    sheet.iloc[:6].to_csv(tmp_path / "scoliosis.csv", sep=";", index=False, encoding="cp1251")
    sheet.iloc[6:].to_csv(tmp_path / "pneumonia.csv", index=False, encoding="utf-8-sig")
    verdicts = la.read_verdicts(sorted(tmp_path.glob("*.csv")), keys)
    assert len(verdicts) == 7  # blank and missing verdicts are not judged
    table = la.precision_table(verdicts, keys).set_index(["key", "state"])
    assert table.loc[("scoliosis", "affirmed"), ["judged", "correct"]].tolist() == [4, 3]
    assert table.loc[("scoliosis", "affirmed"), "proportion_correct"] == 0.75
    low, high = la.wilson_interval(3, 4)
    assert table.loc[("scoliosis", "affirmed"), "ci_low"] == pytest.approx(low, abs=1e-4)
    assert table.loc[("scoliosis", "affirmed"), "ci_high"] == pytest.approx(high, abs=1e-4)
    assert table.loc[("pneumonia", "affirmed"), ["judged", "correct"]].tolist() == [2, 0]
    # In the order of keys.yaml, then affirmed, uncertain, negated.
    assert table.index.tolist() == [("scoliosis", "affirmed"), ("scoliosis", "negated"), ("pneumonia", "affirmed")]

    sheet.loc[1, "verdict"] = "maybe"
    sheet.iloc[:6].to_csv(tmp_path / "scoliosis.csv", index=False)
    with pytest.raises(CxrflowError, match=r"scoliosis.csv: row 3: verdict 'maybe'"):
        la.read_verdicts([tmp_path / "scoliosis.csv"], keys)
    sheet.assign(key="cardiomegaly", verdict="correct").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(CxrflowError, match=r"bad.csv: row 2: key 'cardiomegaly'"):
        la.read_verdicts([tmp_path / "bad.csv"], keys)
    sheet.drop(columns="verdict").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(CxrflowError, match=r"bad.csv: missing column\(s\) \['verdict'\]"):
        la.read_verdicts([tmp_path / "bad.csv"], keys)


def test_pipeline_round_trip_and_a_source_without_free_text(tmp_path, texts, keys):
    from cxrflow.pipeline import run_label_audit_precision, run_label_audit_sheets, run_label_coverage

    catalog = tmp_path / "catalog.parquet"
    pd.DataFrame({"text": texts}).to_parquet(catalog, row_group_size=7)  # several row groups, several dictionaries
    notes, images, rows = la.read_distinct_notes(catalog)
    assert dict(zip(notes, images)) == texts.value_counts().to_dict() and rows == len(texts)
    settings = {"coverage_top": 200, "near_miss_distance": 2, "near_miss_min_length": 5}
    out = tmp_path / "out"
    coverage = run_label_coverage(catalog, RU, KEYS_FILE, settings, out / "coverage.csv", out / "unmatched.csv",
                                  out / "near.csv")
    expected = la.coverage_table(la.scan_archive(texts, load_vocabulary(RU, keys), keys))
    pd.testing.assert_frame_equal(coverage, expected)
    assert pd.read_csv(out / "coverage.csv").shape == coverage.shape
    shared = (out / "coverage.csv").read_text(encoding="utf-8").lower()
    assert not any(word in shared for word in ("сердце", "норма", "аортв", "рентгенограмма"))  # counts only
    sheets = [tmp_path / "sheets" / f"{key}.csv" for key in ("enlarged_heart", "pneumonia")]
    run_label_audit_sheets(catalog, RU, KEYS_FILE, {"affirmed": 3, "negated": 3}, 42, sheets)
    assert sheets[0].read_bytes().startswith(b"\xef\xbb\xbf")  # a spreadsheet opens it as UTF-8
    filled = pd.read_csv(sheets[0], encoding="utf-8-sig", keep_default_na=False)
    assert filled["state"].tolist() == ["affirmed", "affirmed"]
    filled["verdict"] = ["correct", "incorrect"]
    (tmp_path / "verdicts").mkdir()
    filled.to_csv(tmp_path / "verdicts" / "enlarged_heart.csv", index=False)
    table = run_label_audit_precision(tmp_path / "verdicts", [tmp_path / "verdicts" / "enlarged_heart.csv"],
                                      KEYS_FILE, tmp_path / "precision.csv")
    assert table[["key", "state", "judged", "correct"]].values.tolist() == [["enlarged_heart", "affirmed", 2, 1]]
    with pytest.raises(CxrflowError, match="labels.audit_verdicts: no such folder"):
        run_label_audit_precision(tmp_path / "absent", [], KEYS_FILE, tmp_path / "p.csv")
    with pytest.raises(CxrflowError, match="source.vocabulary: label coverage and audit need free-text notes"):
        run_label_coverage(catalog, None, KEYS_FILE, settings, out / "c.csv", out / "u.csv", out / "n.csv")


def test_workflow_writes_coverage_and_sheets_and_reads_verdicts_back(tiny_run, tmp_path, keys):
    coverage = pd.read_csv(tiny_run / "results" / "labels" / "coverage.csv", keep_default_na=False)
    notes = coverage.set_index("measure").loc["notes"]
    assert int(notes["count"]) > 100 and 0 < float(coverage.set_index("measure").loc["notes_matched", "share"]) <= 1
    private = tiny_run / "results" / "private" / "labels"
    assert (private / "unmatched.csv").is_file() and (private / "near_misses.csv").is_file()
    assert sorted(p.stem for p in (private / "audit").glob("*.csv")) == sorted(keys)
    log = (tiny_run / "results" / "logs" / "label_coverage.log").read_text(encoding="utf-8")
    sentences = pd.read_csv(private / "unmatched.csv")["text"]
    assert not any(sentence in log for sentence in sentences)  # the log carries counts, never note text

    # A doctor fills one sheet; the precision rule reads it back. In a copy, so the shared run stays as it was.
    workdir = tmp_path / "wf"
    shutil.copytree(tiny_run, workdir, symlinks=True)
    sheet = pd.read_csv(private / "audit" / "aorta_unfolded.csv", encoding="utf-8-sig", keep_default_na=False)
    assert len(sheet) and (sheet["verdict"] == "").all()
    sheet["verdict"] = ["correct"] * (len(sheet) - 1) + ["incorrect"]
    (workdir / "resources" / "verdicts").mkdir()
    sheet.to_csv(workdir / "resources" / "verdicts" / "aorta_unfolded.csv", index=False)
    snakemake_tiny(workdir, "results/labels/audit_precision.csv", "--config",
                   "labels={'audit_verdicts': 'resources/verdicts'}")
    table = pd.read_csv(workdir / "results" / "labels" / "audit_precision.csv")
    assert table["judged"].sum() == len(sheet) and table["correct"].sum() == len(sheet) - 1
    assert set(table["key"]) == {"aorta_unfolded"} and (table["ci_low"] <= table["proportion_correct"]).all()
