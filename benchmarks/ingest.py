"""Benchmark the ingest stage: a 2,000,000-row Russian free-text archive, and NIH / PadChest against torchxrayvision.

    python benchmarks/ingest.py            # 2M rows (about a minute to write the table once, cached in --workdir)
    python benchmarks/ingest.py --quick    # 20k rows, for the test that keeps this script working

1. It writes a free-text table in the style of the paper's archive: Russian notes built from the phrase tables
   of `cxrflow.synthetic`, ~50k distinct notes drawn with a Zipf-like frequency (a few "Норма." notes are very
   common, most notes rare), patients with 1-5 images, dd.mm.yyyy dates, and a little dirt (duplicate ids,
   missing patient ids, patients whose images disagree on sex) so that the ledger has work to do. The table is
   written in a child process, so that the peak RSS reported below belongs to the ingest alone.
2. It runs the real ingest, `cxrflow.pipeline.run_ingest` (build_catalog in metadata-only mode, then the
   parquet catalog, the ledger and the summary), and prints rows/s and the peak RSS of this process.
3. In the same process it times a naive labeller (for each row, for each key, `re.search` every pattern of
   the vocabulary) on a sample of rows, and extrapolates it per row to the whole table.
4. It times the NIH and PadChest adapters on the real tables against torchxrayvision's dataset constructors
   on the same files, when both the tables (../shared/data) and torchxrayvision are available.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import cxrflow  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))

import numpy as np
import pandas as pd

from cxrflow import synthetic

SHARED = ROOT.parent / "shared" / "data"
NIH_TABLE = SHARED / "nih" / "Data_Entry_2017_v2020.csv.gz"
PADCHEST_TABLE = SHARED / "padchest" / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
KEYS = ROOT / "config" / "labels" / "keys.yaml"
VOCABULARY = ROOT / "config" / "labels" / "ru.yaml"


# --- the archive -------------------------------------------------------------------------------------------------

def distinct_notes(n_notes: int, rng: np.random.Generator) -> list[str]:
    """`n_notes` distinct Russian notes, simplest first: normal notes, then one finding, then several."""
    keys = sorted(synthetic.AFFIRMED)
    notes: dict[str, int] = {}
    # The common notes of a real archive are the short normal ones; they take the top Zipf ranks.
    for normal in synthetic.NORMAL:
        notes.setdefault(normal, 0)
    while len(notes) < n_notes:
        sentences = []
        n_findings = int(rng.choice([0, 1, 2, 3, 4], p=[0.15, 0.35, 0.25, 0.15, 0.10]))
        for key in rng.choice(keys, size=n_findings, replace=False):
            sentences.append(str(rng.choice(synthetic.AFFIRMED[str(key)])))
        if rng.random() < 0.15:
            sentences.append(str(rng.choice(list(synthetic.UNCERTAIN.values()))))
        if not sentences:
            sentences.append(str(rng.choice(synthetic.NORMAL)))
        for index in rng.choice(len(synthetic.NEGATED), size=int(rng.choice([0, 1, 2], p=[0.5, 0.35, 0.15])), replace=False):
            sentences.append(synthetic.NEGATED[int(index)][0])
        for filler in rng.choice(synthetic.FILLERS, size=int(rng.choice([0, 1, 2, 3], p=[0.3, 0.3, 0.25, 0.15])), replace=False):
            sentences.insert(int(rng.integers(0, len(sentences) + 1)), str(filler))
        notes.setdefault(" ".join(sentences), n_findings)
    # Fewer findings = more common, as in a screening archive.
    return sorted(notes, key=lambda note: (notes[note], len(note)))


def write_archive(path: Path, n_rows: int, n_notes: int, seed: int = 0) -> dict:
    """Write the free-text table (UTF-8 CSV) and return what it holds."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    notes = distinct_notes(n_notes, rng)
    weights = 1.0 / np.arange(1, len(notes) + 1) ** 1.0  # Zipf, s = 1
    note_of_row = rng.choice(len(notes), size=n_rows, p=weights / weights.sum())

    images_per_patient = rng.choice([1, 2, 3, 4, 5], size=n_rows, p=[0.35, 0.25, 0.2, 0.12, 0.08])
    patient_of_row = np.repeat(np.arange(n_rows), images_per_patient)[:n_rows]
    n_patients = int(patient_of_row[-1]) + 1
    patient_ids = np.char.zfill(((np.arange(n_patients) * 7919 + 1_000_003) % 10**8).astype(str), 8)
    patient_sex = rng.choice(np.array(["Ж", "М"]), size=n_patients, p=[0.55, 0.45])
    patient_age = rng.integers(18, 96, size=n_patients)
    image_ids = np.char.add("IMG", np.char.zfill(np.arange(n_rows).astype(str), 9))
    days = pd.to_datetime("2016-01-01") + pd.to_timedelta(rng.integers(0, 6 * 365, size=n_rows), unit="D")
    table = pd.DataFrame({
        "image_id": image_ids,
        "patient_id": patient_ids[patient_of_row],
        "sex": patient_sex[patient_of_row],
        "age": patient_age[patient_of_row].astype(str),
        "view": rng.choice(np.array(["PA", "AP", "LAT"]), size=n_rows, p=[0.85, 0.05, 0.10]),
        "study_date": days.strftime("%d.%m.%Y"),
        "file": np.char.add(np.char.add("images/", image_ids), ".dcm"),
        "annotation": np.asarray(notes, dtype=object)[note_of_row],
    })
    # A little dirt, at rates a real archive might have: the ledger must catch each kind.
    n_dirty = max(1, n_rows // 10_000)
    dirty = rng.choice(n_rows, size=3 * n_dirty, replace=False)
    table.loc[dirty[:n_dirty], "image_id"] = table["image_id"].iloc[dirty[:n_dirty] - 1].to_numpy()
    table.loc[dirty[n_dirty:2 * n_dirty], "patient_id"] = ""
    flip = table["patient_id"].isin(table["patient_id"].iloc[dirty[2 * n_dirty:]])
    table.loc[flip & (np.arange(n_rows) % 2 == 0), "sex"] = "М"
    table.loc[flip & (np.arange(n_rows) % 2 == 1), "sex"] = "Ж"
    path.parent.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(pa.Table.from_pandas(table, preserve_index=False), path)
    return {"rows": n_rows, "distinct_notes": int(table["annotation"].nunique()), "patients": n_patients,
            "bytes": path.stat().st_size}
