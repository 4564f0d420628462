"""Training from a split manifest and the tensor cache: one binary classifier per finding (`train`), or one
multi-label network (`cxrflow.multilabel.train_multilabel`); both run the one epoch loop here (`fit`, given a `Task`).

Streaming: each step's images are read as slices of the memory-mapped cache when the step comes
(`cxrflow.datasets.read_batches`, a seeded permutation of row numbers), and validation streams too
(`cxrflow.inference.predict_cached`), so peak memory is the model and a few batches, whatever the cohort's size.

Resumable: after every epoch a checkpoint (weights, optimizer, scheduler, history) is written atomically.
A restarted job continues from the last finished epoch. Every random draw of an epoch is seeded from
(seed, epoch), so on the CPU a resumed run ends exactly where an uninterrupted one would.

On a GPU: mixed precision (bf16 where supported) and channels_last, the effective batch split into micro-batches
that fit the card (gradient accumulation), and augmentation of whole batches on the device (`BatchAugment`).
If the card still runs out of memory during a step (another process took memory, a larger input), the micro-batch
halves and the step is redone (`accumulate_step`) instead of failing the job.

BatchNorm under micro-batches: gradient accumulation makes the optimizer step equal to one on the whole effective
batch for everything except BatchNorm. Each micro-batch is normalised with its own mean and variance, and the
running statistics (used at evaluation) are updated once per micro-batch, with the layer's momentum. So with a
micro-batch smaller than the effective batch, the batch statistics are noisier (a micro-batch of 8 normalises over 8
images, not 32) and the running averages move more often per step; two cards that pick different micro-batches
optimize the same loss but not bit for bit the same normalisation. The micro-batch in use is recorded in
metadata.json (`micro_batch`, and `batchnorm_images` the images each BatchNorm statistic was computed over).
Importing this module pulls in neither MONAI nor the image decoders, so benchmarks/gpu_train.py runs where only
torch and timm are installed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import math
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd
import torch

from cxrflow.datasets import loader_workers, read_batches
from cxrflow.devices import acquire_slot, visible_devices
from cxrflow.errors import CxrflowError
from cxrflow.inference import Progress, amp_dtype_for, predict_cached, prepare_batch
from cxrflow.io import atomic_path, write_csv, write_json
from cxrflow.models import build_model

if TYPE_CHECKING:
    from cxrflow.tensors import TensorCache


def config_hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def git_dirty() -> bool | None:
    """Whether the working tree differs from the commit (tracked files only); None outside a git checkout."""
    try:
        result = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                                timeout=10, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(result.stdout.strip()) if result.returncode == 0 else None


@dataclass(frozen=True)
class BatchAugment:
    """Random rotation, zoom, brightness and contrast, drawn per image and applied to a whole batch at once.

    The transforms and their parameter ranges are those of MONAI's RandRotate, RandZoom, RandScaleIntensity and
    RandAdjustContrast (each applied with probability `prob`), written as one affine `grid_sample` plus
    elementwise maths on the batch's own device: per-image CPU augmentation of 380 px images runs at a few
    hundred images/s per core, far below what one GPU trains on. No horizontal flip unless asked: a flip puts
    the heart on the wrong side. Every random number is drawn on the CPU from the caller's generator, a fixed
    count per image, so the draws do not depend on the device, and a resumed epoch draws what the uninterrupted
    one drew.
    """

    rotate_deg: float = 7.0
    zoom: float = 0.1
    brightness: float = 0.1
    contrast_gamma: tuple[float, float] = (0.8, 1.25)
    hflip: bool = False
    prob: float = 0.5

    @classmethod
    def from_config(cls, cfg: dict) -> "BatchAugment":
        return cls(rotate_deg=cfg.get("rotate_deg", 7.0), zoom=cfg.get("zoom", 0.1), brightness=cfg.get("brightness", 0.1),
                   contrast_gamma=tuple(cfg.get("contrast_gamma", (0.8, 1.25))), hflip=cfg.get("hflip", False),
                   prob=cfg.get("prob", 0.5))

    def draw(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-image parameters, with the identity value where the image's coin said "not this transform"."""
        u = torch.rand(n, 10, generator=generator, dtype=torch.float64)
        on = u[:, :5] < self.prob
        lo, hi = self.contrast_gamma
        one = torch.ones(n, dtype=torch.float64)
        return {
            "angle": torch.where(on[:, 0], (2 * u[:, 5] - 1) * math.radians(self.rotate_deg), 0 * one),
            "zoom": torch.where(on[:, 1], 1 + (2 * u[:, 6] - 1) * self.zoom, one),
            "scale": torch.where(on[:, 2], 1 + (2 * u[:, 7] - 1) * self.brightness, one),
            "gamma": torch.where(on[:, 3], lo + u[:, 8] * (hi - lo), one),
            "flip": on[:, 4] & self.hflip,
        }

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x: float (N, 1, H, W) in [0, 1], on any device -> the augmented batch, same shape and device."""
        return self.apply(x, self.draw(len(x), generator))

    @staticmethod
    def apply(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        # affine_grid maps output to input coordinates: sampling at R(angle) / zoom magnifies by `zoom`.
        cos, sin = torch.cos(p["angle"]) / p["zoom"], torch.sin(p["angle"]) / p["zoom"]
        mirror = torch.where(p["flip"], -1.0, 1.0).double()
        zero = torch.zeros_like(cos)
        theta = torch.stack([torch.stack([cos * mirror, -sin, zero], 1), torch.stack([sin * mirror, cos, zero], 1)], 1)
        grid = torch.nn.functional.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
        x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        x = x * p["scale"].to(x.device, x.dtype).view(-1, 1, 1, 1)
        # MONAI's AdjustContrast: gamma on the image's own [min, max], mapped back to that range.
        low = x.amin(dim=(1, 2, 3), keepdim=True)
        span = x.amax(dim=(1, 2, 3), keepdim=True) - low
        gamma = p["gamma"].to(x.device, x.dtype).view(-1, 1, 1, 1)
        return ((x - low) / (span + 1e-7)).pow(gamma) * span + low


def forward_backward(model, x: torch.Tensor, y: torch.Tensor, loss_fn, amp_dtype, scaler, weight: float = 1.0) -> torch.Tensor:
    """One micro-batch: forward (under autocast when amp_dtype is set), loss x weight, backward; returns the loss."""
    if amp_dtype is not None:
        with torch.autocast(x.device.type, dtype=amp_dtype):
            logits = model(x)
    else:
        logits = model(x)
    loss = loss_fn(logits.float(), y) * weight
    scaler.scale(loss).backward()
    return loss.detach()


def sample_weights(rows: pd.DataFrame, scheme: str) -> np.ndarray:
    """Per-image loss weights (mean 1) for the training rows (columns label, patient_id).

    - "class": each class carries half the total weight, so an unbalanced cohort (balance: none) is not
      learned as "mostly negative"; the same as BCE's pos_weight = negatives / positives.
    - "patient": as "class", and within a class every patient carries the same weight whatever the number of
      their images. Archives with follow-up films (NIH: up to 184 images of one patient) otherwise teach the
      model a few patients' anatomy rather than the finding.
    - "none": every image weighs 1.
    """
    label = rows["label"].to_numpy()
    weight = np.ones(len(rows))
    if scheme == "none":
        return weight
    if scheme == "patient":
        weight = 1.0 / rows.groupby("patient_id")["label"].transform("size").to_numpy()
    elif scheme != "class":
        raise CxrflowError(f"train.weighting: {scheme!r} is not one of ['class', 'patient', 'none']")
    for value in (0, 1):
        members = label == value
        if members.any():
            weight[members] *= 0.5 / weight[members].sum()
    return weight * len(weight) / weight.sum()


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def pick_micro_batch(model, size: int, effective: int, device: torch.device, amp_dtype) -> int:
    """The micro-batch for the card: the effective batch, halved (integer division) until a forward and backward of
    that many zero images at the training size, under autocast, fits: effective, effective // 2, ..., 1. The result
    need not divide the effective batch (48 -> 24, 12, 6, 3, 1); the last micro-batch of a step is then smaller, and
    its loss counts by its share of the batch. On the CPU, the effective batch itself, without a probe. BatchNorm's
    running statistics are restored after the probe; the gradients are dropped."""
    if device.type != "cuda":
        return effective
    # The probe runs in train mode, which would move BatchNorm's running statistics towards its zero input.
    untouched = {k: v.detach().clone() for k, v in model.state_dict().items()}
    micro = effective
    try:
        while micro >= 1:
            try:
                x = torch.zeros(micro, 1, size, size, device=device).to(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=amp_dtype):
                    model(x).float().sum().backward()
                return micro
            except torch.cuda.OutOfMemoryError:
                micro //= 2
            finally:
                model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
        raise RuntimeError("even a micro-batch of 1 does not fit on the GPU")
    finally:
        model.load_state_dict(untouched)


def accumulate_step(model, batch_index: torch.Tensor, micro: int, micro_step, optimizer, generator: torch.Generator,
                    log=print) -> tuple[torch.Tensor, int]:
    """The gradients of one optimizer step over `batch_index`, in micro-batches of `micro` images (accumulation).

    `micro_step(chunk, weight)` runs the forward and backward pass of one micro-batch (its loss times `weight`, the
    chunk's share of the batch) and returns that loss. When the card runs out of memory
    (torch.cuda.OutOfMemoryError), the step's gradients are dropped, BatchNorm's running statistics and the random
    generator go back to where the step began, the micro-batch halves, and the step is redone: the same images and
    the same augmentation, as if the smaller micro-batch had been used from the start. A micro-batch of 1 that does
    not fit is an error. Returns (the loss summed over the batch, the micro-batch now in use).
    """
    generator_state = generator.get_state()
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    while True:
        optimizer.zero_grad(set_to_none=True)
        try:
            total = 0.0  # a tensor on the training device after the first micro-batch: no synchronisation per step
            for chunk in batch_index.split(micro):
                total = total + micro_step(chunk, len(chunk) / len(batch_index)) * len(batch_index)
            return total, micro
        except torch.cuda.OutOfMemoryError:
            if micro == 1:
                raise
        # Outside the handler, so that the traceback's frames (and the activations they hold) are released first.
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
        generator.set_state(generator_state)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        micro = max(1, micro // 2)
        log(f"out of GPU memory: the micro-batch is halved to {micro} and the step redone")


@dataclass
class TrainResult:
    best_epoch: int
    best_val_auc: float
    history: pd.DataFrame
    metadata: dict


def optimization(model, train_cfg: dict, steps_per_epoch: int, amp_dtype):
    """AdamW, the cosine schedule with warm-up over the whole run, and the fp16 gradient scaler (off otherwise)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg["lr"], weight_decay=train_cfg.get("weight_decay", 1e-4))
    total = train_cfg["epochs"] * steps_per_epoch
    scheduler = cosine_with_warmup(optimizer, int(train_cfg.get("warmup_epochs", 1) * steps_per_epoch), total)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    return optimizer, scheduler, scaler


def resume(checkpoint_path: Path, run_hash: str, model, optimizer, scheduler, scaler, log) -> tuple[list, int, dict]:
    """(history, first epoch to run, best so far), restoring model and optimizer state from the last finished
    epoch's checkpoint when it belongs to this configuration (its run hash); a fresh start otherwise."""
    if not checkpoint_path.exists():
        return [], 0, {"epoch": -1, "val_auc": -1.0}
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    if state.get("run_hash") != run_hash:
        log(f"ignoring {checkpoint_path}: it belongs to another configuration")
        return [], 0, {"epoch": -1, "val_auc": -1.0}
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    history = [dict(zip(state["history_columns"], row)) for row in state["history"]]
    best = {"epoch": int(state["best_epoch"]), "val_auc": float(state["best_val_auc"])}
    log(f"resuming after epoch {int(state['epoch'])} from {checkpoint_path}")
    return history, int(state["epoch"]) + 1, best


@dataclass
class Task:
    """What a training mode decides; `fit` does the rest, the same for both modes (device, epochs, micro-batches,
    checkpoints, early stopping, history).

    The binary model of one finding (`train`) and the multi-label network (`cxrflow.multilabel.train_multilabel`)
    differ only here: the training images (`train_ids`), their targets (images, outputs: 1, 0, or NaN where a label
    is undefined) and per-label loss weights of the same shape, the loss `loss(logits, targets, weights)`, the
    validation images, and `score(val probabilities (images, outputs)) -> {"val_auc": the score that selects the
    epoch, further history columns}`. `build()` makes the network; it runs after the seed is set.
    """

    train_ids: np.ndarray
    targets: torch.Tensor
    weights: torch.Tensor
    val_ids: np.ndarray
    loss: Callable
    score: Callable[[np.ndarray], dict]
    build: Callable[[], torch.nn.Module]


@dataclass
class Fitted:
    """The outcome of `fit`: the best epoch, the history, and how the run went (recorded in metadata.json)."""

    best_epoch: int
    best_val_auc: float
    history: pd.DataFrame
    effective_batch: int
    micro_batch: int
    augment: BatchAugment
    device: torch.device
    amp_dtype: object


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The binary models' loss: BCE with per-image weights (`sample_weights`), averaged over the images."""
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, weight=weights)


def output_aucs(labels: np.ndarray, probs: np.ndarray) -> list[float]:
    """ROC AUC of each output (column) over the images whose label is defined (not NaN); NaN where one class is
    missing."""
    from sklearn.metrics import roc_auc_score  # here: importing scikit-learn pulls in SciPy

    aucs = []
    for k in range(labels.shape[1]):
        known = ~np.isnan(labels[:, k])
        y = labels[known, k]
        aucs.append(float(roc_auc_score(y, probs[known, k])) if len(np.unique(y)) == 2 else float("nan"))
    return aucs


def fit(task: Task, cache: "TensorCache", cfg: dict, out_dir: str | Path, seed: int, run_hash: str,
        log=print) -> Fitted:
    """Train `task` on this process's device slot, select the epoch on the validation score; writes best.pt (the
    best epoch's weights) and checkpoint.pt (resumable) into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    slot = acquire_slot(visible_devices(torch.cuda.device_count()))
    device = torch.device(slot.device)
    if device.type == "cuda":
        # Speed over bit-exactness on the GPU; the CPU run stays bit-exact (and so exactly resumable).
        torch.backends.cudnn.benchmark = True
    else:
        torch.use_deterministic_algorithms(True, warn_only=True)
    log(f"device {device} (visible id {slot.visible_id}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}, "
        f"SLURM_JOB_ID={os.environ.get('SLURM_JOB_ID')})")
    try:
        return _epochs(task, cache, cfg, out_dir, seed, run_hash, device, log)
    finally:
        slot.release()


def _epochs(task: Task, cache, cfg, out_dir: Path, seed, run_hash, device, log) -> Fitted:
    train_cfg, image_cfg = cfg["train"], cfg["image"]
    size, zscore = image_cfg["size"], image_cfg.get("zscore", False)
    model = task.build().to(device)
    use_cuda = device.type == "cuda"
    amp_dtype = amp_dtype_for(device)
    if use_cuda:
        model = model.to(memory_format=torch.channels_last)
    effective = train_cfg["batch_size"]
    micro = pick_micro_batch(model, size, effective, device, amp_dtype)
    # Whole batches only (the remainder is a different random few each epoch): a batch of one breaks BatchNorm.
    steps_per_epoch = max(1, len(task.train_ids) // effective)
    optimizer, scheduler, scaler = optimization(model, train_cfg, steps_per_epoch, amp_dtype)
    augment = BatchAugment.from_config(train_cfg.get("augment", {}))

    checkpoint_path = out_dir / "checkpoint.pt"
    history, start_epoch, best = resume(checkpoint_path, run_hash, model, optimizer, scheduler, scaler, log)

    patience = train_cfg.get("early_stopping_patience")
    for epoch in range(start_epoch, train_cfg["epochs"]):
        if patience and epoch - best["epoch"] > patience:
            log(f"early stop at epoch {epoch}: no val AUC gain for {patience} epochs")
            break
        started = time.perf_counter()
        model.train()
        # Every draw of the epoch (order and augmentation) comes from this generator: resumable, device-independent.
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(len(task.train_ids), generator=generator)
        batches = [order[step * effective : (step + 1) * effective] for step in range(steps_per_epoch)]
        total_loss = torch.zeros((), device=device)
        progress = Progress(f"epoch {epoch}", steps_per_epoch, log, unit="steps")
        # Each step's images are read from the memory-mapped cache when the step comes (ahead by loader workers on
        # a GPU); the micro-batches index that one batch.
        reader = read_batches(cache, task.train_ids, [b.numpy() for b in batches], loader_workers(device), use_cuda)
        for batch_index, images in zip(batches, reader):
            images = images.to(device, non_blocking=True)
            targets, weights = task.targets[batch_index], task.weights[batch_index]

            def micro_step(chunk, share):
                x = prepare_batch(images[chunk.to(device)], device, zscore, augment, generator, channels_last=use_cuda)
                y = targets[chunk].to(device, non_blocking=True)
                loss_fn = functools.partial(task.loss, weights=weights[chunk].to(device, non_blocking=True))
                return forward_backward(model, x, y, loss_fn, amp_dtype, scaler, weight=share)

            loss, micro = accumulate_step(model, torch.arange(len(batch_index)), micro, micro_step, optimizer, generator,
                                          log)
            total_loss += loss
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            progress.update()
        progress.close()
        val_prob = predict_cached(model, cache, task.val_ids, device, zscore, amp_dtype=amp_dtype, log=log)
        scores = task.score(val_prob.reshape(len(task.val_ids), task.targets.shape[1]))
        record = {"epoch": epoch, "train_loss": float(total_loss) / max(1, steps_per_epoch * effective), **scores,
                  "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - started}
        history.append(record)
        log(json.dumps(record))
        if record["val_auc"] > best["val_auc"]:
            best = {"epoch": epoch, "val_auc": record["val_auc"]}
            with atomic_path(out_dir / "best.pt") as tmp:
                torch.save(model.state_dict(), tmp)
        with atomic_path(checkpoint_path) as tmp:
            torch.save({
                "run_hash": run_hash, "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "history_columns": list(record), "history": [list(h.values()) for h in history],
                "best_epoch": best["epoch"], "best_val_auc": best["val_auc"],
            }, tmp)
    return Fitted(best["epoch"], best["val_auc"], pd.DataFrame(history), effective, micro, augment, device, amp_dtype)


def run_metadata(fitted: Fitted, cfg: dict, run_hash: str) -> dict:
    """The metadata.json entries both modes write: the network, its input convention, and how it was trained."""
    from cxrflow.tensors import INTENSITY_CONVENTION

    model_cfg, image_cfg, device = cfg["model"], cfg["image"], fitted.device
    return {
        "architecture": {"library": model_cfg.get("library", "timm"), "name": model_cfg["name"],
                         **({"variant": model_cfg["variant"]} if "variant" in model_cfg else {})},
        "input": {"size": image_cfg["size"], "channels": 1, "intensity": INTENSITY_CONVENTION,
                  "zscore": image_cfg.get("zscore", False),
                  "clip_percentiles": list(image_cfg.get("clip_percentiles", (0.5, 99.5))),
                  "clahe": image_cfg.get("clahe", False)},
        "best_epoch": fitted.best_epoch,
        "best_val_auc": fitted.best_val_auc,
        "epochs_run": len(fitted.history),
        "effective_batch": fitted.effective_batch,
        "micro_batch": fitted.micro_batch,
        "batchnorm_images": fitted.micro_batch,
        "loss_weighting": cfg["train"].get("weighting", "class"),
        "augmentation": {"batched_on_device": True, **asdict(fitted.augment)},
        "versions": _versions(),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "config_hash": run_hash,
        "runtime": {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "amp_dtype": str(fitted.amp_dtype).removeprefix("torch.") if fitted.amp_dtype else "float32",
                    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "slurm_job_id": os.environ.get("SLURM_JOB_ID")},
    }


def train(manifest: pd.DataFrame, cache: "TensorCache", cfg: dict, pathology: str, out_dir: str | Path,
          seed: int, log=print) -> TrainResult:
    """Train on the manifest's train split, select on val AUC; writes best.pt and checkpoint.pt into out_dir."""
    model_cfg, train_cfg = cfg["model"], cfg["train"]
    run_hash = config_hash(model_cfg, train_cfg, cfg["image"], seed, pathology, manifest.to_dict("list"))
    train_rows = manifest[manifest["split"] == "train"].reset_index(drop=True)
    val_rows = manifest[manifest["split"] == "val"].reset_index(drop=True)
    permuted = bool(train_cfg.get("permute_labels", False))
    if permuted:
        # The learning control: labels shuffled among the training images, so nothing but an artefact of the
        # pipeline can be learned; the test AUC of such a model must be at chance (benchmarks/learning_control.py).
        shuffled = np.random.default_rng([seed, 7]).permutation(train_rows["label"].to_numpy())
        train_rows = train_rows.assign(label=shuffled)
        log(f"CONTROL: the {len(shuffled)} training labels are permuted (train.permute_labels)")
        # Model selection reads the validation labels: permuted too, or choosing the epoch would leak the truth.
        val_rows = val_rows.assign(label=np.random.default_rng([seed, 8]).permutation(val_rows["label"].to_numpy()))
    weighting = train_cfg.get("weighting", "class")
    val_labels = val_rows[["label"]].to_numpy(dtype=float)
    task = Task(
        train_ids=train_rows["image_id"].to_numpy(dtype=object),
        targets=torch.tensor(train_rows[["label"]].to_numpy(), dtype=torch.float32),
        weights=torch.tensor(sample_weights(train_rows, weighting), dtype=torch.float32).unsqueeze(1),
        val_ids=val_rows["image_id"].to_numpy(dtype=object),
        loss=weighted_bce,
        score=lambda probs: {"val_auc": output_aucs(val_labels, probs)[0]},
        build=lambda: build_model(model_cfg),
    )
    fitted = fit(task, cache, cfg, out_dir, seed, run_hash, log)
    metadata = {
        "pathology": pathology,
        "label_key": cfg["cohorts"]["pathologies"][pathology]["positive"],
        **run_metadata(fitted, cfg, run_hash),
        "output": "one logit; sigmoid gives P(finding)",
        "permuted_labels": permuted,
    }
    return TrainResult(fitted.best_epoch, fitted.best_val_auc, fitted.history, metadata)


def finish(result: TrainResult, out_dir: str | Path, model_out, metadata_out, history_out) -> None:
    """Publish the best epoch's weights as model.pt (a plain state dict) with its metadata and history."""
    out_dir = Path(out_dir)
    with atomic_path(model_out) as tmp:
        os.replace(out_dir / "best.pt", tmp)
    write_json(result.metadata, metadata_out)
    write_csv(result.history, history_out)
    (out_dir / "checkpoint.pt").unlink(missing_ok=True)


def _versions() -> dict:
    import sklearn
    import timm

    import cxrflow

    try:  # read from the installed metadata: importing MONAI costs seconds, and only its architectures need it
        monai_version = importlib.metadata.version("monai")
    except importlib.metadata.PackageNotFoundError:
        monai_version = "not installed"
    return {"cxrflow": cxrflow.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "monai": monai_version, "scikit-learn": sklearn.__version__, "numpy": np.__version__}
