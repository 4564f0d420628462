"""Apply the trained models to a folder of new images: per-pathology probabilities, one row per file.

Each file goes through the training pipeline's own preprocessing (`tensors.process_image`: decode, QC metrics,
resize and intensity normalization), with the input convention that each model's metadata.json records. A file
that cannot be decoded, or whose DICOM tags say it is a lateral view or not a chest, gets a row with its status
and no probabilities: one bad file never stops the run. The fixed QC rules of the config are applied and
recorded, but do not withhold a prediction: the user decides what a failed check means for a new image.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxrflow.errors import CxrflowError
from cxrflow.models import load_trained
from cxrflow.quality import METRICS, apply_rules
from cxrflow.tensors import process_image
from cxrflow.train import predict


def list_files(folder: str | Path) -> list[Path]:
    """Every non-hidden entry below `folder` that is not a real directory, sorted: regular files, and also FIFOs,
    devices, sockets, symlinks (to files, to directories, dangling or looping), each of which gets a row.

    Real directories are walked (symlinked ones are not, so a link loop cannot make the walk endless); a directory
    that cannot be listed is itself an entry, whose row says so. Nothing is opened here: the decoder opens only
    regular files (`decode.open_regular_file`), so a FIFO never blocks the run. Formats are recognised by their
    bytes, not names.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CxrflowError(f"predict.images: no such folder: {folder}")
    entries: list[Path] = []
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            children = list(os.scandir(current))
        except OSError:
            if current == folder:
                raise CxrflowError(f"predict.images: cannot list {folder}") from None
            entries.append(current)  # its row: decode_image says "not_a_file: directory"
            continue
        for child in children:
            if child.name.startswith("."):
                continue
            if child.is_dir(follow_symlinks=False):
                pending.append(Path(child.path))
            else:
                entries.append(Path(child.path))
    if not entries:
        raise CxrflowError(f"predict.images: {folder} holds no files")
    return sorted(entries)


def input_convention(metadata: dict) -> tuple[int, tuple[float, float], bool]:
    """(size, clip percentiles, CLAHE) of a model's input, from its metadata.json."""
    spec = metadata["input"]
    return int(spec["size"]), tuple(spec.get("clip_percentiles", (0.5, 99.5))), bool(spec.get("clahe", False))


def predict_folder(folder: str | Path, models: dict[str, tuple[str | Path, str | Path]], quality: dict,
                   thresholds: dict[str, float] | None = None, log=print) -> pd.DataFrame:
    """models: pathology -> (model.pt, metadata.json). Returns one row per file: file, status, detail, qc_pass,
    qc_reason, prob_<pathology> for each model and, where a threshold is given, call_<pathology> (1/0)."""
    folder = Path(folder)
    files = list_files(folder)
    metadata = {p: json.loads(Path(meta).read_text()) for p, (_, meta) in models.items()}
    conventions = sorted({input_convention(m) for m in metadata.values()})
    tensors: dict[tuple, list[np.ndarray | None]] = {}
    records = []
    for convention in conventions:
        size, clip, clahe = convention
        tensors[convention] = []
        for path in files:
            record, tensor = process_image(str(path), size, {"clip_percentiles": clip, "clahe": clahe})
            tensors[convention].append(tensor)
            if convention == conventions[0]:
                records.append(record)
    table = pd.DataFrame.from_records(records).reindex(columns=["status", "detail", *METRICS])
    table.insert(0, "file", [p.relative_to(folder).as_posix() for p in files])
    judged = apply_rules(table, {**quality, "mode": "fixed"})  # robust bounds need a whole archive, not a few files
    out = judged[["file", "status", "detail", "qc_pass", "qc_reason"]].copy()
    usable = np.flatnonzero((out["status"] == "ok").to_numpy())
    for pathology, (model_path, _) in sorted(models.items()):
        meta = metadata[pathology]
        images = tensors[input_convention(meta)]
        model = load_trained(model_path, meta["architecture"])
        probs = np.full(len(out), np.nan)
        if len(usable):
            probs[usable] = predict(model, np.stack([images[i] for i in usable]), torch.device("cpu"), meta["input"]["zscore"])
        out[f"prob_{pathology}"] = np.round(probs, 6)
        if thresholds and pathology in thresholds:
            call = pd.Series(probs >= thresholds[pathology], dtype="Int8").where(~np.isnan(probs))
            out[f"call_{pathology}"] = call
    log(f"predict: {len(out)} files, {len(usable)} scored; statuses {out['status'].value_counts().to_dict()}")
    return out
