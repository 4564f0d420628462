"""One source -> one catalog row per image + a ledger of every input row that did not become one.

`source.format` picks one adapter (`ADAPTERS`). Every adapter returns the same frame: `CATALOG_COLUMNS`
(`quality_tag` may be left out: it is then 0), one 1/0/missing column per canonical label key, and optionally
`_reason`/`_detail` for rows the adapter itself has to refuse (a file that is not DICOM, a PadChest label list
that does not parse). Given `keys` None an adapter works for pixels only: no label work, no label columns.
What the adapters have in common (missing ids, duplicate ids, missing files, sex
conflicts, pseudonymization, the ledger, the counts) happens once, here.

The summary's counts add up over images: rows_read = kept + left_out. The ledger also holds rows that are not
images left out, each under a reason of its own: images kept but flagged (sex_conflict_flagged) and input
rows that name no image of the source (annotation_without_image, duplicate_annotation, labels_without_image,
duplicate_label_row; an annotation row without image_id for VinDr). The summary counts them apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrflow.archive import MIN_FOUND_FRACTION, check_paths, found_fraction_check, image_folder
from cxrflow.errors import CxrflowError
from cxrflow.ingest.dicom import adapt_dicom
from cxrflow.ingest.fields import missing_text
from cxrflow.ingest.freetext import adapt_freetext
from cxrflow.ingest.public import adapt_chexpert, adapt_mimic, adapt_nih, adapt_padchest, adapt_vindr
from cxrflow.ingest.record import CATALOG_COLUMNS, LEDGER_COLUMNS, Ingested, Report, ledger_rows
from cxrflow.labels import load_keys
from cxrflow.privacy import pseudonymize, source_key

ADAPTERS = {
    "freetext": adapt_freetext,
    "dicom": adapt_dicom,
    "nih": adapt_nih,
    "chexpert": adapt_chexpert,
    "padchest": adapt_padchest,
    "vindr": adapt_vindr,
    "mimic": adapt_mimic,
}


def build_catalog(source: dict, keys_file: str | Path | None, base: str | Path = ".", workers: int = 1,
                  labels: bool = True) -> Ingested:
    """Run the configured adapter, then apply the rules every source shares, counting every row left out.

    `labels=False` (pixels only) does no label work: no vocabulary, label map, label setting or keys file is
    read, patient ids are not pseudonymized (no key is needed) and come back missing, and the catalog holds
    `CATALOG_COLUMNS` only, with `text` and `quality_tag` (the label map's) left empty. The rows kept, their order
    and the images left out or flagged are those of `labels=True`, so that the pixel branch can index images
    without rerunning on a label edit. Input rows of label tables it does not read (notes without an image, a
    label row without a study) are not in its ledger."""
    base = Path(base)
    fmt = source.get("format")
    if fmt not in ADAPTERS:
        raise CxrflowError(f"source.format: unknown format {fmt!r}; choose one of {list(ADAPTERS)}")
    keys = load_keys(base / keys_file) if labels else []
    # the demo key only for the built-in synthetic archive; fail early without one
    key = source_key(source, base) if labels else None
    report = Report(source=str(source.get("annotations") or source.get("images") or ""), workers=workers)
    frame = ADAPTERS[fmt](source, keys if labels else None, base, report).reset_index(drop=True)
    n_read = len(frame)
    if n_read == 0:
        raise CxrflowError(f"{report.source}: the source holds no images")
    if "quality_tag" not in frame.columns:
        frame["quality_tag"] = pd.Series(0, index=frame.index, dtype="Int8")

    # Each rule marks rows; the frame is cut once at the end (cutting 40 columns of 2M rows costs seconds).
    keep = np.ones(n_read, dtype=bool)
    left_out = []  # (positions, reason(s), detail(s))

    def leave_out(mask, reason, detail=""):
        mask = np.asarray(mask, dtype=bool) & keep
        if mask.any():
            positions = np.flatnonzero(mask)
            pick = lambda v: v.iloc[positions].to_numpy() if isinstance(v, pd.Series) else v  # noqa: E731
            left_out.append((positions, pick(reason), pick(detail)))
            keep[positions] = False

    def row_label(positions):
        if report.line_numbers is not None:
            return "line " + pd.Series(report.line_numbers.of(positions), dtype="int64").astype(str)
        return "record " + pd.Series(positions + 1).astype(str)

    if "_reason" in frame.columns:
        reason = frame.pop("_reason")
        detail = frame.pop("_detail").fillna("")
        leave_out(reason.notna().to_numpy(), reason, detail)
    no_id = frame["image_id"].isna().to_numpy()
    if no_id.any():
        frame.loc[no_id, "image_id"] = ("<" + row_label(np.flatnonzero(no_id)) + ">").to_numpy()
        leave_out(no_id, "no_image_id")
    image_ids = frame["image_id"] if keep.all() else frame["image_id"].where(pd.Series(keep))
    leave_out(image_ids.duplicated(keep="first").to_numpy() & keep, "duplicate_image_id",
              "an earlier row has this image id")
    leave_out(frame["patient_id"].isna().to_numpy(), "no_patient_id")

    if source.get("check_files", True):
        root = image_folder(source, base)
        checked = check_paths(frame["path"].where(pd.Series(keep)), root)  # nothing is opened
        frame["path"] = checked.path
        found_fraction_check(checked, keep & frame["path"].notna().to_numpy(), root,
                             source.get("min_found_fraction", MIN_FOUND_FRACTION))
        leave_out(~checked.ok, pd.Series(checked.reason), pd.Series(checked.detail))

    flagged = []
    patient_codes, patients = pd.factorize(frame["patient_id"], use_na_sentinel=True)
    sex = frame["sex"]
    sex_codes = np.where(sex.eq("F").to_numpy(dtype=bool, na_value=False), 0,
                         np.where(sex.eq("M").to_numpy(dtype=bool, na_value=False), 1, -1))
    considered = keep & (patient_codes >= 0) & (sex_codes >= 0)
    sexes = np.zeros((len(patients) + 1, 2), dtype=bool)
    sexes[patient_codes[considered], sex_codes[considered]] = True
    conflicted = keep & (patient_codes >= 0) & sexes.all(axis=1)[patient_codes]
    if conflicted.any():
        policy = source.get("sex_conflict", "drop_patient")
        if policy == "drop_patient":
            leave_out(conflicted, "sex_conflict", "the patient's images disagree on sex")
        else:
            what = "kept with sex set to missing" if policy == "unknown" else "kept with sex as recorded"
            flagged.append(ledger_rows(frame["image_id"][conflicted],
                                       "sex_conflict_flagged", f"the patient's images disagree on sex; {what}",
                                       source=report.source))
            if policy == "unknown":
                frame.loc[conflicted, "sex"] = pd.NA

    ledger_parts = []
    for positions, reason, detail in left_out:
        detail = pd.Series([detail] * len(positions) if np.isscalar(detail) else detail, dtype="string").fillna("")
        detail = (row_label(positions) + ": " + detail).str.rstrip(": ")
        ledger_parts.append(ledger_rows(frame["image_id"].iloc[positions], reason, detail, source=report.source))
    n_left_out = int(sum(len(p) for p, _, _ in left_out))

    frame = _rows(frame[CATALOG_COLUMNS + keys], keep)
    kept_codes = patient_codes[keep]
    if labels:  # each distinct patient is hashed once, then spread to its images
        hashed = pseudonymize(pd.Series(patients, dtype="string"), key).array
        frame["patient_id"] = pd.Series(hashed.take(kept_codes), index=frame.index)
    else:  # a pseudonym needs the key, and a real patient id is never written
        frame["patient_id"] = missing_text(frame.index)
    catalog = frame.astype(
        {"image_id": "string", "patient_id": "string", "sex": "string", "age": "Int16", "view": "string",
         "study_date": "datetime64[s]", "path": "string", "text": "string", "quality_tag": "Int8"}
        | dict.fromkeys(keys, "Int8"))
    parts = [p for p in ledger_parts + flagged + report.ledger if len(p)]
    ledger = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=LEDGER_COLUMNS, dtype="string")

    def counts(frames):
        if not frames:
            return {}
        return {str(k): int(v) for k, v in pd.concat([p["reason"] for p in frames]).value_counts().items()}

    summary = {
        "format": fmt,
        "source": report.source,
        "rows_read": n_read,
        "kept": len(catalog),
        "left_out": n_left_out,
        "left_out_by_reason": counts(ledger_parts),
        "flagged": counts(flagged),
        "other_input_rows_in_ledger": counts(report.ledger),
        "patients": int(np.count_nonzero(np.bincount(kept_codes[kept_codes >= 0], minlength=1))),
        "unrecognized_values": report.unrecognized,
        **report.facts,
        "quality_tagged": int(catalog["quality_tag"].eq(1).sum()),
        "positives_by_key": {k: int(catalog[k].eq(1).sum()) for k in keys},
    }
    if summary["kept"] + summary["left_out"] != n_read:
        raise AssertionError(f"ingest counts do not add up: {summary}")
    if summary["kept"] == 0:
        # Row numbers only: ids and paths may name patients, and this message goes to a shareable log.
        examples = ledger.drop_duplicates("reason").head(5)
        where = [str(r.detail).split(":")[0] if str(r.detail).startswith(("line ", "record ")) else "?"
                 for r in examples.itertuples()]
        raise CxrflowError(
            f"{report.source}: no image survived ingest ({n_read} read; left out by reason: "
            f"{summary['left_out_by_reason']}); first of each: "
            + "; ".join(f"{r.reason} at {w}" for r, w in zip(examples.itertuples(), where)))
    return Ingested(catalog, ledger, summary)


def _rows(frame: pd.DataFrame, keep: np.ndarray) -> pd.DataFrame:
    """frame[keep], column by column: Arrow-backed text through pyarrow's filter, the rest through numpy."""
    if keep.all():
        return frame.reset_index(drop=True)
    import pyarrow as pa

    mask = pa.array(keep)
    columns = {}
    for name, column in frame.items():
        values = column.array
        if isinstance(values, pd.arrays.ArrowStringArray):
            columns[name] = pd.array(values.__arrow_array__().filter(mask), dtype=values.dtype)
        else:
            columns[name] = values[keep]
    return pd.DataFrame(columns, columns=frame.columns, copy=False)
