"""GPU path honesty, checked on the CPU: an out-of-memory error halves the micro-batch and redoes the step.

A real CUDA out-of-memory error cannot happen on the CPU, so the network's forward raises the same exception type
(torch.cuda.OutOfMemoryError) whenever a training micro-batch is larger than a limit, as a card would.
"""

import pandas as pd
import pytest
import torch

import cxrflow.train as train_module
from cxrflow.train import accumulate_step, train


class MemoryLimited(torch.nn.Module):
    """The wrapped network, except that a training forward of more than `limit` images raises CUDA's OOM error."""

    def __init__(self, inner: torch.nn.Module, limit: int):
        super().__init__()
        self.inner, self.limit, self.refused = inner, limit, []

    def forward(self, x):
        if self.training and x.shape[0] > self.limit:
            self.refused.append(x.shape[0])
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated: {x.shape[0]} > {self.limit} images)")
        return self.inner(x)


def run(tiny_pipeline, tmp_path, monkeypatch, limit: int, micro: int | None = None):
    real_build = train_module.build_model
    built = []
    monkeypatch.setattr(train_module, "build_model", lambda spec: built.append(MemoryLimited(real_build(spec), limit)) or built[-1])
    if micro is not None:  # the reference run: this micro-batch from the start
        monkeypatch.setattr(train_module, "pick_micro_batch", lambda *args: micro)
    manifest = pd.read_csv(tiny_pipeline["manifest"], dtype={"image_id": str, "patient_id": str})
    from cxrflow.tensors import TensorCache

    messages = []
    cfg = {**tiny_pipeline["config"], "train": {**tiny_pipeline["config"]["train"], "epochs": 2, "batch_size": 8}}
    result = train(manifest, TensorCache.open(tiny_pipeline["index"], tiny_pipeline["shards"]), cfg, "enlarged_heart",
                   tmp_path, seed=3, log=messages.append)
    return result, built[0], messages


def test_out_of_memory_halves_the_micro_batch_and_redoes_the_step(tiny_pipeline, tmp_path, monkeypatch):
    limited, model, messages = run(tiny_pipeline, tmp_path / "oom", monkeypatch, limit=2)
    # 8 -> 4 -> 2 in the first step, then every step runs with 2.
    assert model.refused[:2] == [8, 4] and set(model.refused) == {8, 4}
    assert [m for m in messages if "out of GPU memory" in m] == [
        "out of GPU memory: the micro-batch is halved to 4 and the step redone",
        "out of GPU memory: the micro-batch is halved to 2 and the step redone"]
    assert limited.metadata["micro_batch"] == 2 and limited.metadata["batchnorm_images"] == 2
    # The retried step is the step a micro-batch of 2 makes from the start: same images, same augmentation, same
    # BatchNorm statistics, so the two runs end bit for bit alike on the CPU.
    monkeypatch.undo()
    reference, _, _ = run(tiny_pipeline, tmp_path / "reference", monkeypatch, limit=10**6, micro=2)
    assert limited.history["train_loss"].tolist() == reference.history["train_loss"].tolist()
    a = torch.load(tmp_path / "oom" / "best.pt", weights_only=True)
    b = torch.load(tmp_path / "reference" / "best.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_micro_batch_of_one_that_does_not_fit_is_an_error():
    model = MemoryLimited(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 1)), limit=0).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def micro_step(chunk, share):
        return model(torch.zeros(len(chunk), 4)).sum() * share

    with pytest.raises(torch.cuda.OutOfMemoryError):
        accumulate_step(model, torch.arange(4), 4, micro_step, optimizer, torch.Generator().manual_seed(0), log=lambda m: None)
    assert model.refused == [4, 2, 1]


def test_accumulated_micro_batches_give_the_whole_batch_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(12, 3), torch.rand(12, 1)

    def micro_step(chunk, share):
        loss = torch.nn.functional.mse_loss(model(x[chunk]), y[chunk]) * share
        loss.backward()
        return loss.detach()

    total, micro = accumulate_step(model, torch.arange(12), 5, micro_step, optimizer, torch.Generator(), log=print)
    accumulated = model.weight.grad.clone()
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    assert micro == 5 and torch.allclose(accumulated, model.weight.grad, atol=1e-6)
    assert float(total) == pytest.approx(12 * torch.nn.functional.mse_loss(model(x), y).item(), rel=1e-5)
