"""Ingest: the free-text adapter on tables the tests write, and the NIH / PadChest adapters on the real tables."""

import hashlib

import pandas as pd
import pytest

from cxrflow.errors import CxrflowError
from cxrflow.ingest import build_catalog, read_table
from cxrflow.ingest.fields import normalize_age


def freetext_source(tmp_path, rows, encoding="utf-8", header="image_id,patient_id,sex,age,file,annotation", bom=False):
    (tmp_path / "images").mkdir(exist_ok=True)
    lines = [header] + [",".join(r) for r in rows]
    data = ("\n".join(lines) + "\n").encode(encoding)
    if bom:
        data = b"\xef\xbb\xbf" + data
    (tmp_path / "notes.csv").write_bytes(data)
    for r in rows:
        if len(r) > 4 and r[4] and not r[4].startswith("missing"):
            (tmp_path / r[4]).write_bytes(b"x")
    return {
        "format": "freetext",
        "annotations": "notes.csv",
        "images": ".",
        "columns": {"image_id": "image_id", "patient_id": "patient_id", "sex": "sex", "age": "age", "file": "file", "text": "annotation"},
        "vocabulary": "config/labels/ru.yaml",
    }


def build(source, tmp_path, root, keys_file, **kw):
    # The vocabulary path is relative to the repo; the table's paths to tmp_path.
    source = {**source, "vocabulary": str(root / source["vocabulary"]), "annotations": str(tmp_path / source["annotations"]),
              "images": str(tmp_path / source.get("images", "."))} if source["format"] == "freetext" else source
    return build_catalog(source, keys_file, base="/", **kw)


ROWS = [
    ["a1", "p1", "Ж", "65", "images/a1.png", "Сердце расширено влево."],
    ["a2", "p1", "Ж", "066Y", "images/a2.png", "Без патологических изменений."],
    ["b1", "p2", "М", "40", "images/b1.png", "Сколиоз грудного отдела позвоночника."],
]


def test_freetext_catalog_labels_and_pseudonyms(tmp_path, root, keys_file):
    result = build(freetext_source(tmp_path, ROWS), tmp_path, root, keys_file)
    cat = result.catalog.set_index("image_id")
    assert list(cat.index) == ["a1", "a2", "b1"]
    assert cat.loc["a1", "enlarged_heart"] == 1 and cat.loc["a2", "enlarged_heart"] == 0
    assert cat.loc["b1", "scoliosis"] == 1 and cat.loc["b1", "enlarged_heart"] == 0
    assert list(cat["sex"]) == ["F", "F", "M"] and list(cat["age"]) == [65, 66, 40]
    expected = hashlib.blake2b(b"p1", key=b"test-key", digest_size=8).hexdigest()
    assert cat.loc["a1", "patient_id"] == expected == cat.loc["a2", "patient_id"]
    assert "p1" not in set(cat["patient_id"])
    assert result.summary["kept"] + result.summary["left_out"] == result.summary["rows_read"] == 3


def test_windows_1251_and_bom_are_read_without_mojibake(tmp_path, root, keys_file):
    for encoding, bom in [("cp1251", False), ("utf-8", True)]:
        result = build(freetext_source(tmp_path, ROWS, encoding=encoding, bom=bom), tmp_path, root, keys_file)
        assert result.catalog["text"].iloc[0] == "Сердце расширено влево."
        assert result.catalog["enlarged_heart"].iloc[0] == 1


def test_undecodable_text_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "bad.csv").write_bytes("image_id,annotation\n1,".encode() + "日本語のテキスト".encode("shift_jis") + b"\n")
    with pytest.raises(CxrflowError, match="bad.csv"):
        read_table(tmp_path / "bad.csv")


def test_missing_required_column_names_the_column(tmp_path, root, keys_file):
    source = freetext_source(tmp_path, [r[:5] for r in ROWS], header="image_id,patient_id,sex,age,file")
    with pytest.raises(CxrflowError, match="annotation"):
        build(source, tmp_path, root, keys_file)


def test_rows_left_out_are_in_the_ledger_and_counts_add_up(tmp_path, root, keys_file):
    rows = ROWS + [
        ["a1", "p1", "Ж", "65", "images/a1.png", "Норма."],  # duplicate id
        ["c1", "p3", "Ж", "50", "missing/c1.png", "Норма."],  # file does not exist
        ["d1", "", "Ж", "50", "images/d1.png", "Норма."],  # no patient id
        ["e1", "p4", "Ж", "50", "images/e1.png", ""],  # empty annotation: kept, labels missing
        ["f1", "p5", "Ж", "50", "images/f1.png", "Норма."],  # p5 has conflicting sex
        ["f2", "p5", "М", "50", "images/f2.png", "Норма."],
    ]
    result = build(freetext_source(tmp_path, rows), tmp_path, root, keys_file)
    reasons = result.ledger.set_index("item")["reason"].to_dict()
    assert reasons["c1"] == "missing_file"
    assert reasons["f1"] == reasons["f2"] == "sex_conflict"
    assert "duplicate_image_id" in reasons.values() and "no_patient_id" in reasons.values()
    assert result.summary["rows_read"] == 9 and result.summary["kept"] == 4 and result.summary["left_out"] == 5
    e1 = result.catalog.set_index("image_id").loc["e1"]
    assert e1[["enlarged_heart", "scoliosis"]].isna().all()


def test_empty_table_and_unknown_format_are_clear_errors(tmp_path, keys_file):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(CxrflowError, match="empty"):
        read_table(tmp_path / "empty.csv")
    with pytest.raises(CxrflowError, match="source.format"):
        build_catalog({"format": "xray9000", "annotations": "x"}, keys_file)


def test_dicom_age_strings():
    ages = normalize_age(pd.Series(["065Y", "18", "030M", "010D", "abc", None, "200"]))
    assert ages.tolist()[:4] == [65, 18, 2, 0]
    assert ages.iloc[4:].isna().all()


def test_nih_adapter_on_the_real_table_matches_published_counts(shared_data, root, keys_file):
    source = {"format": "nih", "annotations": str(shared_data / "nih" / "Data_Entry_2017_v2020.csv.gz"),
              "label_map": str(root / "config/labels/nih.yaml"), "check_files": False}
    result = build_catalog(source, keys_file, base="/")
    cat = result.catalog
    print(f"\nNIH: {len(cat)} images, {cat['patient_id'].nunique()} patients, {int((cat['enlarged_heart'] == 1).sum())} Cardiomegaly")
    assert len(cat) == 112_120
    assert cat["patient_id"].nunique() == 30_805
    assert int((cat["enlarged_heart"] == 1).sum()) == 2_776
    assert cat["scoliosis"].isna().all()  # NIH does not label scoliosis: missing, not 0
    assert result.summary["left_out"] == 0


def test_padchest_adapter_on_the_real_table_ledgers_unparseable_labels(shared_data, root, keys_file):
    source = {"format": "padchest", "annotations": str(shared_data / "padchest" / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"),
              "label_map": str(root / "config/labels/padchest.yaml"), "check_files": False}
    result = build_catalog(source, keys_file, base="/")
    cat, summary = result.catalog, result.summary
    print(f"\nPadChest: {summary}")
    assert summary["rows_read"] == 160_861
    assert summary["kept"] + summary["left_out"] == 160_861
    assert 50 <= summary["left_out_by_reason"].get("unparseable_labels", 0) <= 200
    women_frontal = cat[(cat["sex"] == "F") & cat["view"].isin(["PA", "AP", "AP_HORIZONTAL"])]
    assert int((women_frontal["enlarged_heart"] == 1).sum()) == pytest.approx(5_553, rel=0.02)
    # 3,747 carry "aortic elongation" itself; the map also counts its supra-, ascending and descending forms.
    assert 3_747 * 0.98 <= int((women_frontal["aorta_unfolded"] == 1).sum()) <= 3_747 * 1.15
    # Whole tokens only: "subcutaneous emphysema" must not count as emphysema.
    raw = pd.read_csv(source["annotations"], usecols=["ImageID", "Labels"])
    only_subcutaneous = raw[raw["Labels"].str.contains("subcutaneous emphysema", na=False)
                            & ~raw["Labels"].str.contains(r"'\s*(?:emphysema|COPD signs|air trapping)\s*'", na=False)]["ImageID"]
    assert len(only_subcutaneous) > 0
    assert (cat[cat["image_id"].isin(only_subcutaneous)]["emphysema"] == 0).all()


def test_the_readme_own_data_example_reads_a_table_without_a_date_column(tmp_path, root, keys_file):
    """The README's `source:` block, applied over config/config.yaml as Snakemake merges an overlay, on a table that
    has exactly the columns it names and no study date."""
    import re

    import yaml

    block = re.search(r"## Your own data.*?```yaml\n(.*?)```", (root / "README.md").read_text(), re.S).group(1)
    overlay = yaml.safe_load(block)["source"]
    source = yaml.safe_load((root / "config/config.yaml").read_text())["source"]
    source = {**source, **overlay, "columns": {**source["columns"], **overlay["columns"]}}
    assert source["columns"]["date"] is None  # the base config names a date column: the overlay must drop it
    columns = source["columns"]
    header = [columns[k] for k in ("image_id", "patient_id", "sex", "age", "view", "file", "text")]
    (tmp_path / "archive").mkdir()
    for name in ("a1.png", "a2.png"):
        (tmp_path / "archive" / name).write_bytes(b"x")
    (tmp_path / "archive" / "notes.csv").write_text(",".join(header) + "\na1,p1,Ж,65,PA,a1.png,Сердце расширено.\n"
                                                    "a2,p2,Ж,60,PA,a2.png,Без патологии.\n")
    source |= {"annotations": str(tmp_path / "archive/notes.csv"), "images": str(tmp_path / "archive"),
               "vocabulary": str(root / source["vocabulary"])}
    cat = build_catalog(source, keys_file, base="/").catalog
    assert len(cat) == 2 and cat["study_date"].isna().all() and cat["enlarged_heart"].fillna(-1).tolist() == [1, 0]
