"""Inference: cached uint8 images -> the model's input -> probabilities, in batches.

Training (validation each epoch), evaluation and prediction share these. `predict_cached` streams from the tensor
cache: it reads one batch's slices at a time, so its memory does not grow with the number of images. Importing this
module pulls in neither MONAI nor the image decoders (a bare GPU node has torch, numpy and pandas).
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from cxrflow.datasets import consecutive, loader_workers, read_batches

if TYPE_CHECKING:
    from cxrflow.tensors import TensorCache

# A progress line at most this often in a rule's log (a bar when stderr is a terminal).
PROGRESS_SECONDS = 30.0


def use_threads(threads: int | None) -> None:
    """torch's CPU threads = the rule's `threads`: torch otherwise takes every core, and concurrent local jobs
    oversubscribe them."""
    if threads:
        torch.set_num_threads(max(1, int(threads)))


def amp_dtype_for(device: torch.device):
    """bf16 where the card has it (no loss scaling needed), else fp16; None (fp32) on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def prepare_batch(images_uint8, device: torch.device, zscore: bool, augment: Callable | None = None,
                  generator: torch.Generator | None = None, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, H, W) from the tensor cache (array or tensor) -> the model's float input (N, 1, H, W) on `device`.

    The uint8 images travel to the device (a quarter of the bytes of float); the conversion, the augmentation
    (`cxrflow.train.BatchAugment`) and the per-image z-score run there. The convention is the one recorded in
    metadata.json: value / 255, then a per-image z-score if `image.zscore`.
    """
    x = images_uint8 if isinstance(images_uint8, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images_uint8))
    if device.type == "cuda" and x.device.type == "cpu":  # a loader's batch may come pinned, or already on the card
        x = (x if x.is_pinned() else x.pin_memory()).to(device, non_blocking=True)
    x = x.float().div_(255.0).unsqueeze(1)
    if augment is not None:
        x = augment(x, generator)
    if zscore:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
        x = (x - mean) / std
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def predict(model, images: np.ndarray, device, zscore: bool, batch: int = 64, amp_dtype=None) -> np.ndarray:
    """P(finding) for uint8 images (N, H, W) in memory, in batches, without augmentation: (N,) for a one-logit
    model, (N, outputs) otherwise."""
    batches = (images[start : start + batch] for start in range(0, len(images), batch))
    return _collect(model, batches, len(images), torch.device(device), zscore, amp_dtype)


@torch.no_grad()
def predict_cached(model, cache: "TensorCache", image_ids, device, zscore: bool, batch: int = 64, amp_dtype=None,
                   log=None) -> np.ndarray:
    """`predict` for images of the tensor cache, by id, streamed: each batch is read from the memory-mapped shards
    when it is needed (`cxrflow.datasets.read_batches`), never the whole set. Progress goes to `log` (a line about
    every PROGRESS_SECONDS) when given."""
    device = torch.device(device)
    ids = np.asarray(list(image_ids), dtype=object)
    batches = read_batches(cache, ids, consecutive(len(ids), batch), loader_workers(device),
                           pin_memory=device.type == "cuda")
    return _collect(model, batches, len(ids), device, zscore, amp_dtype, Progress("predict", len(ids), log, "images"))


def _collect(model, batches, n: int, device: torch.device, zscore: bool, amp_dtype, progress=None) -> np.ndarray:
    """The probabilities of each batch, written into one array as they come. Keeping each batch's small output
    tensor instead would hold on to the allocator's memory around it (measured: ~300 KB per batch of 64 at 64 px,
    250 MB over 50k images), so that memory would grow with the number of images."""
    model.eval()
    out, done = np.zeros(0, dtype=np.float32), 0
    for images in batches:
        x = prepare_batch(images, device, zscore, channels_last=device.type == "cuda")
        if amp_dtype is not None:
            with torch.autocast(device.type, dtype=amp_dtype):
                logits = model(x)
        else:
            logits = model(x)
        probs = torch.sigmoid(logits.float()).squeeze(1).cpu().numpy()
        if done == 0:
            out = np.empty((n, *probs.shape[1:]), dtype=np.float32)
        out[done : done + len(probs)] = probs
        done += len(probs)
        if progress is not None:
            progress.update(len(probs))
    if progress is not None:
        progress.close()
    return out


class Progress:
    """How far a loop over `total` items is: a tqdm bar when stderr is a terminal; otherwise (a rule's log file) a
    line through `log` once `seconds` have passed since the last one, with the rate and the time left, and a last
    line at the end when there was any. A short loop logs nothing. `log=None`: silent."""

    def __init__(self, what: str, total: int, log=None, unit: str = "items", seconds: float | None = None):
        self.what, self.total, self.log, self.unit = what, total, log, unit
        self.seconds = PROGRESS_SECONDS if seconds is None else seconds
        self.done, self.lines = 0, 0
        self.started = self.last = time.monotonic()
        self.bar = None
        if log is not None and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit=unit.removesuffix("s"), file=sys.stderr, leave=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.log is not None and time.monotonic() - self.last >= self.seconds:
            self._line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.lines:
            self._line()

    def _line(self) -> None:
        now = time.monotonic()
        rate = self.done / max(now - self.started, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        self.log(f"{self.what}: {self.done}/{self.total} {self.unit} ({rate:.1f}/s, {left:.0f} s left)")
        self.last, self.lines = now, self.lines + 1
