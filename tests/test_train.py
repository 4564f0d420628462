"""Training on the CPU: deterministic, resumable after SIGKILL, models loadable without unpickling, evaluation."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest
import torch

from cxrflow.errors import CxrflowError
from cxrflow.models import build_model, load_pretrained
from cxrflow.pipeline import run_evaluate, run_train

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
    assert not checkpoint.exists()


def test_evaluate_writes_table1_metrics(tiny_pipeline, tmp_path):
    out = tmp_path / "model"
    run_train(tiny_pipeline["manifest"], tiny_pipeline["index"], tiny_pipeline["shards"], tiny_pipeline["config"],
              "enlarged_heart", out / "model.pt", out / "metadata.json", out / "history.csv")
    metrics = run_evaluate(out / "model.pt", out / "metadata.json", tiny_pipeline["manifest"], tiny_pipeline["index"],
                           tiny_pipeline["shards"], tiny_pipeline["config"], "enlarged_heart",
                           tmp_path / "metrics.json", tmp_path / "pred.csv", tmp_path / "roc.png")
    assert 0 <= metrics["auc_ci95"][0] <= metrics["auc"] <= metrics["auc_ci95"][1] <= 1
    # Weighted recall is accuracy by definition (as in the paper's Table 1).
    assert metrics["recall_weighted"] == pytest.approx(metrics["accuracy"])
    assert sum(map(sum, metrics["confusion_matrix"])) == metrics["n_test"]
    assert (tmp_path / "roc.png").stat().st_size > 1000


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
