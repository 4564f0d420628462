"""Apply the trained models to a folder of new images: per-pathology probabilities, one row per file.

A model folder describes itself, so prediction reads nothing else: model.pt, metadata.json (architecture and input
convention: size, clip percentiles, CLAHE, z-score) and threshold.json (the validation-chosen threshold and the
temperature, written by evaluation). Each file goes through the training pipeline's own preprocessing
(`preprocess.process_image`: decode, QC metrics, resize and intensity normalization) with that convention. Files
stream through in batches, so memory holds the models and one batch whatever the folder's size, and a progress line
goes to the log. A file that cannot be decoded, or whose DICOM tags say it is a lateral view or not a chest, gets a
row with its status and no probabilities: one bad file never stops the run. The fixed QC rules of the config are
applied and recorded, but do not withhold a prediction: the user decides what a failed check means for a new image.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxrflow.errors import CxrflowError
from cxrflow.preprocess import process_image
from cxrflow.quality import METRICS, apply_rules

# Files decoded, then scored, per step: the memory of one step is this many tensors per input convention.
FILES_PER_BATCH = 64
INPUT_KEYS = ("size", "clip_percentiles", "clahe", "zscore")


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


@dataclass(frozen=True)
class ModelFolder:
    """What predicting with one pathology's model needs, read from its model folder."""

    pathology: str
    model_path: str
    metadata: dict
    threshold: float
    temperature: float | None

    @property
    def convention(self) -> tuple[int, tuple[float, float], bool]:
        """How a file becomes the cached uint8 tensor (size, clip percentiles, CLAHE); z-score is applied later."""
        spec = self.metadata["input"]
        return int(spec["size"]), tuple(spec["clip_percentiles"]), bool(spec["clahe"])


def read_model_folder(pathology: str, model_path, metadata_path, threshold_path) -> ModelFolder:
    """The pathology's model, its metadata.json and threshold.json; a file that lacks what prediction needs is a
    CxrflowError naming it and the key."""
    metadata, threshold = _read_json(metadata_path), _read_json(threshold_path)
    missing = [f"input.{k}" for k in INPUT_KEYS if k not in metadata.get("input", {})]
    missing += [] if "architecture" in metadata else ["architecture"]
    if missing:
        raise CxrflowError(f"{metadata_path}: no {', '.join(missing)}; retrain the model with this version of cxrflow")
    if threshold.get("threshold") is None or "temperature" not in threshold:
        raise CxrflowError(f"{threshold_path}: needs 'threshold' and 'temperature' (null without temperature "
                           f"scaling); evaluation writes it: snakemake --forcerun evaluate")
    return ModelFolder(pathology, str(model_path), metadata, float(threshold["threshold"]), threshold["temperature"])


def _read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise CxrflowError(f"{path}: cannot read the model folder's file: {err}") from None


def predict_folder(folder: str | Path, models: list[ModelFolder], quality: dict, device="cpu",
                   batch: int = FILES_PER_BATCH, log=print) -> pd.DataFrame:
    """One row per file: file, status, detail, qc_pass, qc_reason and, per model, prob_<pathology>,
    prob_calibrated_<pathology> (with a temperature) and call_<pathology> (1/0 at the model's threshold)."""
    from cxrflow.calibration import apply_temperature
    from cxrflow.inference import Progress, amp_dtype_for, predict
    from cxrflow.multilabel import load_for_pathology

    folder, device = Path(folder), torch.device(device)
    files = list_files(folder)
    networks = {m.pathology: load_for_pathology(m.model_path, m.metadata, m.pathology).to(device) for m in models}
    conventions = sorted({m.convention for m in models})
    probs = {m.pathology: np.full(len(files), np.nan) for m in models}
    records = []
    progress = Progress("predict", len(files), log, unit="files")
    for start in range(0, len(files), batch):
        chunk = files[start : start + batch]
        for convention in conventions:
            size, clip, clahe = convention
            results = [process_image(str(path), size, {"clip_percentiles": clip, "clahe": clahe}) for path in chunk]
            if convention == conventions[0]:
                records += [record for record, _ in results]
            usable = [i for i, (_, tensor) in enumerate(results) if tensor is not None]
            if not usable:
                continue
            images = np.stack([results[i][1] for i in usable])
            for model in (m for m in models if m.convention == convention):
                probs[model.pathology][start + np.asarray(usable)] = predict(
                    networks[model.pathology], images, device, model.metadata["input"]["zscore"],
                    amp_dtype=amp_dtype_for(device))
        progress.update(len(chunk))
    progress.close()
    table = pd.DataFrame.from_records(records).reindex(columns=["status", "detail", *METRICS])
    table.insert(0, "file", [p.relative_to(folder).as_posix() for p in files])
    judged = apply_rules(table, {**quality, "mode": "fixed"})  # robust bounds need a whole archive, not a few files
    out = judged[["file", "status", "detail", "qc_pass", "qc_reason"]].copy()
    for model in sorted(models, key=lambda m: m.pathology):
        scores = probs[model.pathology]
        out[f"prob_{model.pathology}"] = np.round(scores, 6)
        if model.temperature is not None:
            out[f"prob_calibrated_{model.pathology}"] = np.round(apply_temperature(scores, model.temperature), 6)
        # The threshold applies to the raw probability (threshold.json's applies_to).
        out[f"call_{model.pathology}"] = pd.Series(scores >= model.threshold, dtype="Int8").where(~np.isnan(scores))
    scored = int(np.isfinite(np.column_stack(list(probs.values()))).any(axis=1).sum()) if probs else 0
    log(f"predict: {len(out)} files, {scored} scored on {device}; statuses {out['status'].value_counts().to_dict()}")
    return out
