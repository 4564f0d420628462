"""Training one binary classifier from a split manifest and the tensor cache.

Resumable: after every epoch a checkpoint (weights, optimizer, scheduler, history) is written atomically.
A restarted job continues from the last finished epoch. Every random draw of an epoch is seeded from
(seed, epoch), so on the CPU a resumed run ends exactly where an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from cxrflow.devices import DeviceSlot, acquire_slot, visible_devices
from cxrflow.io import atomic_path, write_csv, write_json
from cxrflow.models import build_model
from cxrflow.tensors import INTENSITY_CONVENTION, TensorCache


def config_hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def augmentation(cfg: dict):
    """MONAI augmentations. No horizontal flip unless asked: a flip puts the heart on the wrong side."""
    from monai import transforms as mt

    steps = [
        mt.RandRotate(range_x=math.radians(cfg.get("rotate_deg", 7)), prob=0.5, padding_mode="zeros"),
        mt.RandZoom(min_zoom=1 - cfg.get("zoom", 0.1), max_zoom=1 + cfg.get("zoom", 0.1), prob=0.5, padding_mode="constant"),
        mt.RandScaleIntensity(factors=cfg.get("brightness", 0.1), prob=0.5),
        mt.RandAdjustContrast(gamma=tuple(cfg.get("contrast_gamma", (0.8, 1.25))), prob=0.5),
    ]
    if cfg.get("hflip", False):
        steps.append(mt.RandFlip(spatial_axis=1, prob=0.5))
    return mt.Compose(steps)


def to_input(images_uint8: torch.Tensor, zscore: bool) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, H, W), the convention recorded in metadata.json."""
    x = images_uint8.float().div_(255.0).unsqueeze(1)
    if zscore:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
        x = (x - mean) / std
    return x


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def pick_micro_batch(model, size: int, effective: int, device: torch.device, amp_dtype) -> int:
    """The largest power-of-two divisor of the effective batch whose forward+backward fits the card."""
    if device.type != "cuda":
        return effective
    micro = effective
    while micro >= 1:
        try:
            x = torch.zeros(micro, 1, size, size, device=device).to(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=amp_dtype):
                model(x).float().sum().backward()
            model.zero_grad(set_to_none=True)
            return micro
        except torch.cuda.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            micro //= 2
    raise RuntimeError("even a micro-batch of 1 does not fit on the GPU")


@torch.no_grad()
def predict(model, images: np.ndarray, device, zscore: bool, batch: int = 64, amp_dtype=None) -> np.ndarray:
    model.eval()
    out = []
    for start in range(0, len(images), batch):
        x = to_input(torch.from_numpy(images[start : start + batch]), zscore).to(device)
        if device.type == "cuda":
            x = x.to(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=amp_dtype):
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


def train(manifest: pd.DataFrame, cache: TensorCache, cfg: dict, pathology: str, out_dir: str | Path,
          seed: int, log=print) -> TrainResult:
    """Train on the manifest's train split, select on val AUC; writes model.pt, metadata.json, history.csv."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_cfg, train_cfg = cfg["model"], cfg["train"]
    size = cfg["image"]["size"]
    zscore = cfg["image"].get("zscore", False)
    run_hash = config_hash(model_cfg, train_cfg, cfg["image"], seed, pathology, manifest.to_dict("list"))

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    slot = acquire_slot(visible_devices(torch.cuda.device_count()))
    device = torch.device(slot.device)
    log(f"device {device} (visible id {slot.visible_id}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}, "
        f"SLURM_JOB_ID={os.environ.get('SLURM_JOB_ID')})")
    try:
        return _fit(manifest, cache, cfg, model_cfg, train_cfg, size, zscore, pathology, out_dir, seed, run_hash,
                    device, slot, log)
    finally:
        slot.release()


def _fit(manifest, cache, cfg, model_cfg, train_cfg, size, zscore, pathology, out_dir, seed, run_hash, device,
         slot: DeviceSlot, log) -> TrainResult:
    train_rows = manifest[manifest["split"] == "train"].reset_index(drop=True)
    val_rows = manifest[manifest["split"] == "val"].reset_index(drop=True)
    train_images = cache.load(train_rows["image_id"])
    val_images = cache.load(val_rows["image_id"])
    labels = torch.tensor(train_rows["label"].to_numpy(), dtype=torch.float32)

    model = build_model(model_cfg).to(device)
    use_cuda = device.type == "cuda"
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if use_cuda else None
    if use_cuda:
        model = model.to(memory_format=torch.channels_last)
    effective = train_cfg["batch_size"]
    micro = pick_micro_batch(model, size, effective, device, amp_dtype)
    accumulation = effective // micro
    # Whole batches only (the remainder is a different random few each epoch): a batch of one breaks BatchNorm.
    steps_per_epoch = max(1, len(train_rows) // effective)
    epochs = train_cfg["epochs"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg["lr"], weight_decay=train_cfg.get("weight_decay", 1e-4))
    scheduler = cosine_with_warmup(optimizer, int(train_cfg.get("warmup_epochs", 1) * steps_per_epoch), epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=use_cuda and amp_dtype == torch.float16)
    # Loss weighting keeps unbalanced cohorts (balance: none) honest; with balanced cohorts it is 1.
    n_pos = float(labels.sum())
    pos_weight = torch.tensor([(len(labels) - n_pos) / max(1.0, n_pos)], device=device)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    augment = augmentation(train_cfg.get("augment", {}))

    checkpoint_path = out_dir / "checkpoint.pt"
    history, start_epoch, best = [], 0, {"epoch": -1, "val_auc": -1.0}
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        if state.get("run_hash") == run_hash:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            history = [dict(zip(state["history_columns"], row)) for row in state["history"]]
            best = {"epoch": int(state["best_epoch"]), "val_auc": float(state["best_val_auc"])}
            start_epoch = int(state["epoch"]) + 1
            log(f"resuming after epoch {start_epoch - 1} from {checkpoint_path}")
        else:
            log(f"ignoring {checkpoint_path}: it belongs to another configuration")

    patience = train_cfg.get("early_stopping_patience")
    for epoch in range(start_epoch, epochs):
        if patience and epoch - best["epoch"] > patience:
            log(f"early stop at epoch {epoch}: no val AUC gain for {patience} epochs")
            break
        started = time.perf_counter()
        model.train()
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        augment.set_random_state(seed=(seed * 1000 + epoch) % (2**32))
        order = torch.randperm(len(train_rows), generator=generator)
        total_loss, seen = 0.0, 0
        for step in range(steps_per_epoch):
            batch_index = order[step * effective : (step + 1) * effective]
            optimizer.zero_grad(set_to_none=True)
            for chunk in batch_index.split(micro):
                x = to_input(torch.from_numpy(train_images[chunk.numpy()]), zscore=False)
                x = torch.stack([torch.as_tensor(augment(img)) for img in x]).float()
                if zscore:
                    x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) / x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
                y = labels[chunk].to(device).unsqueeze(1)
                x = x.to(device, non_blocking=True)
                if use_cuda:
                    x = x.to(memory_format=torch.channels_last)
                    with torch.autocast("cuda", dtype=amp_dtype):
                        loss = loss_fn(model(x).float(), y) * len(chunk) / len(batch_index)
                else:
                    loss = loss_fn(model(x), y) * len(chunk) / len(batch_index)
                scaler.scale(loss).backward()
                total_loss += float(loss.detach()) * len(batch_index)
                seen += len(chunk)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
        val_prob = predict(model, val_images, device, zscore, amp_dtype=amp_dtype)
        val_auc = float(roc_auc_score(val_rows["label"], val_prob)) if val_rows["label"].nunique() == 2 else float("nan")
        record = {"epoch": epoch, "train_loss": total_loss / max(1, seen), "val_auc": val_auc,
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
        "architecture": {"library": model_cfg.get("library", "timm"), "name": model_cfg["name"], **({"variant": model_cfg["variant"]} if "variant" in model_cfg else {})},
        "input": {"size": size, "channels": 1, "intensity": INTENSITY_CONVENTION, "zscore": zscore},
        "output": "one logit; sigmoid gives P(finding)",
        "best_epoch": best["epoch"],
        "best_val_auc": best["val_auc"],
        "epochs_run": len(history),
        "effective_batch": effective,
        "micro_batch": micro,
        "versions": _versions(),
        "git_commit": git_commit(),
        "config_hash": run_hash,
        "runtime": {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
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
    import monai
    import sklearn
    import timm

    import cxrflow

    return {"cxrflow": cxrflow.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "monai": monai.__version__, "scikit-learn": sklearn.__version__, "numpy": np.__version__}
