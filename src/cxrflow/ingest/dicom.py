"""The DICOM adapter: a folder of DICOM files whose tags (read without pixel data) give id, patient, sex, age,
view and date, with an optional side table of notes; and the header reading that VinDr's adapter shares."""

from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd

from cxrflow.archive import check_paths, list_archive
from cxrflow.errors import CxrflowError
from cxrflow.ingest.fields import missing_text, normalize_date, normalize_view, stripped
from cxrflow.ingest.record import Report, require_keys
from cxrflow.ingest.tables import read_table, record_lines, require_columns
from cxrflow.labels import label_texts, load_vocabulary
from cxrflow.table_checks import read_text_file


def adapt_dicom(source: dict, keys: list[str] | None, base: Path, report: Report) -> pd.DataFrame:
    """A folder of DICOM files (searched recursively) and no table: id, sex, age, view and date come from the
    tags, read without pixel data. An optional side table (source.annotations) brings the free text, joined
    on the SOPInstanceUID or the file name stem (source.join_on)."""
    require_keys(source, ["images"], "dicom")
    root = base / source["images"]
    report.source = str(root)
    if not root.is_dir():
        raise CxrflowError(f"source.images: no such folder: {root}")
    join_on = source.get("join_on", "sop_instance_uid")
    vocab = None
    if source.get("annotations") and keys is not None:  # the side table brings notes only: the label branch's
        require_keys(source, ["vocabulary"], "dicom with source.annotations")
        read_text_file(base / source["vocabulary"], "source.vocabulary")
        vocab = load_vocabulary(base / source["vocabulary"], keys)
    entries = list_archive(root)  # links are judged by where they lead; one bad entry costs only its row
    files = [root / name for name, reason, _ in entries if not reason]
    if not entries:
        raise CxrflowError(f"source.images: {root} holds no files")
    rows = _read_headers(files, root, report.workers)
    rows += [[None, Path(name).stem, None, None, None, None, None, name, reason, detail]
             for name, reason, detail in entries if reason]
    frame = pd.DataFrame(rows, columns=["image_id", "stem", "patient_id", "sex", "age", "view", "study_date", "path",
                                        "_reason", "_detail"])
    if join_on == "file_stem":
        frame["image_id"] = frame["stem"]
    elif join_on != "sop_instance_uid":
        raise CxrflowError(f"source.join_on: {join_on!r} is not one of ['sop_instance_uid', 'file_stem']")
    no_uid = frame["image_id"].isna() & frame["_reason"].isna()
    frame.loc[no_uid, ["_reason", "_detail"]] = ["no_image_id", "the header has no SOPInstanceUID"]
    # A file left out is named by its path, so that the ledger points at it.
    frame["image_id"] = frame["image_id"].where(frame["_reason"].isna(), frame["path"])
    frame = frame.drop(columns="stem")
    for name in ("image_id", "patient_id", "sex", "view", "path", "_reason", "_detail"):
        frame[name] = stripped(frame[name])
    frame["age"] = pd.array(frame["age"], dtype="Int16")
    frame["study_date"] = normalize_date(frame["study_date"], "%Y%m%d", report)
    frame["view"] = normalize_view(frame["view"])
    report.facts["files"] = len(entries)

    text = missing_text(frame.index)
    if vocab is not None:
        path = base / source["annotations"]
        table = read_table(path, source.get("encoding", "auto"), source.get("sep"))
        columns = source.get("columns") or {}
        id_column, text_column = columns.get("image_id", "image_id"), columns.get("text", "text")
        require_columns(table, [id_column, text_column], path)
        notes = pd.DataFrame({"id": stripped(table[id_column]), "text": table[text_column].astype("string")})
        notes["line"] = record_lines(table, notes.index).to_numpy()
        repeated = notes["id"].duplicated(keep="first") & notes["id"].notna()
        report.unmatched(notes.loc[repeated, "id"], "duplicate_annotation", notes.loc[repeated, "line"]
                         + ": an earlier line annotates this image")
        notes = notes[~repeated & notes["id"].notna()]
        orphan = ~notes["id"].isin(frame["image_id"])
        report.unmatched(notes.loc[orphan, "id"], "annotation_without_image",
                         notes.loc[orphan, "line"] + f": no DICOM file has this {join_on}")
        text = frame["image_id"].map(notes.set_index("id")["text"]).astype("string")
        report.facts["images_without_annotation"] = int(text.isna().sum())
    frame["text"] = text
    if keys is None:
        return frame
    if vocab is not None:
        labels = label_texts(frame["text"], vocab, keys, uncertain=source.get("uncertain", "missing"))
    else:
        labels = pd.DataFrame({k: pd.array([pd.NA] * len(frame), dtype="Int8") for k in keys}, index=frame.index)
    return pd.concat([frame, labels], axis=1)


def _read_headers(files: list[Path], root: Path, workers: int) -> list[list]:
    """One catalog row per DICOM file, in the order of `files`. Header parsing is Python-bound, so a large folder
    is read by `workers` processes; a few hundred files are not worth their start-up."""
    if workers <= 1 or len(files) < 512:
        return [_dicom_row(path, root) for path in files]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(functools.partial(_dicom_row, root=root), files, chunksize=256))


def _dicom_row(path: Path, root: Path) -> list:
    from cxrflow.decode import DecodeError, read_dicom_header

    relative = path.relative_to(root).as_posix()
    try:
        meta = read_dicom_header(path)
    except DecodeError as err:
        return [None, path.stem, None, None, None, None, None, relative, err.reason, err.detail or str(err)]
    except Exception as err:  # noqa: BLE001 - a file that breaks pydicom belongs in the ledger
        return [None, path.stem, None, None, None, None, None, relative, "unreadable", f"{type(err).__name__}: {err}"]
    has_pixels = meta["has_pixel_data"]
    reason, detail = (None, None) if has_pixels else ("no_pixel_data", "the header holds no Pixel Data element")
    return [meta["sop_instance_uid"], path.stem, meta.get("patient_id"), meta.get("sex"), meta.get("age"),
            meta.get("view"), meta.get("study_date"), relative, reason, detail]


def demographics_from_headers(frame: pd.DataFrame, root: Path, report: Report) -> None:
    """Fill sex, age, view and date from the DICOM headers of the files that exist (tags only)."""
    from cxrflow.decode import DecodeError, read_dicom_header

    found = {"sex": [], "age": [], "view": [], "study_date": []}
    usable = check_paths(frame["path"], root)  # nothing outside source.images is opened, not even its header
    for path, ok in zip(usable.path, usable.ok):
        try:
            meta = read_dicom_header(path) if ok else {}
        except DecodeError:
            meta = {}  # a missing or broken file is the missing-file check's and the decoder's business
        for name in found:
            found[name].append(meta.get(name))
    frame["sex"] = stripped(found["sex"])
    frame["age"] = pd.array(found["age"], dtype="Int16")
    frame["view"] = normalize_view(pd.Series(found["view"], index=frame.index, dtype="string"))
    frame["study_date"] = normalize_date(pd.Series(found["study_date"], index=frame.index, dtype="string"), "%Y%m%d",
                                         report)
    report.facts["headers_read"] = int(frame["sex"].notna().sum())
