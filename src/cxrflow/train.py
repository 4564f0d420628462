"""Training one binary classifier from a split manifest and the tensor cache.

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
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from cxrflow.devices import acquire_slot, visible_devices
from cxrflow.errors import CxrflowError
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


def prepare_batch(images_uint8: np.ndarray, device: torch.device, zscore: bool, augment: BatchAugment | None = None,
                  generator: torch.Generator | None = None, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, H, W) from the tensor cache -> the model's float input (N, 1, H, W) on `device`.

    The uint8 images travel to the device (a quarter of the bytes of float); the conversion, the augmentation
    and the per-image z-score run there. The convention is the one recorded in metadata.json: value / 255, then
    a per-image z-score if `image.zscore`.
    """
    x = torch.from_numpy(np.ascontiguousarray(images_uint8))
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
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


def amp_dtype_for(device: torch.device):
    """bf16 where the card has it (no loss scaling needed), else fp16; None (fp32) on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@torch.no_grad()
def predict(model, images: np.ndarray, device, zscore: bool, batch: int = 64, amp_dtype=None) -> np.ndarray:
    """P(finding) for uint8 images (N, H, W), in batches, without augmentation."""
    device = torch.device(device)
    model.eval()
    out = []
    for start in range(0, len(images), batch):
        x = prepare_batch(images[start : start + batch], device, zscore, channels_last=device.type == "cuda")
        if amp_dtype is not None:
            with torch.autocast(device.type, dtype=amp_dtype):
                logits = model(x)
        else:
            logits = model(x)
        out.append(torch.sigmoid(logits.float()).squeeze(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


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


def train(manifest: pd.DataFrame, cache: "TensorCache", cfg: dict, pathology: str, out_dir: str | Path,
          seed: int, log=print) -> TrainResult:
    """Train on the manifest's train split, select on val AUC; writes best.pt and checkpoint.pt into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_cfg, train_cfg = cfg["model"], cfg["train"]
    run_hash = config_hash(model_cfg, train_cfg, cfg["image"], seed, pathology, manifest.to_dict("list"))

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
        return _fit(manifest, cache, cfg, pathology, out_dir, seed, run_hash, device, log)
    finally:
        slot.release()


def _fit(manifest, cache, cfg, pathology, out_dir, seed, run_hash, device, log) -> TrainResult:
    from cxrflow.tensors import INTENSITY_CONVENTION

    model_cfg, train_cfg, image_cfg = cfg["model"], cfg["train"], cfg["image"]
    size, zscore = image_cfg["size"], image_cfg.get("zscore", False)
    train_rows = manifest[manifest["split"] == "train"].reset_index(drop=True)
    if train_cfg.get("permute_labels", False):
        # The learning control: labels shuffled among the training images, so nothing but an artefact of the
        # pipeline can be learned; the test AUC of such a model must be at chance (benchmarks/learning_control.py).
        shuffled = np.random.default_rng([seed, 7]).permutation(train_rows["label"].to_numpy())
        train_rows = train_rows.assign(label=shuffled)
        log(f"CONTROL: the {len(shuffled)} training labels are permuted (train.permute_labels)")
    val_rows = manifest[manifest["split"] == "val"].reset_index(drop=True)
    if train_cfg.get("permute_labels", False):
        # Model selection reads the validation labels: permuted too, or choosing the epoch would leak the truth.
        val_rows = val_rows.assign(label=np.random.default_rng([seed, 8]).permutation(val_rows["label"].to_numpy()))
    train_images = cache.load(train_rows["image_id"])
    val_images = cache.load(val_rows["image_id"])
    labels = torch.tensor(train_rows["label"].to_numpy(), dtype=torch.float32)

    model = build_model(model_cfg).to(device)
    use_cuda = device.type == "cuda"
    amp_dtype = amp_dtype_for(device)
    if use_cuda:
        model = model.to(memory_format=torch.channels_last)
    effective = train_cfg["batch_size"]
    micro = pick_micro_batch(model, size, effective, device, amp_dtype)
    # Whole batches only (the remainder is a different random few each epoch): a batch of one breaks BatchNorm.
    steps_per_epoch = max(1, len(train_rows) // effective)
    epochs = train_cfg["epochs"]
    optimizer, scheduler, scaler = optimization(model, train_cfg, steps_per_epoch, amp_dtype)
    weighting = train_cfg.get("weighting", "class")
    weights = torch.tensor(sample_weights(train_rows, weighting), dtype=torch.float32)
    augment = BatchAugment.from_config(train_cfg.get("augment", {}))

    checkpoint_path = out_dir / "checkpoint.pt"
    history, start_epoch, best = resume(checkpoint_path, run_hash, model, optimizer, scheduler, scaler, log)

    patience = train_cfg.get("early_stopping_patience")
    for epoch in range(start_epoch, epochs):
        if patience and epoch - best["epoch"] > patience:
            log(f"early stop at epoch {epoch}: no val AUC gain for {patience} epochs")
            break
        started = time.perf_counter()
        model.train()
        # Every draw of the epoch (order and augmentation) comes from this generator: resumable, device-independent.
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(len(train_rows), generator=generator)
        total_loss = torch.zeros((), device=device)

        def micro_step(chunk, share):
            x = prepare_batch(train_images[chunk.numpy()], device, zscore, augment, generator, channels_last=use_cuda)
            y = labels[chunk].to(device, non_blocking=True).unsqueeze(1)
            w = weights[chunk].to(device, non_blocking=True).unsqueeze(1)
            loss_fn = functools.partial(torch.nn.functional.binary_cross_entropy_with_logits, weight=w)
            return forward_backward(model, x, y, loss_fn, amp_dtype, scaler, weight=share)

        for step in range(steps_per_epoch):
            batch_index = order[step * effective : (step + 1) * effective]
            loss, micro = accumulate_step(model, batch_index, micro, micro_step, optimizer, generator, log)
            total_loss += loss
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
        val_prob = predict(model, val_images, device, zscore, amp_dtype=amp_dtype)
        val_auc = float(roc_auc_score(val_rows["label"], val_prob)) if val_rows["label"].nunique() == 2 else float("nan")
        record = {"epoch": epoch, "train_loss": float(total_loss) / max(1, steps_per_epoch * effective), "val_auc": val_auc,
                  "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - started}
        history.append(record)
        log(json.dumps(record))
        if val_auc > best["val_auc"]:
            best = {"epoch": epoch, "val_auc": val_auc}
            with atomic_path(out_dir / "best.pt") as tmp:
                torch.save(model.state_dict(), tmp)
        with atomic_path(checkpoint_path) as tmp:
            torch.save({
                "run_hash": run_hash, "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "history_columns": list(record), "history": [list(h.values()) for h in history],
                "best_epoch": best["epoch"], "best_val_auc": best["val_auc"],
            }, tmp)

    history_frame = pd.DataFrame(history)
    metadata = {
        "pathology": pathology,
        "label_key": cfg["cohorts"]["pathologies"][pathology]["positive"],
        "architecture": {"library": model_cfg.get("library", "timm"), "name": model_cfg["name"],
                         **({"variant": model_cfg["variant"]} if "variant" in model_cfg else {})},
        "input": {"size": size, "channels": 1, "intensity": INTENSITY_CONVENTION, "zscore": zscore,
                  "clip_percentiles": list(image_cfg.get("clip_percentiles", (0.5, 99.5))),
                  "clahe": image_cfg.get("clahe", False)},
        "output": "one logit; sigmoid gives P(finding)",
        "best_epoch": best["epoch"],
        "best_val_auc": best["val_auc"],
        "epochs_run": len(history),
        "effective_batch": effective,
        "micro_batch": micro,
        "batchnorm_images": micro,
        "loss_weighting": weighting,
        "permuted_labels": bool(train_cfg.get("permute_labels", False)),
        "augmentation": {"batched_on_device": True, **asdict(augment)},
        "versions": _versions(),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "config_hash": run_hash,
        "runtime": {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "amp_dtype": str(amp_dtype).removeprefix("torch.") if amp_dtype else "float32",
                    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "slurm_job_id": os.environ.get("SLURM_JOB_ID")},
    }
    return TrainResult(best["epoch"], best["val_auc"], history_frame, metadata)


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
