"""The free-text adapter: a table with one row per image and a note, labelled by a vocabulary. Like every
adapter it returns `CATALOG_COLUMNS` and, unless `keys` is None (pixels only), one 1/0/missing column per key."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cxrflow.errors import CxrflowError
from cxrflow.ingest.fields import missing_text, normalize_age, normalize_date, normalize_sex, normalize_view, stripped
from cxrflow.ingest.record import Report, require_keys
from cxrflow.ingest.tables import read_table, require_columns
from cxrflow.labels import label_texts, load_vocabulary
from cxrflow.table_checks import read_text_file


def adapt_freetext(source: dict, keys: list[str] | None, base: Path, report: Report) -> pd.DataFrame:
    """A table with one row per image and a free-text annotation, labelled by a vocabulary (config/labels/ru.yaml)."""
    labelled = keys is not None
    require_keys(source, ["annotations", "columns"] + ["vocabulary"] * labelled, "freetext")
    path = base / source["annotations"]
    report.source = str(path)
    if labelled:
        read_text_file(base / source["vocabulary"], "source.vocabulary")  # unreadable: one line, not a traceback
        vocab = load_vocabulary(base / source["vocabulary"], keys)  # before the table: a config error comes first
    columns = source["columns"]
    if not labelled:  # the notes are the label branch's: pixels only never read them
        columns = {name: column for name, column in columns.items() if name != "text"}
    for name in ("image_id", "text") if labelled else ("image_id",):
        if not columns.get(name):
            raise CxrflowError(f"source.columns.{name}: required for source.format freetext")
    required = [columns["image_id"], columns["text"]] if labelled else [columns["image_id"]]
    if source.get("check_files", True):
        if not columns.get("file"):
            raise CxrflowError("source.columns.file: required unless source.check_files is false")
        required.append(columns["file"])
    table = read_table(path, source.get("encoding", "auto"), source.get("sep"),
                       usecols=[c for c in columns.values() if c])
    report.line_numbers = table.attrs.get("record_lines")
    require_columns(table, required, path)

    def column(name):
        mapped = columns.get(name)
        if mapped is None:
            return missing_text(table.index)
        if mapped not in table.columns:
            optional = ("" if name in ("image_id", "text", "file")
                        else f"; set source.columns.{name}: null if it has none")
            raise CxrflowError(f"{path}: column {mapped!r} (source.columns.{name}) is not in the table; "
                               f"it has {table.attrs.get('columns_in_file', list(table.columns))}{optional}")
        return table[mapped]

    image_id = stripped(column("image_id"))
    if columns.get("patient_id"):
        patient_id = stripped(column("patient_id"))
    else:
        patient_id = image_id  # no patient column: each image is its own patient, and the summary says so
        report.facts["patient_id"] = "not given: each image counts as its own patient"
    frame = pd.DataFrame({
        "image_id": image_id,
        "patient_id": patient_id,
        "sex": normalize_sex(column("sex"), report),
        "age": normalize_age(column("age"), report),
        "view": normalize_view(column("view"), report),
        "study_date": normalize_date(column("date"), source.get("date_format"), report),
        "path": stripped(column("file")),
        "text": column("text").astype("string"),
    })
    del table
    if not labelled:
        return frame
    labels = label_texts(frame["text"], vocab, keys, uncertain=source.get("uncertain", "missing"))
    return pd.concat([frame, labels], axis=1)
