"""The public datasets' adapters (NIH ChestX-ray14, CheXpert, PadChest, VinDr-CXR, MIMIC-CXR-JPG): where each
keeps its ids, patients, demographics and native labels. The labels go through a label map (`native`)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pandas as pd

from cxrflow.errors import CxrflowError
from cxrflow.ingest.dicom import demographics_from_headers
from cxrflow.ingest.fields import (count_unrecognized, missing_text, normalize_age, normalize_date, normalize_sex,
                                   normalize_view, per_distinct, stripped, whole_years)
from cxrflow.ingest.native import (OTHER_KEY, LabelMap, column_label_matrix, contradicted_normal, int8_columns,
                                   load_label_map, native_label_matrix, refuse_quality_tags)
from cxrflow.ingest.record import Report, require_keys
from cxrflow.ingest.tables import read_table, record_lines, require_columns


def _annotations(source: dict, keys: list[str] | None, base: Path, report: Report,
                 fmt: str) -> tuple[Path, LabelMap | None]:
    """A public source's annotation table and its label map (None in pixel mode, `keys` None)."""
    require_keys(source, ["annotations"], fmt)
    path = base / source["annotations"]
    report.source = str(path)
    return path, (load_label_map(source, base, keys) if keys is not None else None)


def _read(path: Path, report: Report, usecols) -> pd.DataFrame:
    """The table, its file lines kept in the report so that ledger rows name them."""
    table = read_table(path, usecols=usecols)
    report.line_numbers = table.attrs.get("record_lines")
    return table


def adapt_nih(source: dict, keys: list[str] | None, base: Path, report: Report) -> pd.DataFrame:
    """NIH ChestX-ray14 `Data_Entry_2017*.csv`: "Finding Labels" split on "|", "No Finding" meaning none."""
    path, label_map = _annotations(source, keys, base, report, "nih")
    labelled = keys is not None
    table = _read(path, report, usecols=["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender",
                                              "Patient Sex", "View Position"])
    if "Patient Gender" not in table.columns and "Patient Sex" in table.columns:
        table = table.rename(columns={"Patient Sex": "Patient Gender"})  # the column's name in some releases
    require_columns(table, ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender",
                            "View Position"], path)
    if labelled:
        labels, _, tagged = native_label_matrix(table["Finding Labels"], parse_nih_labels, label_map, keys, report)
    else:  # the quality tags are the label map's: a pixels-only frame has none
        tagged = pd.Series(False, index=table.index)
    image_id = stripped(table["Image Index"])
    frame = pd.DataFrame({
        "image_id": image_id,
        "patient_id": stripped(table["Patient ID"]),
        "sex": normalize_sex(table["Patient Gender"], report),
        "age": normalize_age(table["Patient Age"], report),
        "view": normalize_view(table["View Position"], report),
        "study_date": pd.Series(pd.NaT, index=table.index, dtype="datetime64[s]"),  # NIH publishes no dates
        "path": image_id,
        "text": table["Finding Labels"].astype("string") if labelled else missing_text(table.index),
        "quality_tag": _flag(tagged),
    })
    return pd.concat([frame, labels], axis=1) if labelled else frame


def parse_nih_labels(value: str) -> list[str]:
    """"Cardiomegaly|Effusion" -> its labels; "No Finding" is a label too (the map sends it to `normal`)."""
    return [label.strip() for label in value.split("|") if label.strip()]


def _flag(mask: pd.Series) -> pd.Series:
    return pd.Series(mask.to_numpy(dtype=np.int8), index=mask.index, dtype="Int8")


def adapt_chexpert(source: dict, keys: list[str] | None, base: Path, report: Report) -> pd.DataFrame:
    """CheXpert `train.csv` / `valid.csv`: one column per observation (1, 0, -1 uncertain, blank); the patient
    is the `patientNNNNN` part of `Path`; the view comes from "Frontal/Lateral" and "AP/PA"."""
    path, label_map = _annotations(source, keys, base, report, "chexpert")
    labelled = keys is not None
    metadata = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]
    table = _read(path, report, usecols=[*metadata, *(label_map.labels if labelled else ())])
    require_columns(table, ["Path", "Sex", "Age", "Frontal/Lateral"], path)
    if labelled:
        labels, text = column_label_matrix(table, label_map, keys, source, path, report, metadata)
    else:
        text = missing_text(table.index)
    image_path = stripped(table["Path"])
    lateral = table["Frontal/Lateral"].str.strip().str.lower().eq("lateral").fillna(False)
    frontal_view = normalize_view(table["AP/PA"], report) if "AP/PA" in table.columns else missing_text(table.index)
    frame = pd.DataFrame({
        "image_id": image_path,
        "patient_id": image_path.str.extract(r"(?:^|/)(patient\d+)(?:/|$)", expand=False).astype("string"),
        "sex": normalize_sex(table["Sex"], report),
        "age": normalize_age(table["Age"], report),
        "view": frontal_view.mask(lateral, "LAT"),
        "study_date": pd.Series(pd.NaT, index=table.index, dtype="datetime64[s]"),  # CheXpert publishes no dates
        "path": image_path,
        "text": text,
    })
    return pd.concat([frame, labels], axis=1) if labelled else frame


def adapt_padchest(source: dict, keys: list[str] | None, base: Path, report: Report) -> pd.DataFrame:
    """PadChest's label table: `Labels` is a Python-list string; the rows where it does not parse are ledgered."""
    path, label_map = _annotations(source, keys, base, report, "padchest")
    labelled = keys is not None
    table = _read(path, report, usecols=["ImageID", "ImageDir", "StudyDate_DICOM", "PatientID", "PatientBirth",
                                              "PatientSex_DICOM", "Projection", "Labels", *["Report"] * labelled])
    require_columns(table, ["ImageID", "PatientID", "PatientSex_DICOM", "Projection", "Labels"], path)
    if labelled:
        labels, unparseable, tagged = native_label_matrix(table["Labels"], parse_padchest_labels, label_map, keys,
                                                          report)
    else:  # a label list that does not parse leaves its image out whatever the map says: pixels only too
        unparseable = per_distinct(table["Labels"], lambda uniques: pd.Series(
            [parse_padchest_labels(v) is None for v in uniques], dtype="boolean")).fillna(False).astype(bool)
        tagged = pd.Series(False, index=table.index)
    study_date = (normalize_date(table["StudyDate_DICOM"], "%Y%m%d", report) if "StudyDate_DICOM" in table.columns
                  else pd.Series(pd.NaT, index=table.index, dtype="datetime64[s]"))
    birth = pd.to_numeric(table["PatientBirth"], errors="coerce") if "PatientBirth" in table.columns else np.nan
    image_dir = table["ImageDir"].astype("string") + "/" if "ImageDir" in table.columns else ""
    image_id = stripped(table["ImageID"])
    frame = pd.DataFrame({
        "image_id": image_id,
        "patient_id": stripped(table["PatientID"]),
        "sex": normalize_sex(table["PatientSex_DICOM"], report),
        "age": whole_years(study_date.dt.year - birth),
        "view": normalize_view(table["Projection"], report),
        "study_date": study_date,
        "path": (image_dir + image_id).astype("string"),
        "text": table["Report"].astype("string") if "Report" in table.columns else missing_text(table.index),
        "quality_tag": _flag(tagged),
    })
    frame["_reason"] = pd.Series(pd.NA, index=frame.index, dtype="string").mask(unparseable | table["Labels"].isna(),
                                                                                "unparseable_labels")
    frame["_detail"] = ("Labels = " + table["Labels"].fillna("(empty)").str.slice(0, 80)).where(
        frame["_reason"].notna())
    return pd.concat([frame, labels], axis=1) if labelled else frame

_QUOTED_LIST = re.compile(r"\[\s*(?:'[^'\\]*'\s*(?:,\s*'[^'\\]*'\s*)*)?\]")

_QUOTED = re.compile(r"'([^'\\]*)'")


def parse_padchest_labels(value):
    """PadChest writes labels as a Python list literal with stray spaces; None when it cannot be parsed."""
    if not isinstance(value, str):
        return None
    if _QUOTED_LIST.fullmatch(value):  # the common, escape-free case: what literal_eval gives, 10x faster
        return [label.strip() for label in _QUOTED.findall(value) if label.strip()]
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None
    if not isinstance(parsed, list):
        return None
    return [str(label).strip() for label in parsed if str(label).strip()]


def adapt_vindr(source: dict, keys: list[str] | None, base: Path, report: Report) -> pd.DataFrame:
    """VinDr-CXR: the box annotations (source.annotations: `image_id`, `rad_id`, `class_name`; one row per
    radiologist per box, or one "No finding" row: the Kaggle VinBigData table or PhysioNet's
    annotations_train.csv) and, when given, PhysioNet's image-level labels (source.labels:
    image_labels_train.csv, one row per image and radiologist, one 0/1 column per label, the global labels COPD,
    Lung tumor, Pneumonia, Tuberculosis and Other diseases included). Each radiologist's labels from both tables
    are one vote per key; source.combine turns an image's votes into its label: "any" radiologist, or a
    "majority" of those who read it. `normal` ("No finding") is 1 only when no finding won.

    A key is labelled only where the tables hold a class that maps to it: a class the box table never names,
    and that the image-level table has no column for, leaves its key missing for every image (the Kaggle table
    has no Emphysema, Rib fracture, Edema, Clavicle fracture or global labels)."""
    require_keys(source, ["annotations"], "vindr")
    path = base / source["annotations"]
    report.source = str(path)
    labelled = keys is not None
    if labelled:
        label_map = load_label_map(source, base, keys)
        refuse_quality_tags(label_map, "vindr")
        combine = source.get("combine", "majority")
        if combine not in ("any", "majority"):
            raise CxrflowError(f"source.combine: {combine!r} is not one of ['any', 'majority']")
    table = read_table(path, source.get("encoding", "auto"), source.get("sep"))
    require_columns(table, ["image_id", "class_name"], path)
    image_id, reader = _vindr_ids(table, path, report)
    class_name = stripped(table["class_name"])[image_id.notna()]
    report.facts["annotation_rows"] = len(table)
    rows = pd.DataFrame({"image": image_id.dropna(), "reader": reader[image_id.notna()], "class": class_name})
    classes_held = set(class_name.dropna())
    if source.get("labels"):  # images the box table lacks are here: pixels only read it too, for its ids
        image_level, held = _vindr_image_labels(base / source["labels"], source, report, labelled)
        rows = pd.concat([rows, image_level], ignore_index=True)
        classes_held |= held

    image_codes, images = pd.factorize(rows["image"])
    if not labelled:
        return _vindr_frame(pd.Series(images, dtype="string"), missing_text(pd.RangeIndex(len(images))), source, base,
                            report)
    reader_codes, _ = pd.factorize(rows["reader"])
    pairs = np.unique(np.stack([image_codes, reader_codes], axis=1), axis=0)
    n_readers = np.bincount(pairs[:, 0], minlength=len(images))
    key_index = {k: i for i, k in enumerate(keys)}
    mapping = label_map.labels
    unaccounted = label_map.unaccounted(classes_held)
    if unaccounted:  # an unknown class is a finding all the same: it must never make an image look normal
        counts = rows["class"][rows["class"].isin(unaccounted)].value_counts()
        report.facts["labels_not_in_label_map"] = {str(k): int(v) for k, v in counts.items()}
        mapping = mapping | dict.fromkeys(unaccounted, OTHER_KEY) if OTHER_KEY in key_index else mapping
    class_codes, classes = pd.factorize(rows["class"], use_na_sentinel=True)
    class_key = np.array([key_index[mapping[c]] if c in mapping else -1 for c in classes] + [-1], dtype=np.int64)
    row_key = class_key[class_codes]
    # One vote per (image, radiologist, key), however many boxes the radiologist drew.
    votes = np.unique(np.stack([image_codes, reader_codes, row_key], axis=1)[row_key >= 0], axis=0)
    counts = np.zeros((len(images), len(keys)), dtype=np.int32)
    np.add.at(counts, (votes[:, 0], votes[:, 2]), 1)
    positive = counts >= 1 if combine == "any" else 2 * counts > n_readers[:, None]
    values = positive.astype(np.int8)
    missing = np.ones_like(values, dtype=bool)
    missing[:, sorted({key_index[mapping[c]] for c in classes_held if c in mapping})] = False
    report.facts["normal_contradicted_by_a_finding"] = int(contradicted_normal(values, missing, keys).sum())
    labels = int8_columns(values, missing, np.arange(len(images)), keys, pd.RangeIndex(len(images)))

    named = pd.DataFrame({"image": image_codes, "class": rows["class"].to_numpy()}).dropna().drop_duplicates()
    text = named.sort_values("class").groupby("image")["class"].agg("|".join)
    images = pd.Series(images, dtype="string")
    frame = _vindr_frame(images, pd.Series(text.reindex(range(len(images))).to_numpy(), dtype="string"), source,
                         base, report)
    return pd.concat([frame, labels], axis=1)


def _vindr_frame(images: pd.Series, text: pd.Series, source: dict, base: Path, report: Report) -> pd.DataFrame:
    """The catalog columns of VinDr's images (`images`: their ids, in order)."""
    frame = pd.DataFrame({
        # VinDr-CXR publishes no patient ids: each image counts as its own patient.
        "image_id": images,
        "patient_id": images,
        # Neither table holds sex, age or view: missing unless the DICOM headers are read (check_files).
        "sex": missing_text(images.index),
        "age": pd.array([pd.NA] * len(images), dtype="Int16"),
        "view": missing_text(images.index),
        "study_date": pd.Series(pd.NaT, index=images.index, dtype="datetime64[s]"),
        "path": (images + ".dicom").astype("string"),
        "text": text,
    })
    report.facts["patient_id"] = "VinDr-CXR has none: each image counts as its own patient"
    if source.get("check_files", True) and source.get("images"):
        demographics_from_headers(frame, base / source["images"], report)
    return frame


def _vindr_ids(table: pd.DataFrame, path: Path, report: Report) -> tuple[pd.Series, pd.Series]:
    """Image ids (rows without one go to the ledger) and reader ids (`rad_id` or `rad_ID`; absent: one reader)."""
    image_id = stripped(table["image_id"])
    no_id = image_id.isna()
    report.unmatched("<" + record_lines(table, table.index[no_id.to_numpy()]) + ">", "no_image_id",
                     f"a row of {path.name} without image_id")
    rad = next((c for c in table.columns if c.lower() == "rad_id"), None)
    reader = (stripped(table[rad]).fillna("consensus") if rad else
              pd.Series("consensus", index=table.index, dtype="string"))
    return image_id, reader


def _vindr_image_labels(path: Path, source: dict, report: Report, labelled: bool = True
                        ) -> tuple[pd.DataFrame, set]:
    """PhysioNet's image_labels_train.csv as (image, reader, class) rows, one per label a reader marked 1, and
    the classes the table has columns for. Not `labelled`: only who read which image."""
    wide = read_table(path, source.get("encoding", "auto"), source.get("sep"))
    require_columns(wide, ["image_id"], path)
    image_id, reader = _vindr_ids(wide, path, report)
    known = image_id.notna()
    label_columns = [c for c in wide.columns if c != "image_id" and c.lower() != "rad_id"] if labelled else []
    parts = [pd.DataFrame({"image": image_id[known], "reader": reader[known],
                           "class": pd.Series(pd.NA, index=wide.index, dtype="string")[known]})]  # who read what
    for name in label_columns:
        def states(uniques, name=name):
            mapped = uniques.astype("string").str.strip().map({"1": 1, "1.0": 1, "0": 0, "0.0": 0}).astype("Int8")
            return count_unrecognized(uniques, mapped, report, f"label {name!r} in {path.name}")

        marked = per_distinct(wide[name], states).eq(1).fillna(False).to_numpy(dtype=bool) & known.to_numpy()
        parts.append(pd.DataFrame({"image": image_id[marked], "reader": reader[marked],
                                   "class": pd.Series(name, index=wide.index, dtype="string")[marked]}))
    report.facts["image_label_rows"] = len(wide)
    return pd.concat(parts, ignore_index=True), set(label_columns)


def adapt_mimic(source: dict, keys: list[str] | None, base: Path, report: Report) -> pd.DataFrame:
    """MIMIC-CXR-JPG: the metadata table (source.annotations: one row per image) joined with the CheXpert-style
    label table (source.labels: one row per study) on subject_id and study_id. MIMIC-CXR holds no sex or age;
    MIMIC-IV's patients table (source.patients: subject_id, gender, anchor_age, anchor_year) adds them."""
    labelled = keys is not None
    require_keys(source, ["annotations", "labels"] if labelled else ["annotations"], "mimic")
    path = base / source["annotations"]
    report.source = str(path)
    label_map = load_label_map(source, base, keys) if labelled else None
    table = _read(path, report, usecols=["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate"])
    require_columns(table, ["dicom_id", "subject_id", "study_id", "ViewPosition"], path)
    for name in ("subject_id", "study_id"):
        table[name] = stripped(table[name])
    # The label table (one row per study) names no image of its own: pixels only never read it.
    labels, text = (_mimic_labels(table, label_map, keys, source, base, path, report) if labelled
                    else (None, missing_text(table.index)))

    study_date = (normalize_date(table["StudyDate"], "%Y%m%d", report) if "StudyDate" in table.columns
                  else pd.Series(pd.NaT, index=table.index, dtype="datetime64[s]"))
    sex, age = missing_text(table.index), pd.Series(pd.NA, index=table.index, dtype="Int16")
    if source.get("patients"):
        patients_path = base / source["patients"]
        patients = read_table(patients_path, usecols=["subject_id", "gender", "anchor_age", "anchor_year"])
        require_columns(patients, ["subject_id", "gender", "anchor_age", "anchor_year"], patients_path)
        patients = patients.assign(subject_id=stripped(patients["subject_id"])).drop_duplicates("subject_id")
        row = pd.Index(patients["subject_id"]).get_indexer(table["subject_id"])
        known = row >= 0
        report.facts["images_without_patient_row"] = int((~known).sum())
        pick = patients.iloc[np.where(known, row, 0)].reset_index(drop=True).set_axis(table.index)
        sex = normalize_sex(pick["gender"], report).mask(~known, pd.NA)
        anchor_age = pd.to_numeric(pick["anchor_age"], errors="coerce")
        anchor_year = pd.to_numeric(pick["anchor_year"], errors="coerce")
        # MIMIC shifts dates and anchor_year alike, so their difference is real time.
        age = whole_years((anchor_age + (study_date.dt.year - anchor_year).fillna(0)).where(known))
    subject, study = table["subject_id"], table["study_id"]
    frame = pd.DataFrame({
        "image_id": stripped(table["dicom_id"]),
        "patient_id": subject,
        "sex": sex,
        "age": age,
        "view": normalize_view(table["ViewPosition"], report),
        "study_date": study_date,
        "path": ("files/p" + subject.str.slice(0, 2) + "/p" + subject + "/s" + study + "/" + table["dicom_id"]
                 + ".jpg").astype("string"),
        "text": text.astype("string"),
    })
    return pd.concat([frame, labels], axis=1) if labelled else frame


def _mimic_labels(table: pd.DataFrame, label_map: LabelMap, keys: list[str], source: dict, base: Path, path: Path,
                  report: Report) -> tuple[pd.DataFrame, pd.Series]:
    """Each image's labels and text from its study's row of the label table (source.labels)."""
    labels_path = base / source["labels"]
    studies = read_table(labels_path, usecols=["subject_id", "study_id", *label_map.labels])
    columns_in_labels = studies.attrs["columns_in_file"]  # for the labels the map does not account for
    require_columns(studies, ["subject_id", "study_id"], labels_path)
    study_key = ["subject_id", "study_id"]
    for name in study_key:
        studies[name] = stripped(studies[name])
    repeated = studies.duplicated(study_key, keep="first")
    report.unmatched("s" + studies.loc[repeated, "study_id"], "duplicate_label_row",
                     record_lines(studies, studies.index[repeated]) + f" of {labels_path.name}")
    studies = studies[~repeated]
    imaged = pd.MultiIndex.from_frame(table[study_key])
    labelled = pd.MultiIndex.from_frame(studies[study_key])
    orphan = ~labelled.isin(imaged)
    report.unmatched("s" + studies.loc[orphan, "study_id"], "labels_without_image",
                     f"a row of {labels_path.name} whose study has no image in {path.name}")
    # Each image takes its study's row: a positional join through the study index.
    position = labelled.get_indexer(imaged)
    studies = studies.reset_index(drop=True)
    studies.attrs["columns_in_file"] = columns_in_labels
    study_labels, study_text = column_label_matrix(studies, label_map, keys, source, labels_path, report,
                                                   study_key)
    unlabelled = position < 0
    take = np.where(unlabelled, 0, position)
    labels = study_labels.iloc[take].reset_index(drop=True).set_axis(table.index)
    if unlabelled.any():
        labels.loc[unlabelled, :] = pd.NA
    report.facts["images_without_label_row"] = int(unlabelled.sum())
    text = pd.Series(study_text.array.take(take), index=table.index).mask(unlabelled, pd.NA)
    return labels, text
