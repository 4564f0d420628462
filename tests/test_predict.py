"""The predict target's API: a folder of new files -> one row per file, probabilities equal to the evaluation path's."""

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxrflow.errors import CxrflowError
from cxrflow.models import load_trained
from cxrflow.pipeline import run_predict, run_train
from cxrflow.predict import predict_folder
from cxrflow.tensors import TensorCache
from cxrflow.train import predict

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
    """A real model of the tiny pipeline, one epoch (its quality does not matter here, its consistency does)."""
    out = tmp_path_factory.mktemp("model")
    config = {**tiny_pipeline["config"], "train": {**tiny_pipeline["config"]["train"], "epochs": 1}}
    run_train(tiny_pipeline["manifest"], tiny_pipeline["index"], tiny_pipeline["shards"], config, "enlarged_heart",
              out / "model.pt", out / "metadata.json", out / "history.csv")
    (out / "metrics.json").write_text(json.dumps({"threshold": 0.5}))
    return {"model": out / "model.pt", "metadata": out / "metadata.json", "metrics": out / "metrics.json", "config": config}


@pytest.fixture(scope="module")
def new_folder(tiny_pipeline, tmp_path_factory):
    """Known-good archive files (copied, some in a subfolder), plus files that must be reported, not crash the run."""
    folder = tmp_path_factory.mktemp("new_images")
    catalog = tiny_pipeline["catalog"]
    index = pd.read_parquet(tiny_pipeline["index"]).query("status == 'ok'")
    chosen = catalog[catalog["image_id"].isin(index["image_id"])].sort_values("image_id").head(5)
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
    table = predict_folder(new_folder["folder"], {"enlarged_heart": (trained["model"], trained["metadata"])},
                           {"blank_std": 0.02}, {"enlarged_heart": 0.5})
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

    # The same preprocessing as the training cache, so the same probabilities as the evaluation path.
    cache = TensorCache.open(tiny_pipeline["index"], tiny_pipeline["shards"])
    ids = good["file"].map(new_folder["copied"])
    model = load_trained(trained["model"], trained["config"]["model"])
    expected = predict(model, cache.load(ids), torch.device("cpu"), zscore=False)
    np.testing.assert_allclose(good["prob_enlarged_heart"].to_numpy(), expected, atol=2e-6)
    assert (good["call_enlarged_heart"] == (good["prob_enlarged_heart"] >= 0.5).astype(int)).all()
    assert table.loc[table["status"] != "ok", "call_enlarged_heart"].isna().all()


def test_run_predict_writes_the_table_with_thresholds_from_the_metrics(trained, new_folder, tmp_path):
    out = tmp_path / "probabilities.csv"
    run_predict(new_folder["folder"], [trained["model"]], [trained["metadata"]], [trained["metrics"]], ["enlarged_heart"],
                {}, out)
    table = pd.read_csv(out)
    assert list(table.columns[:5]) == ["file", "status", "detail", "qc_pass", "qc_reason"]
    assert {"prob_enlarged_heart", "call_enlarged_heart"} <= set(table.columns)
    assert len(table) == len(new_folder["copied"]) + 4 + len(SPECIAL_ENTRIES)


def test_a_missing_or_empty_folder_is_a_clear_error(trained, tmp_path):
    models = {"enlarged_heart": (trained["model"], trained["metadata"])}
    with pytest.raises(CxrflowError, match="no such folder"):
        predict_folder(tmp_path / "absent", models, {})
    (tmp_path / "empty").mkdir()
    with pytest.raises(CxrflowError, match="holds no files"):
        predict_folder(tmp_path / "empty", models, {})


def test_a_model_file_of_another_architecture_is_refused(trained, tmp_path):
    torch.save(torch.nn.Linear(2, 1).state_dict(), tmp_path / "other.pt")
    with pytest.raises(CxrflowError, match="not a resnet10t model"):
        load_trained(tmp_path / "other.pt", trained["config"]["model"])
