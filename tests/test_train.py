"""Training on the CPU: deterministic, resumable after SIGKILL, streamed from the cache batch by batch, models loadable
without unpickling, evaluation."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cxrflow.calibration import expected_calibration_error
from cxrflow.errors import CxrflowError
from cxrflow.evaluate import youden_threshold
from cxrflow.metrics import bootstrap_metrics
from cxrflow.models import build_model, load_pretrained
from cxrflow.pipeline import run_evaluate, run_train
from cxrflow.datasets import read_batches, release_pages
from cxrflow.inference import predict, predict_cached
from cxrflow.tensors import TensorCache
from cxrflow.train import BatchAugment, train
from test_evaluate import drawn_png

RUNNER = textwrap.dedent("""
    import json, sys
    from cxrflow.pipeline import run_train
    args = json.loads(sys.argv[1])
    run_train(args["manifest"], args["index"], args["shards"], args["config"], "enlarged_heart",
              args["out"] + "/model.pt", args["out"] + "/metadata.json", args["out"] + "/history.csv")
""")


def train_args(tiny, out):
    return {"manifest": str(tiny["manifest"]), "index": str(tiny["index"]), "shards": [str(s) for s in tiny["shards"]],
            "config": tiny["config"], "out": str(out)}


def start_training(tiny, out):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(train_args(tiny, out))], env=env)


def run_to_end(tiny, out):
    process = start_training(tiny, out)
    assert process.wait(300) == 0


def test_training_is_deterministic_and_resumes_after_sigkill(tiny_pipeline, tmp_path):
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    run_to_end(tiny_pipeline, uninterrupted)

    process = start_training(tiny_pipeline, killed)
    checkpoint = killed / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while not checkpoint.exists():  # the first epoch's checkpoint: epoch 2 is now running
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    assert not (killed / "model.pt").exists()
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 0
    run_to_end(tiny_pipeline, killed)

    a = torch.load(uninterrupted / "model.pt", weights_only=True)
    b = torch.load(killed / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = pd.read_csv(uninterrupted / "history.csv"), pd.read_csv(killed / "history.csv")
    pd.testing.assert_frame_equal(ha.drop(columns="seconds"), hb.drop(columns="seconds"))
    meta = json.loads((killed / "metadata.json").read_text())
    assert meta["architecture"]["name"] == "resnet10t" and meta["input"]["size"] == 32
    assert {"torch", "timm", "monai"} <= set(meta["versions"]) and meta["config_hash"] and "best_epoch" in meta
    assert meta["input"]["clip_percentiles"] == [0.5, 99.5] and meta["augmentation"]["hflip"] is False
    assert not checkpoint.exists()


def test_evaluate_writes_table1_metrics(tiny_pipeline, tmp_path):
    out = tmp_path / "model"
    run_train(tiny_pipeline["manifest"], tiny_pipeline["index"], tiny_pipeline["shards"], tiny_pipeline["config"],
              "enlarged_heart", out / "model.pt", out / "metadata.json", out / "history.csv")
    figures = {"confusion_out": tmp_path / "confusion.png", "curves_out": tmp_path / "curves.png",
               "gradcam_out": tmp_path / "gradcam.png"}
    metrics = run_evaluate(out / "model.pt", out / "metadata.json", tiny_pipeline["manifest"], tiny_pipeline["index"],
                           tiny_pipeline["shards"], tiny_pipeline["config"], "enlarged_heart",
                           tmp_path / "metrics.json", tmp_path / "pred.csv", tmp_path / "roc.png",
                           history_path=out / "history.csv", **figures)
    # The metrics are those of the written predictions: recomputed here with scikit-learn, not read back.
    predictions = pd.read_csv(tmp_path / "pred.csv")
    test = predictions[predictions["split"] == "test"]
    assert set(predictions["split"]) == {"val", "test"} and len(test) == metrics["n_test"]
    assert metrics["auc"] == pytest.approx(roc_auc_score(test["label"], test["prob"]))
    val = predictions[predictions["split"] == "val"]
    assert metrics["threshold"] == pytest.approx(youden_threshold(val["label"], val["prob"]))
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]
    called = test["prob"] >= metrics["threshold"]
    assert (tp, fn) == (int((called & (test["label"] == 1)).sum()), int((~called & (test["label"] == 1)).sum()))
    assert (fp, tn) == (int((called & (test["label"] == 0)).sum()), int((~called & (test["label"] == 0)).sum()))
    assert metrics["clinical"]["sensitivity"]["value"] == pytest.approx(tp / (tp + fn))
    assert metrics["clinical"]["specificity"]["value"] == pytest.approx(tn / (tn + fp))
    # The intervals are the patient bootstrap of these predictions (same resamples: same seed and count).
    intervals = bootstrap_metrics(test["label"], test["prob"], test["patient_id"].astype(str), metrics["threshold"],
                                  tiny_pipeline["config"]["evaluate"]["bootstrap"], tiny_pipeline["config"]["seed"])
    for name, entry in metrics["clinical"].items():
        np.testing.assert_allclose(entry["ci95"], intervals[name], err_msg=name)
    assert metrics["calibration"]["ece"] == pytest.approx(expected_calibration_error(test["label"], test["prob"]))
    assert drawn_png(tmp_path / "roc.png") == (990, 440)
    for figure in figures.values():
        drawn_png(figure)


def test_pretrained_weights_load_from_a_local_file_with_an_rgb_stem(tmp_path):
    import timm

    rgb = timm.create_model("resnet10t", pretrained=False, in_chans=3, num_classes=1000)
    torch.save(rgb.state_dict(), tmp_path / "rgb.pt")
    model = build_model({"library": "timm", "name": "resnet10t", "pretrained": str(tmp_path / "rgb.pt")})
    stem = model.state_dict()["conv1.0.weight"]
    assert stem.shape[1] == 1 and torch.allclose(stem, rgb.state_dict()["conv1.0.weight"].sum(1, keepdim=True))
    with pytest.raises(CxrflowError, match="no such file"):
        build_model({"library": "timm", "name": "resnet10t", "pretrained": str(tmp_path / "absent.pt")})
    other = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=1)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(CxrflowError, match="does not match"):
        load_pretrained(build_model({"library": "timm", "name": "resnet10t"}), tmp_path / "other.pt")


def test_a_pickled_checkpoint_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CxrflowError, match="cannot read"):
        build_model({"library": "timm", "name": "resnet10t", "pretrained": str(tmp_path / "evil.pt")})


@pytest.mark.parametrize("spec", [{"library": "monai", "name": "DenseNet121"},
                                  {"library": "monai", "name": "EfficientNetBN", "variant": "efficientnet-b0"},
                                  {"library": "timm", "name": "efficientnet_b0"}])
def test_models_by_name_take_one_channel(spec):
    model = build_model(spec).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 1)


def test_batch_augment_is_seeded_and_per_image():
    x = torch.rand(16, 1, 24, 24)
    augment = BatchAugment()
    a = augment(x, torch.Generator().manual_seed(5))
    b = augment(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape
    changed = (a - x).abs().flatten(1).amax(1) > 1e-5
    assert 0 < int(changed.sum()) < 16  # each image draws its own transforms; with p = 0.5 some get none
    assert torch.allclose(a[~changed], x[~changed], atol=1e-5)
    assert not augment.draw(1000, torch.Generator().manual_seed(0))["flip"].any()  # no flip unless asked
    assert BatchAugment(prob=0.0)(x, torch.Generator().manual_seed(1)).sub(x).abs().max() < 1e-5


def test_batch_augment_geometry_and_intensity_are_monai_s():
    image = torch.zeros(1, 1, 16, 16)
    image[0, 0, 2:6, 9:13] = 1.0  # a block in the upper right
    one = torch.ones(1, dtype=torch.float64)
    params = {"angle": one * math.pi / 2, "zoom": one, "scale": one, "gamma": one, "flip": torch.zeros(1, dtype=torch.bool)}
    rotated = BatchAugment.apply(image, params)
    assert torch.allclose(rotated, torch.rot90(image, k=-1, dims=(2, 3)), atol=1e-4) or torch.allclose(
        rotated, torch.rot90(image, k=1, dims=(2, 3)), atol=1e-4)
    flipped = BatchAugment.apply(image, {**params, "angle": 0 * one, "flip": torch.ones(1, dtype=torch.bool)})
    assert torch.allclose(flipped, image.flip(3), atol=1e-5)
    centred = torch.zeros(1, 1, 16, 16)
    centred[0, 0, 6:10, 6:10] = 1.0
    zoomed = BatchAugment.apply(centred, {**params, "angle": 0 * one, "zoom": 2 * one})
    assert float(zoomed.sum()) == pytest.approx(4 * float(centred.sum()), rel=0.1)  # zoom 2: twice as large in each direction
    assert zoomed[0, 0, 5:11, 5:11].min() > 0.99 and zoomed[0, 0, :3].max() == 0
    ramp = torch.linspace(0, 1, 256).view(1, 1, 16, 16)
    from monai.transforms import AdjustContrast  # MONAI is the reference

    expected = AdjustContrast(gamma=1.5)(ramp[0] * 0.9).unsqueeze(0)
    got = BatchAugment.apply(ramp, {**params, "angle": 0 * one, "scale": 0.9 * one, "gamma": 1.5 * one})
    assert torch.allclose(got, torch.as_tensor(expected), atol=1e-5)


def test_sample_weights_balance_classes_and_optionally_patients():
    import numpy as np

    from cxrflow.train import sample_weights

    # Patient a: 6 positive images (follow-ups); b: 1 positive; c, d: 2 and 1 negatives.
    rows = pd.DataFrame({"patient_id": list("aaaaaab") + list("ccd"), "label": [1] * 7 + [0] * 3})
    label = rows["label"].to_numpy()
    for scheme in ("class", "patient"):
        w = sample_weights(rows, scheme)
        assert w.mean() == pytest.approx(1.0)
        assert w[label == 1].sum() == pytest.approx(w[label == 0].sum())  # each class carries half
    w = sample_weights(rows, "class")
    assert w[0] / w[-1] == pytest.approx(3 / 7)  # BCE's pos_weight, negatives / positives, as a ratio of weights
    w = sample_weights(rows, "patient")
    per_patient = pd.Series(w).groupby(rows["patient_id"]).sum()
    assert per_patient["a"] == pytest.approx(per_patient["b"]) and per_patient["c"] == pytest.approx(per_patient["d"])
    assert np.array_equal(sample_weights(rows, "none"), np.ones(10))
    with pytest.raises(CxrflowError, match="train.weighting: 'images'"):
        sample_weights(rows, "images")


class RecordingCache(TensorCache):
    """The real tensor cache, remembering the ids of every `load` call."""

    calls: list

    def load(self, image_ids):
        ids = list(image_ids)
        self.calls.append(ids)
        return super().load(ids)


def small_network():
    """A real network a hundred times cheaper than resnet10t: for tests about what is read, not what is learned."""
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 5, stride=4), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 1))


def test_training_reads_the_cache_one_batch_at_a_time(tiny_pipeline, tmp_path, monkeypatch):
    """Training streams: every read of the cache is one step's batch or one prediction batch, never a split."""
    import cxrflow.train

    monkeypatch.setattr(cxrflow.train, "build_model", lambda spec: small_network())
    cache = RecordingCache.open(tiny_pipeline["index"], tiny_pipeline["shards"])
    cache.calls = []
    manifest = pd.read_csv(tiny_pipeline["manifest"], dtype={"image_id": str, "patient_id": str})
    cfg = {**tiny_pipeline["config"], "train": {**tiny_pipeline["config"]["train"], "epochs": 1, "batch_size": 4}}
    train(manifest, cache, cfg, "enlarged_heart", tmp_path, seed=0, log=lambda *_: None)
    train_ids = set(manifest.loc[manifest["split"] == "train", "image_id"])
    val_ids = manifest.loc[manifest["split"] == "val", "image_id"].tolist()
    steps = len(train_ids) // 4
    assert val_ids and steps > 1
    training_reads = [c for c in cache.calls if set(c) <= train_ids]
    validation_reads = [c for c in cache.calls if set(c) <= set(val_ids)]
    assert len(training_reads) + len(validation_reads) == len(cache.calls)
    assert [len(c) for c in training_reads] == [4] * steps
    # Validation: the val split in prediction batches (of at most 64 images), in manifest order.
    assert [i for c in validation_reads for i in c] == val_ids
    assert max(len(c) for c in validation_reads) <= 64
    # The epoch visits a permutation's whole batches, no image twice.
    epoch = [i for c in training_reads for i in c]
    assert len(set(epoch)) == len(epoch) == 4 * steps


def test_predict_cached_streams_what_predict_computes_and_logs_progress(tiny_pipeline, monkeypatch):
    import cxrflow.inference

    cache = RecordingCache.open(tiny_pipeline["index"], tiny_pipeline["shards"])
    cache.calls = []
    ids = cache.index.index[:50].tolist()
    torch.manual_seed(0)
    model = small_network()
    lines = []
    monkeypatch.setattr(cxrflow.inference, "PROGRESS_SECONDS", 0.0)
    streamed = predict_cached(model, cache, ids, "cpu", zscore=True, batch=16, log=lines.append)
    assert [len(c) for c in cache.calls] == [16, 16, 16, 2]
    np.testing.assert_array_equal(streamed, predict(model, cache.load(ids), "cpu", zscore=True, batch=16))
    assert lines[0].startswith("predict: 16/50 images") and lines[-1].startswith("predict: 50/50 images")
    assert predict_cached(model, cache, [], "cpu", zscore=True).shape == (0,)


def test_loader_workers_read_the_same_batches_in_the_same_order(tiny_pipeline):
    """The GPU path reads batches in worker processes: the same images, in the order asked, as the main process."""
    cache = TensorCache.open(tiny_pipeline["index"], tiny_pipeline["shards"])
    ids = cache.index.index.to_numpy()
    batches = [np.random.default_rng(s).choice(len(ids), 7, replace=False) for s in range(6)]
    in_workers = [b.numpy() for b in read_batches(cache, ids, batches, workers=2)]
    assert len(in_workers) == 6
    for rows, images in zip(batches, in_workers):
        np.testing.assert_array_equal(images, cache.load(ids[rows]))
    with pytest.raises(KeyError, match="not in the tensor cache"):
        read_batches(cache, np.append(ids, "absent"), batches)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssFile from Linux's /proc")
def test_released_pages_leave_resident_memory(tmp_path):
    """A read through a memory map keeps its pages in the process's RSS; release_pages hands them back."""
    def rss_file_mb():
        line = next(x for x in open("/proc/self/status") if x.startswith("RssFile:"))
        return int(line.split()[1]) / 1024

    np.save(tmp_path / "a.npy", np.ones((64, 1024, 1024), dtype=np.uint8))
    array = np.load(tmp_path / "a.npy", mmap_mode="r")
    before = rss_file_mb()
    assert int(array[::2].sum()) == 32 * 2**20
    read = rss_file_mb()
    release_pages(array)
    released = rss_file_mb()
    assert read - before > 24 and read - released > 24
    assert int(array[1::2].sum()) == 32 * 2**20  # still readable afterwards
