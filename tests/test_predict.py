"""The predict target: a folder of new files and model folders alone -> one row per file, probabilities equal to the
evaluation path's, streamed in batches."""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from conftest import SNAKEMAKE, copy_repo
from cxrflow.calibration import apply_temperature
from cxrflow.errors import CxrflowError
from cxrflow.inference import predict
from cxrflow.models import load_trained
from cxrflow.pipeline import run_evaluate, run_predict, run_train
from cxrflow.predict import predict_folder, read_model_folder
from cxrflow.tensors import INTENSITY_CONVENTION, TensorCache

DX = "1.2.840.10008.5.1.4.1.1.1.1"


def write_dicom(path, pixels: np.ndarray, view: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = DX, meta.MediaStorageSOPInstanceUID, "DX"
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", view
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def trained(tiny_pipeline, tmp_path_factory):
    """A real model folder of the tiny pipeline: one epoch of training, then evaluation, which writes the threshold
    and the label definition beside the weights (its quality does not matter here, its consistency does)."""
    out = tmp_path_factory.mktemp("model")
    config = {**tiny_pipeline["config"], "train": {**tiny_pipeline["config"]["train"], "epochs": 1}}
    run_train(tiny_pipeline["manifest"], tiny_pipeline["index"], tiny_pipeline["shards"], config, "enlarged_heart",
              out / "model.pt", out / "metadata.json", out / "history.csv")
    before = torch.get_num_threads()
    try:  # one thread more than torch's default, so that the rule's `threads` visibly reach torch
        run_evaluate(out / "model.pt", out / "metadata.json", tiny_pipeline["manifest"], tiny_pipeline["index"],
                     tiny_pipeline["shards"], config, "enlarged_heart", out / "metrics.json", out / "predictions.csv",
                     out / "roc.png", threshold_out=out / "threshold.json", label_out=out / "label.json",
                     threads=before + 1)
        evaluate_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    return {"model": out / "model.pt", "metadata": out / "metadata.json", "threshold": out / "threshold.json",
            "label": out / "label.json", "predictions": out / "predictions.csv", "config": config,
            "threads": (before + 1, evaluate_threads)}


def model_folder(trained):
    return read_model_folder("enlarged_heart", trained["model"], trained["metadata"], trained["threshold"])


@pytest.fixture(scope="module")
def new_folder(tiny_pipeline, tmp_path_factory):
    """Known-good archive files (copied, some in a subfolder), plus files that must be reported, not crash the run."""
    folder = tmp_path_factory.mktemp("new_images")
    catalog = tiny_pipeline["catalog"]
    # Images that evaluation scores (val and test), so that the two paths can be compared file by file.
    manifest = pd.read_csv(tiny_pipeline["manifest"], dtype={"image_id": str})
    evaluated = manifest.loc[manifest["split"].isin(["val", "test"]), "image_id"]
    chosen = catalog[catalog["image_id"].isin(evaluated)].sort_values("image_id").head(5)
    copied = {}
    for i, (image_id, path) in enumerate(zip(chosen["image_id"], chosen["path"])):
        name = f"sub/{image_id}.img" if i % 2 else f"{image_id}.img"  # names say nothing about the format
        (folder / name).parent.mkdir(exist_ok=True)
        shutil.copy(path, folder / name)
        copied[name] = image_id
    (folder / "empty.dcm").write_bytes(b"")
    (folder / "noise.png").write_bytes(np.random.default_rng(0).bytes(2000))
    good_png = next(p for p in catalog["path"] if p.endswith(".png"))
    (folder / "cut.png").write_bytes(open(good_png, "rb").read()[:300])
    write_dicom(folder / "lateral.dcm", np.random.default_rng(1).integers(0, 4095, (64, 48)), view="LL")
    (folder / ".DS_Store").write_bytes(b"\0\1junk")
    # Entries that are not regular files: each gets a row with its reason; the FIFO is never opened (it blocks).
    os.mkfifo(folder / "pipe.dcm")
    os.symlink("loop.dcm", folder / "loop.dcm")
    os.symlink("/dev/null", folder / "device_link.dcm")
    os.symlink(folder / "sub", folder / "dir_link")
    os.symlink(folder / "absent.dcm", folder / "dangling.dcm")
    first = next(iter(copied))
    os.symlink(folder / first, folder / "link_to_good.img")
    copied["link_to_good.img"] = copied[first]
    return {"folder": folder, "copied": copied}


SPECIAL_ENTRIES = {"pipe.dcm": "unreadable:not_a_file", "loop.dcm": "unreadable:symlink_loop",
                   "device_link.dcm": "unreadable:not_a_file", "dir_link": "unreadable:not_a_file",
                   "dangling.dcm": "unreadable:missing_file"}


def test_fifos_links_and_devices_each_get_a_row_with_their_reason(new_folder):
    from cxrflow.predict import list_files

    entries = {p.relative_to(new_folder["folder"]).as_posix() for p in list_files(new_folder["folder"])}
    assert set(SPECIAL_ENTRIES) <= entries and ".DS_Store" not in entries
    assert not any(e.startswith("dir_link/") for e in entries), "a symlinked directory is not walked (loops)"


def test_every_file_gets_a_row_and_good_files_score_as_in_evaluation(trained, new_folder, tiny_pipeline):
    logged = []
    table = predict_folder(new_folder["folder"], [model_folder(trained)], {"blank_std": 0.02}, log=logged.append)
    assert sorted(table["file"]) == sorted([*new_folder["copied"], "empty.dcm", "noise.png", "cut.png", "lateral.dcm",
                                            *SPECIAL_ENTRIES])
    status = table.set_index("file")["status"]
    assert status[list(SPECIAL_ENTRIES)].to_dict() == SPECIAL_ENTRIES
    assert table.set_index("file").loc[list(SPECIAL_ENTRIES), "detail"].tolist()[:3] == [
        "fifo", "Too many levels of symbolic links", "character_device"]
    assert status["empty.dcm"] == "unreadable:empty_file"
    assert status["noise.png"].startswith("unreadable:") and status["cut.png"].startswith("unreadable:")
    assert status["lateral.dcm"] == "lateral_view"
    good = table[table["file"].isin(new_folder["copied"])].copy()
    assert (good["status"] == "ok").all() and good["qc_pass"].all()
    assert table.loc[table["status"] != "ok", "prob_enlarged_heart"].isna().all()
    assert logged[-1].startswith(f"predict: {len(table)} files, {len(good)} scored on cpu")

    # The same preprocessing as the training cache, so the same probabilities as the evaluation path.
    cache = TensorCache.open(tiny_pipeline["index"], tiny_pipeline["shards"])
    ids = good["file"].map(new_folder["copied"])
    model = load_trained(trained["model"], trained["config"]["model"])
    expected = predict(model, cache.load(ids), torch.device("cpu"), zscore=False)
    np.testing.assert_allclose(good["prob_enlarged_heart"].to_numpy(), expected, atol=2e-6)
    evaluated = pd.read_csv(trained["predictions"], dtype={"image_id": str}).set_index("image_id")["prob"]
    np.testing.assert_allclose(good["prob_enlarged_heart"], evaluated[ids], atol=2e-6)
    # Calls at the threshold evaluation wrote into the model folder, not at 0.5.
    threshold = json.loads(trained["threshold"].read_text())["threshold"]
    assert threshold != 0.5
    assert (good["call_enlarged_heart"] == (good["prob_enlarged_heart"] >= threshold).astype(int)).all()
    assert table.loc[table["status"] != "ok", "call_enlarged_heart"].isna().all()


def test_batches_of_files_change_nothing(trained, new_folder):
    """Streaming: a batch of 3 files (bad files and good ones mixed across batches) gives the one-batch table."""
    whole = predict_folder(new_folder["folder"], [model_folder(trained)], {}, log=lambda _: None)
    streamed = predict_folder(new_folder["folder"], [model_folder(trained)], {}, batch=3, log=lambda _: None)
    assert len(whole) > 3 * 3
    pd.testing.assert_frame_equal(streamed, whole)


def test_evaluation_runs_torch_on_the_rules_threads(trained):
    asked, used = trained["threads"]
    assert used == asked


def test_the_model_folder_describes_itself(trained):
    """Everything predict needs is in the model folder: the input convention (metadata.json, from training), the
    threshold and temperature (threshold.json) and the label definition (label.json, both from evaluation)."""
    metadata = json.loads(trained["metadata"].read_text())
    assert metadata["input"]["intensity"] == INTENSITY_CONVENTION
    assert {k: metadata["input"][k] for k in ("size", "clip_percentiles", "clahe", "zscore")} == {
        "size": 32, "clip_percentiles": [0.5, 99.5], "clahe": False, "zscore": False}
    threshold = json.loads(trained["threshold"].read_text())
    assert 0 <= threshold["threshold"] <= 1 and "temperature" in threshold
    label = json.loads(trained["label"].read_text())
    cohorts = trained["config"]["cohorts"]
    assert label["positive_keys"] == ["enlarged_heart"] and label["negative_rule"] == cohorts["negatives"]
    assert label["exclusions"] == sorted(set(cohorts["exclusions"]) - {"enlarged_heart"})
    assert label["filters"] == cohorts["filters"]


def test_a_temperature_gives_calibrated_probabilities_and_the_raw_threshold_decides(trained, new_folder, tmp_path):
    (tmp_path / "threshold.json").write_text(json.dumps({**json.loads(trained["threshold"].read_text()),
                                                         "threshold": 0.4, "temperature": 2.0}))
    folder = read_model_folder("enlarged_heart", trained["model"], trained["metadata"], tmp_path / "threshold.json")
    table = predict_folder(new_folder["folder"], [folder], {}, log=lambda _: None)
    scored = table.dropna(subset=["prob_enlarged_heart"])
    np.testing.assert_allclose(scored["prob_calibrated_enlarged_heart"],
                               apply_temperature(scored["prob_enlarged_heart"], 2.0), atol=2e-6)
    assert (scored["call_enlarged_heart"] == (scored["prob_enlarged_heart"] >= 0.4).astype(int)).all()


def test_run_predict_writes_the_table_from_model_folders(trained, new_folder, tmp_path):
    out = tmp_path / "probabilities.csv"
    run_predict(new_folder["folder"], [trained["model"]], [trained["metadata"]], [trained["threshold"]],
                ["enlarged_heart"], {}, out)
    table = pd.read_csv(out)
    assert list(table.columns[:5]) == ["file", "status", "detail", "qc_pass", "qc_reason"]
    assert {"prob_enlarged_heart", "call_enlarged_heart"} <= set(table.columns)
    assert len(table) == len(new_folder["copied"]) + 4 + len(SPECIAL_ENTRIES)


def test_a_model_folder_without_threshold_or_convention_is_a_clear_error(trained, tmp_path):
    with pytest.raises(CxrflowError, match="absent.json: cannot read"):
        read_model_folder("enlarged_heart", trained["model"], trained["metadata"], tmp_path / "absent.json")
    old = json.loads(trained["metadata"].read_text())
    del old["input"]["clip_percentiles"]
    (tmp_path / "metadata.json").write_text(json.dumps(old))
    with pytest.raises(CxrflowError, match=r"metadata.json: no input.clip_percentiles"):
        read_model_folder("enlarged_heart", trained["model"], tmp_path / "metadata.json", trained["threshold"])


def test_a_missing_or_empty_folder_is_a_clear_error(trained, tmp_path):
    models = [model_folder(trained)]
    with pytest.raises(CxrflowError, match="no such folder"):
        predict_folder(tmp_path / "absent", models, {})
    (tmp_path / "empty").mkdir()
    with pytest.raises(CxrflowError, match="holds no files"):
        predict_folder(tmp_path / "empty", models, {})


def test_a_model_file_of_another_architecture_is_refused(trained, tmp_path):
    torch.save(torch.nn.Linear(2, 1).state_dict(), tmp_path / "other.pt")
    with pytest.raises(CxrflowError, match="not a resnet10t model"):
        load_trained(tmp_path / "other.pt", trained["config"]["model"])


MODEL_FILES = ("model.pt", "metadata.json")


@pytest.mark.parametrize("overlay", ["", "cohorts:\n  enabled: [enlarged_heart, scoliosis]\ntrain:\n  mode: multilabel\n"],
                         ids=["binary", "multilabel"])
def test_the_predict_rule_reads_model_folders_only(tmp_path, overlay):
    """Snakemake's own plan: with only the model folders present and no other rule allowed to run, the predict job
    plans, and its inputs are those files and the image folder (no metrics, no cache). In multi-label mode each
    pathology's threshold comes with the one network."""
    workdir = copy_repo(tmp_path / "repo")
    (workdir / "config" / "overlay.yaml").write_text(overlay or "{}\n")
    (workdir / "new").mkdir()
    (workdir / "new" / "a.png").write_bytes(b"")
    pathologies = ["enlarged_heart", "scoliosis"] if overlay else list(
        yaml.safe_load((workdir / "config" / "config.yaml").read_text())["cohorts"]["pathologies"])
    networks = ["multilabel"] if overlay else pathologies
    expected = {f"results/models/{n}/{f}" for n in networks for f in MODEL_FILES}
    expected |= {f"results/models/{p}/threshold.json" for p in pathologies}
    for path in expected:
        (workdir / path).parent.mkdir(parents=True, exist_ok=True)
        (workdir / path).write_text("")
    result = subprocess.run([SNAKEMAKE, "-n", "predict", "--allowed-rules", "predict", "--cores", "1", "--configfile",
                             "config/tiny.yaml", "config/overlay.yaml", "--config", "predict={images: new}"],
                            cwd=workdir, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    inputs = re.search(r"^rule predict:\n\s+input: (.*)$", result.stdout, flags=re.M).group(1).split(", ")
    assert set(inputs) == expected | {"new"}
    assert re.search(r"^\s+resources: .*\bgpu=1\b", result.stdout, flags=re.M), "predict runs on a GPU when granted"
