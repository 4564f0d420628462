"""Ingest adapters beyond the free-text CSV: Excel, DICOM folders, CheXpert, VinDr-CXR, MIMIC-CXR-JPG, and the
errors and ledger rules that every format shares. Each test writes small tables (and DICOM files, with pydicom)
in the layout the real dataset uses."""

import numpy as np
import pandas as pd
import pytest

from cxrflow.errors import CxrflowError
from cxrflow.ingest import build_catalog, read_table
from cxrflow.ingest.catalog import ADAPTERS
from cxrflow.ingest.fields import normalize_date
from cxrflow.ingest.record import CATALOG_COLUMNS, LEDGER_COLUMNS
from cxrflow.pipeline import run_ingest


def write(path, text, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def freetext(tmp_path, root, table="notes.csv", **extra):
    return {"format": "freetext", "annotations": str(tmp_path / table), "check_files": False,
            "vocabulary": str(root / "config/labels/ru.yaml"),
            "columns": {"image_id": "id", "patient_id": "patient", "sex": "sex", "age": "age", "view": "view",
                        "date": "date", "text": "note"}, **extra}


NOTES = """id,patient,sex,age,view,date,note
a1,007,Ж,65,PA,24.05.2021,Сердце расширено влево.
a2,007,жен.,066Y,ap,2021-05-25,Без патологических изменений.
b1,008,М,40,LATERAL,20210526,Сколиоз грудного отдела позвоночника.
"""


# --- tables: formats, encodings, errors ------------------------------------------------------------------------

def test_excel_table_with_dates_and_leading_zeros(tmp_path, root, keys_file):
    table = pd.read_csv(write(tmp_path / "notes.csv", NOTES), dtype=str)
    table.to_excel(tmp_path / "notes.xlsx", index=False)  # openpyxl
    result = build_catalog(freetext(tmp_path, root, "notes.xlsx"), keys_file, base="/")
    cat = result.catalog.set_index("image_id")
    assert list(cat.index) == ["a1", "a2", "b1"]
    assert list(cat["sex"]) == ["F", "F", "M"] and list(cat["age"]) == [65, 66, 40]
    assert list(cat["view"]) == ["PA", "AP", "LAT"]
    assert list(cat["study_date"].dt.strftime("%Y-%m-%d")) == ["2021-05-24", "2021-05-25", "2021-05-26"]
    assert cat.loc["a1", "enlarged_heart"] == 1 and cat.loc["b1", "scoliosis"] == 1
    assert cat.loc["a1", "patient_id"] == cat.loc["a2", "patient_id"] != cat.loc["b1", "patient_id"]
    assert str(cat["study_date"].dtype) == "datetime64[s]" and str(cat["age"].dtype) == "Int16"


def test_tsv_and_a_table_without_patient_ids(tmp_path, root, keys_file):
    write(tmp_path / "notes.tsv", NOTES.replace(",", "\t"))
    source = freetext(tmp_path, root, "notes.tsv")
    source["columns"].pop("patient_id")
    result = build_catalog(source, keys_file, base="/")
    assert result.summary["patients"] == 3  # each image counts as its own patient, and the summary says so
    assert "own patient" in result.summary["patient_id"]


def test_gzipped_windows_1251_table_with_line_breaks_inside_notes(tmp_path, root, keys_file):
    import gzip

    text = NOTES + 'c1,009,Ж,70,PA,01.02.2020,"Сердце расширено влево.\nСколиоз грудного отдела позвоночника."\n'
    (tmp_path / "notes.csv.gz").write_bytes(gzip.compress(text.encode("cp1251")))
    cat = build_catalog(freetext(tmp_path, root, "notes.csv.gz"), keys_file, base="/").catalog.set_index("image_id")
    assert cat.loc["c1", "text"] == "Сердце расширено влево.\nСколиоз грудного отдела позвоночника."
    assert cat.loc["c1", "enlarged_heart"] == 1 and cat.loc["c1", "scoliosis"] == 1


def test_configured_encoding_that_would_make_mojibake_is_refused(tmp_path, root, keys_file):
    write(tmp_path / "notes.csv", NOTES)  # UTF-8
    with pytest.raises(CxrflowError, match=r"notes.csv: line 2 is UTF-8 text.*mojibake"):
        build_catalog(freetext(tmp_path, root, encoding="cp1251"), keys_file, base="/")
    write(tmp_path / "notes.csv", NOTES, encoding="cp1251")
    result = build_catalog(freetext(tmp_path, root, encoding="cp1251"), keys_file, base="/")
    assert result.catalog["text"].iloc[0] == "Сердце расширено влево."
    with pytest.raises(CxrflowError, match=r"notes.csv: cannot decode as UTF-8 \(line 2"):
        build_catalog(freetext(tmp_path, root, encoding="utf-8"), keys_file, base="/")


def test_a_file_mixing_utf8_and_windows_1251_is_refused(tmp_path, root, keys_file):
    lines = NOTES.splitlines(keepends=True)
    data = "".join(lines[:3]).encode("cp1251") + "".join(lines[3:]).encode("utf-8")
    (tmp_path / "notes.csv").write_bytes(data)
    with pytest.raises(CxrflowError, match=r"mixes encodings: line 2, byte \d+ is not UTF-8, but line 4 is UTF-8"):
        build_catalog(freetext(tmp_path, root), keys_file, base="/")


def test_table_errors_name_the_file_and_the_line_or_column(tmp_path, root, keys_file):
    write(tmp_path / "notes.csv", NOTES + "c1,009,Ж,50,PA,01.01.2020,Норма.,extra field\n")
    with pytest.raises(CxrflowError, match=r"notes.csv: line 5 has 8 fields, the header has 7"):
        read_table(tmp_path / "notes.csv")
    write(tmp_path / "notes.csv", "id,note,note\na,b,c\n")
    with pytest.raises(CxrflowError, match=r"notes.csv: column name\(s\) \['note'\] appear more than once"):
        read_table(tmp_path / "notes.csv")
    write(tmp_path / "notes.csv", "id,patient,note\n")
    with pytest.raises(CxrflowError, match="notes.csv: the table has a header but no rows"):
        read_table(tmp_path / "notes.csv")
    write(tmp_path / "notes.csv", NOTES.replace("note\n", "annotation\n", 1))
    with pytest.raises(CxrflowError, match=r"notes.csv: missing required column\(s\) \['note'\]; the table has .*'annotation'"):
        build_catalog(freetext(tmp_path, root), keys_file, base="/")
    with pytest.raises(CxrflowError, match="source.vocabulary: required for source.format freetext"):
        build_catalog({**freetext(tmp_path, root), "vocabulary": None}, keys_file, base="/")


def test_a_source_where_nothing_survives_is_an_error_not_an_empty_catalog(tmp_path, root, keys_file):
    write(tmp_path / "notes.csv", NOTES)
    with pytest.raises(CxrflowError, match=r"no image survived ingest .*missing_file"):
        build_catalog({**freetext(tmp_path, root), "check_files": True, "images": str(tmp_path),
                       "columns": {**freetext(tmp_path, root)["columns"], "file": "id"}}, keys_file, base="/")


def test_unreadable_values_are_counted_not_silently_dropped(tmp_path, root, keys_file):
    write(tmp_path / "notes.csv", NOTES.replace(",Ж,65,", ",X,65,").replace("20210526", "05/26/2021"))
    summary = build_catalog(freetext(tmp_path, root), keys_file, base="/").summary
    assert summary["unrecognized_values"]["sex"] == {"rows": 1, "examples": {"X": 1}}
    assert summary["unrecognized_values"]["study_date"]["examples"] == {"05/26/2021": 1}
    dates = normalize_date(pd.Series(["05/26/2021", None]), date_format="%m/%d/%Y")
    assert dates.iloc[0] == pd.Timestamp("2021-05-26") and pd.isna(dates.iloc[1])


@pytest.mark.parametrize("policy", ["drop_patient", "unknown", "keep"])
def test_sex_conflict_policies_all_flag_the_patient_in_the_ledger(tmp_path, root, keys_file, policy):
    write(tmp_path / "notes.csv", NOTES.replace("a2,007,жен.", "a2,007,М"))
    result = build_catalog(freetext(tmp_path, root, sex_conflict=policy), keys_file, base="/")
    flagged = result.ledger[result.ledger["item"].isin(["a1", "a2"])]
    assert len(flagged) == 2 and flagged["reason"].str.startswith("sex_conflict").all()
    assert list(result.ledger.columns) == LEDGER_COLUMNS
    cat = result.catalog.set_index("image_id")
    if policy == "drop_patient":
        assert list(cat.index) == ["b1"] and result.summary["left_out"] == 2
    else:
        assert result.summary["kept"] == 3 and result.summary["flagged"] == {"sex_conflict_flagged": 2}
        assert list(cat.loc[["a1", "a2"], "sex"].fillna("?")) == (["?", "?"] if policy == "unknown" else ["F", "M"])


def test_run_ingest_writes_catalog_ledger_and_summary(tmp_path, root, keys_file):
    write(tmp_path / "notes.csv", NOTES + "a1,007,Ж,65,PA,24.05.2021,Норма.\n")
    out = tmp_path / "results"
    summary = run_ingest(freetext(tmp_path, root), keys_file, {"dates": "year", "date_shift_days": 365},
                         out / "catalog.parquet", out / "ledger.csv",
                         out / "summary.json", base="/")
    catalog = pd.read_parquet(out / "catalog.parquet")
    private = pd.read_parquet(out / "private" / "catalog.parquet")
    ledger = pd.read_csv(out / "private" / "ledger.csv")  # the shareable ledger has no detail (it may quote notes)
    assert len(catalog) == len(private) == summary["kept"] == 3 and summary["rows_read"] == 4
    assert ledger.loc[0, "reason"] == "duplicate_image_id" and ledger.loc[0, "detail"].startswith("line 5")
    assert str(private["study_date"].dtype).startswith("datetime64") and str(catalog["enlarged_heart"].dtype) == "Int8"
    assert str(catalog["quality_tag"].dtype) == "Int8" and catalog["quality_tag"].fillna(-1).eq(0).all()


# --- CheXpert ------------------------------------------------------------------------------------------------

CHEXPERT = """Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,Support Devices
CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0
CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,
CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg,Female,83,Frontal,AP,,,,1.0,,,-1.0,,,,,,1.0,
CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg,Female,83,Lateral,,,,,1.0,,,-1.0,,,,,,1.0,
CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg,Male,41,Frontal,PA,,,1.0,,,1.0,,,,0.0,,,,
"""


def chexpert(tmp_path, root, **extra):
    write(tmp_path / "CheXpert-v1.0-small" / "train.csv", CHEXPERT)
    return {"format": "chexpert", "annotations": str(tmp_path / "CheXpert-v1.0-small" / "train.csv"),
            "label_map": str(root / "config/labels/chexpert.yaml"), "check_files": False, **extra}


@pytest.mark.parametrize("uncertain, expected", [("missing", None), ("positive", 1), ("negative", 0)])
def test_chexpert_uncertain_policy(tmp_path, root, keys_file, uncertain, expected):
    cat = build_catalog(chexpert(tmp_path, root, uncertain=uncertain), keys_file, base="/").catalog
    study2 = cat.iloc[1]
    assert (pd.isna(study2["enlarged_heart"]) if expected is None else study2["enlarged_heart"] == expected)
    assert (pd.isna(study2["pleural_effusion"]) if expected is None else study2["pleural_effusion"] == expected)
    assert study2["fracture"] == 1  # a positive stays positive under every policy


def test_chexpert_patients_views_blanks_and_uncovered_keys(tmp_path, root, keys_file):
    result = build_catalog(chexpert(tmp_path, root), keys_file, base="/")
    cat = result.catalog
    assert result.summary["rows_read"] == 5 and result.summary["patients"] == 3
    assert cat["patient_id"].iloc[1] == cat["patient_id"].iloc[2] == cat["patient_id"].iloc[3] != cat["patient_id"].iloc[0]
    assert list(cat["view"]) == ["AP", "AP", "AP", "LAT", "PA"]
    assert list(cat["sex"]) == ["F", "F", "F", "F", "M"] and cat["age"].iloc[0] == 68
    first = cat.iloc[0]
    assert first["support_devices"] == 1 and first["pneumothorax"] == 0
    # No Finding = 1 beside Support Devices = 1: the device is a finding, so the catalog's `normal` is 0.
    assert first["normal"] == 0 and result.summary["normal_contradicted_by_a_finding"] == 1
    assert cat["normal"].fillna(-1).tolist() == [0, 0, 0, 0, 0]
    # Lung Opacity (rows 2-4) has no key of its own: other_finding.
    assert cat["other_finding"].fillna(-1).tolist() == [0, 1, 1, 1, 0]
    assert first["enlarged_heart"] == 0  # blank = not mentioned = absent (source.unmentioned: negative)
    assert cat["scoliosis"].isna().all()  # CheXpert has no scoliosis label: missing, not 0
    assert cat["text"].iloc[4] == "Cardiomegaly|Edema"
    missing_blank = build_catalog(chexpert(tmp_path, root, unmentioned="missing"), keys_file, base="/").catalog
    assert pd.isna(missing_blank["enlarged_heart"].iloc[0]) and missing_blank["pneumothorax"].iloc[0] == 0


def test_chexpert_table_without_a_mapped_column_names_it(tmp_path, root, keys_file):
    source = chexpert(tmp_path, root)
    write(tmp_path / "CheXpert-v1.0-small" / "train.csv", CHEXPERT.replace(",Cardiomegaly,", ",Cardio,"))
    with pytest.raises(CxrflowError, match=r"train.csv .*chexpert.yaml.*missing required column\(s\) \['Cardiomegaly'\]"):
        build_catalog(source, keys_file, base="/")


def test_chexpert_missing_files_go_to_the_ledger(tmp_path, root, keys_file):
    source = chexpert(tmp_path, root, check_files=True, images=str(tmp_path))
    first = tmp_path / "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    first.parent.mkdir(parents=True)
    first.write_bytes(b"\xff\xd8\xff")
    result = build_catalog(source, keys_file, base="/")
    assert result.summary["kept"] == 1 and result.summary["left_out_by_reason"] == {"missing_file": 4}
    assert result.catalog["path"].iloc[0] == first.as_posix()


# --- VinDr-CXR -----------------------------------------------------------------------------------------------

VINDR = """image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max
img_a,Cardiomegaly,3,R9,691.0,1375.0,1653.0,1831.0
img_a,Cardiomegaly,3,R10,698.0,1367.0,1660.0,1836.0
img_a,No finding,14,R8,,,,
img_b,Aortic enlargement,0,R1,1264.0,743.0,1611.0,1019.0
img_b,Pleural thickening,11,R1,627.0,357.0,947.0,433.0
img_b,No finding,14,R2,,,,
img_b,No finding,14,R3,,,,
img_c,No finding,14,R1,,,,
img_c,No finding,14,R2,,,,
img_c,No finding,14,R3,,,,
img_d,Nodule/Mass,8,R1,100.0,100.0,150.0,150.0
img_d,Nodule/Mass,8,R1,300.0,300.0,350.0,350.0
img_d,Nodule/Mass,8,R2,102.0,101.0,149.0,152.0
img_d,Lung cyst,21,R2,500.0,500.0,600.0,600.0
img_d,No finding,14,R3,,,,
"""


@pytest.mark.parametrize("combine", ["any", "majority"])
def test_vindr_combines_radiologists(tmp_path, root, keys_file, combine):
    write(tmp_path / "train.csv", VINDR)
    source = {"format": "vindr", "annotations": str(tmp_path / "train.csv"), "check_files": False,
              "label_map": str(root / "config/labels/vindr.yaml"), "combine": combine}
    result = build_catalog(source, keys_file, base="/")
    cat = result.catalog.set_index("image_id")
    assert list(cat.index) == ["img_a", "img_b", "img_c", "img_d"]
    assert result.summary["rows_read"] == 4 and result.summary["annotation_rows"] == 15
    assert cat.loc["img_a", "enlarged_heart"] == 1  # two of three radiologists
    assert cat.loc["img_b", "pleural_thickening"] == (1 if combine == "any" else 0)  # one of three
    assert cat.loc["img_d", "nodule_mass"] == 1  # R1's two boxes are one vote; with R2, two of three
    assert cat.loc["img_c", ["enlarged_heart", "nodule_mass", "pleural_thickening"]].fillna(-1).eq(0).all()
    # A class the table never names leaves its key missing for every image, never 0.
    assert cat["pleural_effusion"].isna().all() and cat["emphysema"].isna().all() and cat["scoliosis"].isna().all()
    # "No finding" is the `normal` key, combined like any class; a finding that wins contradicts it.
    normal = {"any": [0, 0, 1, 0], "majority": [0, 1, 1, 0]}[combine]  # img_b: two of three found nothing
    assert cat["normal"].fillna(-1).tolist() == normal
    # Aortic enlargement and Lung cyst have no key: other_finding, a finding that never makes an image normal.
    assert cat["other_finding"].fillna(-1).tolist() == ([0, 1, 0, 1] if combine == "any" else [0, 0, 0, 0])
    assert "labels_not_in_label_map" not in result.summary
    assert cat["quality_tag"].fillna(-1).eq(0).all()
    assert cat.loc["img_b", "text"] == "Aortic enlargement|No finding|Pleural thickening"
    assert cat.loc["img_a", "path"] == "img_a.dicom"


VINDR_IMAGE_LABELS = """image_id,rad_ID,Aortic enlargement,Cardiomegaly,Emphysema,Lung cyst,COPD,Pneumonia,Tuberculosis,Other diseases,No finding
img_a,R8,0,0,0,0,0,0,0,0,1
img_a,R9,0,1,0,0,1,0,0,0,0
img_a,R10,0,1,0,0,1,0,0,0,0
img_c,R1,0,0,0,0,0,0,0,0,1
img_c,R2,0,0,0,0,0,0,0,0,1
img_c,R3,0,0,0,0,0,0,0,0,1
img_e,R4,0,0,0,0,0,1,0,0,0
img_e,R5,0,0,0,0,0,1,0,0,0
img_e,R6,0,0,0,0,0,0,0,0,1
"""


def test_vindr_image_level_labels_add_the_global_classes(tmp_path, root, keys_file):
    write(tmp_path / "annotations_train.csv", VINDR)
    write(tmp_path / "image_labels_train.csv", VINDR_IMAGE_LABELS)
    source = {"format": "vindr", "annotations": str(tmp_path / "annotations_train.csv"), "check_files": False,
              "labels": str(tmp_path / "image_labels_train.csv"), "label_map": str(root / "config/labels/vindr.yaml")}
    result = build_catalog(source, keys_file, base="/")
    cat = result.catalog.set_index("image_id")
    assert list(cat.index) == ["img_a", "img_b", "img_c", "img_d", "img_e"]  # img_e is in the image-level table only
    assert cat.loc["img_a", "emphysema"] == 1  # COPD, marked by two of three readers
    assert cat.loc["img_e", "pneumonia"] == 1 and cat.loc["img_e", "normal"] == 0
    assert cat.loc["img_c", "normal"] == 1 and cat.loc["img_c", ["pneumonia", "tuberculosis"]].fillna(-1).eq(0).all()
    # Emphysema is a column of the image-level table: covered, 0 where no reader marked it.
    assert cat["emphysema"].fillna(-1).eq(0).sum() == 4
    assert cat["pleural_effusion"].isna().all()  # neither table has a class for it
    assert result.summary["image_label_rows"] == 9


def test_vindr_class_the_map_does_not_name_is_a_finding_and_is_reported(tmp_path, root, keys_file):
    write(tmp_path / "train.csv", VINDR.replace("img_d,Lung cyst", "img_d,Alien artefact"))
    source = {"format": "vindr", "annotations": str(tmp_path / "train.csv"), "check_files": False,
              "label_map": str(root / "config/labels/vindr.yaml"), "combine": "any"}
    result = build_catalog(source, keys_file, base="/")
    assert result.summary["labels_not_in_label_map"] == {"Alien artefact": 1}
    assert result.catalog.set_index("image_id").loc["img_d", "other_finding"] == 1


def test_freetext_table_without_a_date_column(tmp_path, root, keys_file):
    write(tmp_path / "notes.csv", NOTES.replace(",date,", ",").replace(",24.05.2021,", ",").replace(
        ",2021-05-25,", ",").replace(",20210526,", ","))
    source = freetext(tmp_path, root)
    with pytest.raises(CxrflowError, match=r"'date' \(source.columns.date\) is not in the table.*date: null"):
        build_catalog(source, keys_file, base="/")
    source["columns"]["date"] = None  # what an overlay writes to drop the base config's column
    cat = build_catalog(source, keys_file, base="/").catalog
    assert len(cat) == 3 and cat["study_date"].isna().all() and cat.loc[0, "enlarged_heart"] == 1


# --- MIMIC-CXR-JPG -------------------------------------------------------------------------------------------

MIMIC_METADATA = """dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,PatientOrientationCodeSequence_CodeMeaning
02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,10000032,50414267,CHEST (PA AND LAT),PA,3056,2544,21800506,213014.531,CHEST (PA AND LAT),postero-anterior,Erect
174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962,10000032,50414267,CHEST (PA AND LAT),LATERAL,3056,2544,21800506,213014.531,CHEST (PA AND LAT),lateral,Erect
2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab,10000032,53189527,CHEST (PA AND LAT),PA,3056,2544,21800626,165500.312,CHEST (PA AND LAT),postero-anterior,Erect
68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714,10000764,57375967,CHEST (PORTABLE AP),AP,2705,2539,21321015,112255.468,CHEST (PORTABLE AP),antero-posterior,Erect
"""
MIMIC_LABELS = """subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices
10000032,50414267,,,,,,,,,1.0,,,,,
10000032,53189527,,1.0,,-1.0,,,,,,,,,0.0,
10000935,50578979,,,1.0,,,,,1.0,,-1.0,,1.0,,
"""
MIMIC_PATIENTS = """subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod
10000032,F,52,2180,2014 - 2016,2180-09-09
10000764,M,86,2132,2014 - 2016,
"""


def test_mimic_joins_metadata_labels_and_patients(tmp_path, root, keys_file):
    write(tmp_path / "mimic-cxr-2.0.0-metadata.csv", MIMIC_METADATA)
    write(tmp_path / "mimic-cxr-2.0.0-chexpert.csv", MIMIC_LABELS)
    write(tmp_path / "patients.csv", MIMIC_PATIENTS)
    source = {"format": "mimic", "annotations": str(tmp_path / "mimic-cxr-2.0.0-metadata.csv"),
              "labels": str(tmp_path / "mimic-cxr-2.0.0-chexpert.csv"), "patients": str(tmp_path / "patients.csv"),
              "label_map": str(root / "config/labels/mimic.yaml"), "check_files": False}
    result = build_catalog(source, keys_file, base="/")
    cat = result.catalog.set_index("image_id")
    assert result.summary["rows_read"] == 4 and result.summary["patients"] == 2
    first = cat.loc["02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"]
    assert first["normal"] == 1 and first["other_finding"] == 0  # No Finding = 1 and nothing else
    assert first["path"] == "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"
    assert first["enlarged_heart"] == 0 and first["view"] == "PA" and first["sex"] == "F" and first["age"] == 52
    assert cat.loc["174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "view"] == "LAT"
    second_study = cat.loc["2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab"]
    assert second_study["enlarged_heart"] == 1 and pd.isna(second_study["edema"]) and second_study["pneumothorax"] == 0
    assert second_study["study_date"] == pd.Timestamp("2180-06-26")
    # A study without a label row keeps its image, unlabelled; a label row without images is ledgered.
    unlabelled = cat.loc["68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714"]
    assert unlabelled[["enlarged_heart", "edema"]].isna().all() and unlabelled["age"] == 86
    assert result.summary["images_without_label_row"] == 1
    assert result.summary["other_input_rows_in_ledger"] == {"labels_without_image": 1}
    assert result.ledger["item"].tolist() == ["s50578979"] and result.summary["left_out"] == 0


# --- DICOM folders -------------------------------------------------------------------------------------------

def write_dicom(path, uid, patient, sex, age, view, date, pixels=True):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, uid
    ds.PatientID, ds.PatientSex, ds.PatientAge, ds.ViewPosition, ds.StudyDate = patient, sex, age, view, date
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    if pixels:
        ds.PixelData = np.arange(64, dtype=np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def dicom_folder(tmp_path):
    images = tmp_path / "archive"
    write_dicom(images / "2020" / "s1" / "img1.dcm", "1.2.3.1", "PAT1", "F", "065Y", "PA", "20200102")
    write_dicom(images / "2020" / "s1" / "img2.dcm", "1.2.3.2", "PAT1", "F", "065Y", "LL", "20200102")
    write_dicom(images / "2021" / "img3", "1.2.3.3", "PAT2", "M", "040Y", "AP", "20210304")
    write_dicom(images / "2021" / "sr.dcm", "1.2.3.4", "PAT2", "M", "040Y", "", "20210304", pixels=False)
    write(images / "README.txt", "exported by the PACS on 2021-03-05\n")
    write(tmp_path / "reports.csv", "SOPInstanceUID,report\n1.2.3.1,Сердце расширено влево.\n"
                                    "1.2.3.3,Сколиоз грудного отдела позвоночника.\n9.9.9,Норма.\n")
    return tmp_path


def test_dicom_folder_with_a_side_table(dicom_folder, root, keys_file):
    source = {"format": "dicom", "images": str(dicom_folder / "archive"), "annotations": str(dicom_folder / "reports.csv"),
              "columns": {"image_id": "SOPInstanceUID", "text": "report"}, "vocabulary": str(root / "config/labels/ru.yaml")}
    result = build_catalog(source, keys_file, base="/")
    cat = result.catalog.set_index("image_id")
    assert list(cat.index) == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
    assert list(cat["sex"]) == ["F", "F", "M"] and list(cat["age"]) == [65, 65, 40]
    assert list(cat["view"]) == ["PA", "LAT", "AP"]
    assert cat.loc["1.2.3.3", "study_date"] == pd.Timestamp("2021-03-04")
    assert cat.loc["1.2.3.1", "patient_id"] == cat.loc["1.2.3.2", "patient_id"] != cat.loc["1.2.3.3", "patient_id"]
    assert cat.loc["1.2.3.1", "enlarged_heart"] == 1 and cat.loc["1.2.3.3", "scoliosis"] == 1
    assert pd.isna(cat.loc["1.2.3.2", "enlarged_heart"])  # no note: nothing was assessed
    assert cat.loc["1.2.3.3", "path"].endswith("archive/2021/img3")
    reasons = result.ledger.set_index("item")["reason"].to_dict()
    assert reasons == {"2021/sr.dcm": "no_pixel_data", "README.txt": "not_dicom", "9.9.9": "annotation_without_image"}
    summary = result.summary
    assert summary["rows_read"] == 5 and summary["kept"] == 3 and summary["left_out"] == 2
    assert summary["other_input_rows_in_ledger"] == {"annotation_without_image": 1}


def test_dicom_folder_alone_joined_on_file_stems(dicom_folder, root, keys_file):
    source = {"format": "dicom", "images": str(dicom_folder / "archive"), "join_on": "file_stem"}
    result = build_catalog(source, keys_file, base="/")
    assert list(result.catalog["image_id"]) == ["img1", "img2", "img3"]
    assert result.catalog["enlarged_heart"].isna().all()  # no notes: no labels
    write(dicom_folder / "reports.csv", "file,report\nimg2,Сердце расширено влево.\n")
    source.update(annotations=str(dicom_folder / "reports.csv"), columns={"image_id": "file", "text": "report"},
                  vocabulary=str(root / "config/labels/ru.yaml"))
    cat = build_catalog(source, keys_file, base="/").catalog.set_index("image_id")
    assert cat.loc["img2", "enlarged_heart"] == 1 and pd.isna(cat.loc["img1", "enlarged_heart"])


def test_a_large_dicom_folder_is_read_by_worker_processes_with_the_same_result(dicom_folder, keys_file):
    """Past 512 files the headers are read by a process pool; rows, order, ledger and summary stay the same."""
    for i in range(600):
        write_dicom(dicom_folder / "archive" / "bulk" / f"{i:04d}.dcm", f"1.2.9.{i}", f"P{i % 50}", "MF"[i % 2],
                    f"{20 + i % 60:03d}Y", "PA", "20220101", pixels=i % 97 != 0)
    source = {"format": "dicom", "images": str(dicom_folder / "archive")}
    serial = build_catalog(source, keys_file, base="/", workers=1)
    pooled = build_catalog(source, keys_file, base="/", workers=2)
    assert len(serial.catalog) == 3 + 600 - 7  # every 97th bulk file has no pixel data
    pd.testing.assert_frame_equal(serial.catalog, pooled.catalog)
    pd.testing.assert_frame_equal(serial.ledger, pooled.ledger)
    assert serial.summary == pooled.summary and serial.summary["left_out_by_reason"]["no_pixel_data"] == 8


def test_dicom_errors(tmp_path, keys_file):
    with pytest.raises(CxrflowError, match="source.images: no such folder"):
        build_catalog({"format": "dicom", "images": str(tmp_path / "nowhere")}, keys_file, base="/")
    write(tmp_path / "archive" / "notes.txt", "not an image")
    with pytest.raises(CxrflowError, match=r"no image survived ingest .*not_dicom"):
        build_catalog({"format": "dicom", "images": str(tmp_path / "archive")}, keys_file, base="/")


def test_vindr_reads_sex_age_and_view_from_the_dicom_headers(tmp_path, root, keys_file):
    write(tmp_path / "train.csv", VINDR)
    write_dicom(tmp_path / "train" / "img_a.dicom", "1.2.3.1", "", "F", "061Y", "PA", "")
    write_dicom(tmp_path / "train" / "img_b.dicom", "1.2.3.2", "", "M", "", "AP", "")
    write_dicom(tmp_path / "train" / "img_c.dicom", "1.2.3.3", "", "", "", "", "")
    source = {"format": "vindr", "annotations": str(tmp_path / "train.csv"), "images": str(tmp_path / "train"),
              "label_map": str(root / "config/labels/vindr.yaml")}
    result = build_catalog(source, keys_file, base="/")
    cat = result.catalog.set_index("image_id")
    assert list(cat.index) == ["img_a", "img_b", "img_c"]
    assert cat.loc["img_a", "sex"] == "F" and cat.loc["img_a", "age"] == 61 and cat.loc["img_b", "view"] == "AP"
    assert pd.isna(cat.loc["img_c", "sex"]) and pd.isna(cat.loc["img_b", "age"])
    assert result.summary["left_out_by_reason"] == {"missing_file": 1}  # img_d has no file


# --- pixels only: the image index's rows, without any label work ----------------------------------------------

NIH = """Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position
00000001_000.png,Cardiomegaly,0,1,58,M,PA
00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA
00000002_000.png,No Finding,0,2,81,F,AP
00000002_000.png,No Finding,1,2,81,F,AP
00000003_000.png,Hernia,0,3,74,F,PA
00000003_001.png,Hernia,1,3,74,M,PA
"""
PADCHEST = """ImageID,ImageDir,PatientID,PatientSex_DICOM,Projection,StudyDate_DICOM,PatientBirth,Labels,Report
n1.png,0,p1,F,PA,20150101,1950,['normal'],normal
n2.png,0,p2,F,PA,20150102,1960,"['exclude']",
n3.png,0,p3,M,L,20150103,1970,"['cardiomegaly'",cardiomegaly
n4.png,1,,F,PA,20150104,1980,"['normal']",
n5.png,1,p5,F,AP,20150105,1990,,
"""


def _adapter_cases(tmp_path, root):
    """(name, labelled source, the setting keys pixels only drops): one source per adapter, each with rows that
    ingest leaves out or flags, so that an adapter whose rows differed without labels would show it."""
    write(tmp_path / "notes.csv", NOTES + "a1,007,Ж,65,PA,24.05.2021,Норма.\nc1,009,Ж,50,PA,01.01.2020,Норма.\n"
                                          "c2,009,М,50,PA,01.01.2020,Норма.\n,010,Ж,50,PA,01.01.2020,Норма.\n")
    yield "freetext", freetext(tmp_path, root, sex_conflict="unknown"), {"vocabulary"}
    write_dicom(tmp_path / "archive" / "a.dcm", "1.2.3.1", "PAT1", "F", "065Y", "PA", "20200102")
    write_dicom(tmp_path / "archive" / "b.dcm", "1.2.3.2", "PAT2", "M", "040Y", "AP", "20210304", pixels=False)
    write(tmp_path / "archive" / "README.txt", "not an image\n")
    write(tmp_path / "reports.csv", "SOPInstanceUID,report\n1.2.3.1,Сердце расширено влево.\n9.9.9,Норма.\n")
    yield "dicom", {"format": "dicom", "images": str(tmp_path / "archive"),
                    "annotations": str(tmp_path / "reports.csv"),
                    "columns": {"image_id": "SOPInstanceUID", "text": "report"},
                    "vocabulary": str(root / "config/labels/ru.yaml")}, {"vocabulary"}
    write(tmp_path / "nih.csv", NIH)
    yield "nih", {"format": "nih", "annotations": str(tmp_path / "nih.csv"), "check_files": False,
                  "label_map": str(root / "config/labels/nih.yaml")}, {"label_map"}
    source = chexpert(tmp_path, root, check_files=True, images=str(tmp_path), uncertain="positive")
    first = tmp_path / "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    first.parent.mkdir(parents=True, exist_ok=True)
    first.write_bytes(b"\xff\xd8\xff")
    yield "chexpert", source, {"label_map", "uncertain"}
    write(tmp_path / "padchest.csv", PADCHEST)
    yield "padchest", {"format": "padchest", "annotations": str(tmp_path / "padchest.csv"), "check_files": False,
                       "label_map": str(root / "config/labels/padchest.yaml")}, {"label_map"}
    write(tmp_path / "vindr.csv", VINDR + ",No finding,14,R1,,,,\n")
    write(tmp_path / "image_labels.csv", VINDR_IMAGE_LABELS)
    write_dicom(tmp_path / "vindr" / "img_a.dicom", "1.2.3.1", "", "F", "061Y", "PA", "")
    write_dicom(tmp_path / "vindr" / "img_e.dicom", "1.2.3.5", "", "M", "", "AP", "")
    yield "vindr", {"format": "vindr", "annotations": str(tmp_path / "vindr.csv"), "images": str(tmp_path / "vindr"),
                    "labels": str(tmp_path / "image_labels.csv"), "label_map": str(root / "config/labels/vindr.yaml"),
                    "combine": "any"}, {"label_map", "combine"}
    write(tmp_path / "metadata.csv", MIMIC_METADATA + MIMIC_METADATA.splitlines()[1] + "\n")
    write(tmp_path / "labels.csv", MIMIC_LABELS)
    write(tmp_path / "patients.csv", MIMIC_PATIENTS)
    yield "mimic", {"format": "mimic", "annotations": str(tmp_path / "metadata.csv"), "check_files": False,
                    "labels": str(tmp_path / "labels.csv"), "patients": str(tmp_path / "patients.csv"),
                    "label_map": str(root / "config/labels/mimic.yaml")}, {"label_map", "labels"}


def test_pixels_only_keeps_the_same_images_in_the_same_order_with_the_same_ledger(tmp_path, root, keys_file):
    pixel_columns = ["image_id", "sex", "age", "view", "study_date", "path"]
    seen = []
    for name, source, label_settings in _adapter_cases(tmp_path, root):
        labelled = build_catalog(source, keys_file, base="/")
        # Without the label settings (and without keys or notes), reading any of them would fail.
        bare = {k: v for k, v in source.items() if k not in label_settings}
        if name == "freetext":
            bare["columns"] = {k: v for k, v in source["columns"].items() if k != "text"}
        pixels = build_catalog(bare, None, base="/", labels=False)
        assert list(pixels.catalog.columns) == CATALOG_COLUMNS, name
        pd.testing.assert_frame_equal(pixels.catalog[pixel_columns], labelled.catalog[pixel_columns], obj=name)
        assert pixels.catalog[["patient_id", "text"]].isna().all().all(), name
        assert pixels.catalog["quality_tag"].eq(0).all(), name
        images = {**labelled.summary["left_out_by_reason"], **labelled.summary["flagged"]}
        assert images, f"{name}: the case leaves no image out, so it proves nothing"
        about_images = lambda ledger: ledger[ledger["reason"].isin(images)].reset_index(drop=True)  # noqa: E731
        pd.testing.assert_frame_equal(about_images(pixels.ledger), about_images(labelled.ledger), obj=name)
        for count in ("rows_read", "kept", "left_out", "left_out_by_reason", "flagged", "patients"):
            assert pixels.summary[count] == labelled.summary[count], (name, count)
        assert pixels.summary["positives_by_key"] == {}
        seen.append(name)
    assert seen == list(ADAPTERS)  # every adapter has its case


def test_pixels_only_reads_no_vocabulary_and_needs_no_pseudonym_key(tmp_path, root, keys_file, monkeypatch):
    write(tmp_path / "notes.csv", NOTES)
    write(tmp_path / "broken.yaml", "terms: [unclosed\n  - : :\n")
    source = {**freetext(tmp_path, root), "vocabulary": str(tmp_path / "broken.yaml")}
    with pytest.raises(CxrflowError, match="broken.yaml"):
        build_catalog(source, keys_file, base="/")
    for variable in ("CXRFLOW_PSEUDONYM_KEY", "CXRFLOW_PSEUDONYM_KEY_FILE"):
        monkeypatch.delenv(variable, raising=False)
    cat = build_catalog(source, None, base="/", labels=False).catalog
    assert cat["image_id"].tolist() == ["a1", "a2", "b1"] and cat["view"].tolist() == ["PA", "AP", "LAT"]
