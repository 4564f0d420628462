"""Training throughput: EfficientNet-B4 at 380 px, fp32 NCHW against AMP + channels_last, and the loader's rate.

    python benchmarks/gpu_train.py            # one GPU: B4 at 380 px, batches 16/32/64 (a few minutes on an H100)
    python benchmarks/gpu_train.py --quick    # tiny sizes; runs on the CPU too (tests/test_benchmarks_gpu.py)

The training steps are those of cxrflow.train (`prepare_batch`, `forward_backward`, AdamW, the weighted BCE
loss), on a batch already on the device, so that they measure what the GPU consumes. The loader is measured on
its own, in the same run, as two parts and their sum:
  * cache read: random batches read from a memory-mapped tensor cache as training reads them
    (`cxrflow.datasets.read_batches`, with the loader workers a GPU gets), the uint8 images written here to a
    temporary folder in the pipeline's own shard format;
  * batch pipeline: what train.py does per step with a batch read: send the uint8 batch to the device, convert,
    augment (`BatchAugment`, on the device) and z-score;
  * loader: both in sequence (a lower bound: on a GPU the workers read the next batches while the card computes).
It prints images/s for each, the ratio AMP + channels_last / fp32 NCHW at each batch size, and the loader's
ratio to the fastest training rate. Goals (issue 6): AMP + channels_last >= 1.5x fp32 NCHW; >= 700 images/s for
B4 at 380 px on an H100; the loader >= 3x what the GPU consumes. Last, a smoke run of `cxrflow.train.train` itself
(2 epochs of 8 steps on random images, on the device the slot logic picks) shows the whole training path there.

`--mode multilabel` (issue 17) measures the same steps for one network with `--outputs` logits (nine findings by
default) under the masked BCE of cxrflow.multilabel (a third of the labels missing, as outside a cohort), and
smoke-runs `cxrflow.multilabel.train_multilabel` instead. Feed its --json to `benchmarks/multilabel.py compute
--gpu-json` for the GPU-hours of nine binary models against one multi-label model.

Imports only what a bare GPU node has: torch, timm, numpy, pandas, pyarrow, scikit-learn, scikit-image, SciPy,
Pillow, PyYAML, matplotlib (tests/test_benchmarks_gpu.py checks every imported module's distribution); MONAI, the
DICOM readers and Snakemake are not imported.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cxrflow.models import build_model  # noqa: E402
from cxrflow.multilabel import build_multilabel_model, masked_bce  # noqa: E402
from cxrflow.inference import amp_dtype_for, prepare_batch  # noqa: E402
from cxrflow.train import BatchAugment, forward_backward  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(step, images_per_step: int, steps: int, warmup: int, device) -> float:
    """Time `steps` calls of step() after `warmup` untimed ones, waiting for the device at both ends."""
    for _ in range(warmup):
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * images_per_step / (time.perf_counter() - started)


def train_rates(model_name: str, size: int, batches: list[int], device, amp_dtype, channels_last: bool, steps: int,
                warmup: int, outputs: int = 1) -> dict[int, float | None]:
    """Images/s of full training steps (forward, loss, backward, AdamW) on a batch resident on the device, per batch
    size; None where the batch does not fit. outputs > 1: the multi-label network and its masked loss."""
    torch.manual_seed(0)
    spec = {"library": "timm", "name": model_name}
    model = (build_model(spec) if outputs == 1 else build_multilabel_model(spec, outputs)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    rates = {}
    for batch in batches:
        images = np.random.default_rng(0).integers(0, 256, (batch, size, size), dtype=np.uint8)
        x = prepare_batch(images, device, zscore=True, channels_last=channels_last)
        if outputs == 1:
            y = (torch.arange(batch, device=device) % 2).float().unsqueeze(1)
            # The per-image weights of cxrflow.train.sample_weights; balanced classes weigh 1.
            loss_fn = functools.partial(torch.nn.functional.binary_cross_entropy_with_logits, weight=torch.ones_like(y))
        else:
            # A third of the labels missing (images outside a cohort), the rest 1 or 0, per-output weights of 1.
            cells = torch.arange(batch * outputs, device=device).view(batch, outputs)
            y = torch.where(cells % 3 == 0, torch.nan, (cells % 2).float())
            loss_fn = functools.partial(masked_bce, weights=torch.ones_like(y))

        def step():
            optimizer.zero_grad(set_to_none=True)
            forward_backward(model, x, y, loss_fn, amp_dtype, scaler)
            scaler.step(optimizer)
            scaler.update()

        try:
            rates[batch] = images_per_second(step, batch, steps, warmup, device)
        except torch.cuda.OutOfMemoryError:
            rates[batch] = None
        finally:
            optimizer.zero_grad(set_to_none=True)
            del x
            if device.type == "cuda":
                torch.cuda.empty_cache()
    del model, optimizer
    return rates


def write_cache(folder: Path, n: int, size: int) -> tuple[Path, list[Path]]:
    """A tensor cache in the pipeline's format: shard_0000.npy (uint8 N x S x S) and index.parquet."""
    rng = np.random.default_rng(1)
    shard = folder / "shard_0000.npy"
    array = np.lib.format.open_memmap(shard, mode="w+", dtype=np.uint8, shape=(n, size, size))
    for start in range(0, n, 256):
        array[start : start + 256] = rng.integers(0, 256, (min(256, n - start), size, size), dtype=np.uint8)
    array.flush()
    del array
    index = pd.DataFrame({"image_id": [f"img{i:06d}" for i in range(n)], "shard": 0, "row": np.arange(n), "status": "ok"})
    index.to_parquet(folder / "index.parquet", index=False)
    return folder / "index.parquet", [shard]


def loader_rates(size: int, batch: int, n_images: int, batches: int, device) -> dict:
    """Images/s of the cache read as training reads it (`cxrflow.datasets.read_batches`: random batches, with the
    loader workers this device gets), of the per-step batch pipeline, and of both together."""
    from cxrflow.datasets import loader_workers, read_batches
    from cxrflow.tensors import TensorCache

    rng = np.random.default_rng(2)
    augment = BatchAugment()
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        index, shards = write_cache(Path(tmp), n_images, size)
        cache = TensorCache.open(index, shards)
        ids = cache.index.index.to_numpy()
        for shard in shards:  # the page cache is warm in training too, after the first epoch
            shard.read_bytes()
        chosen = [rng.choice(len(ids), batch, replace=False) for _ in range(batches + 1)]
        reader = read_batches(cache, ids, chosen, loader_workers(device), pin_memory=device.type == "cuda")
        batches_read = [next(reader)]  # the workers' start is not the rate
        started = time.perf_counter()
        batches_read += list(reader)
        read = batches * batch / (time.perf_counter() - started)

    def pipeline_step():
        images = batches_read[int(rng.integers(len(batches_read)))]
        return prepare_batch(images, device, zscore=True, augment=augment, generator=generator,
                             channels_last=device.type == "cuda")

    pipeline = images_per_second(pipeline_step, batch, batches, 1, device)
    return {"cache_read": read, "batch_pipeline": pipeline, "loader": 1 / (1 / read + 1 / pipeline)}


def smoke_train(model_name: str, size: int, batch: int, epochs: int, n_images: int) -> dict:
    """One real `cxrflow.train.train` run (2 epochs on random images, 2/3 train) on whatever device it picks: the slot
    logic, the micro-batch probe, AMP, channels_last and the checkpointing all run as in the pipeline."""
    import logging

    from cxrflow.tensors import TensorCache
    from cxrflow.train import train

    with tempfile.TemporaryDirectory() as tmp:
        index, shards = write_cache(Path(tmp), n_images, size)
        ids = pd.read_parquet(index)["image_id"]
        manifest = pd.DataFrame({"image_id": ids, "patient_id": ids, "label": np.arange(n_images) % 2,
                                 "split": np.where(np.arange(n_images) < n_images * 2 // 3, "train", "val")})
        cfg = {"image": {"size": size, "zscore": True}, "model": {"library": "timm", "name": model_name},
               "train": {"epochs": epochs, "batch_size": batch, "lr": 1e-3},
               "cohorts": {"pathologies": {"smoke": {"positive": ["smoke"]}}}}
        started = time.perf_counter()
        result = train(manifest, TensorCache.open(index, shards), cfg, "smoke", Path(tmp) / "run", seed=0,
                       log=logging.getLogger("smoke").info)
        seconds = time.perf_counter() - started
    meta = result.metadata
    return {"runtime": meta["runtime"], "micro_batch": meta["micro_batch"], "effective_batch": meta["effective_batch"],
            "epochs_run": meta["epochs_run"], "seconds": round(seconds, 1),
            "epoch_seconds": [round(s, 2) for s in result.history["seconds"]]}


def smoke_train_multilabel(model_name: str, size: int, batch: int, epochs: int, n_images: int, outputs: int) -> dict:
    """One real `cxrflow.multilabel.train_multilabel` run on random images with `outputs` labels, a third missing."""
    import logging

    from cxrflow.multilabel import train_multilabel
    from cxrflow.tensors import TensorCache

    with tempfile.TemporaryDirectory() as tmp:
        index, shards = write_cache(Path(tmp), n_images, size)
        ids = pd.read_parquet(index)["image_id"]
        cells = np.arange(n_images * outputs).reshape(n_images, outputs)
        labels = np.where(cells % 3 == 0, np.nan, (cells + cells // outputs) % 2).astype(np.float32)
        table = pd.DataFrame({"image_id": ids, "patient_id": ids,
                              "split": np.where(np.arange(n_images) < n_images * 2 // 3, "train", "val")})
        for k in range(outputs):
            table[f"finding_{k}"] = labels[:, k]
        cfg = {"image": {"size": size, "zscore": True}, "model": {"library": "timm", "name": model_name},
               "train": {"epochs": epochs, "batch_size": batch, "lr": 1e-3}, "cohorts": {"pathologies": {}}}
        started = time.perf_counter()
        result = train_multilabel(table, TensorCache.open(index, shards), cfg, Path(tmp) / "run", seed=0,
                                  log=logging.getLogger("smoke").info)
        seconds = time.perf_counter() - started
    meta = result.metadata
    return {"runtime": meta["runtime"], "micro_batch": meta["micro_batch"], "effective_batch": meta["effective_batch"],
            "epochs_run": meta["epochs_run"], "outputs": len(meta["outputs"]), "seconds": round(seconds, 1),
            "epoch_seconds": [round(s, 2) for s in result.history["seconds"]]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes that run on a CPU in seconds: efficientnet_b0 at 32 px, batches 2 and 4, 2 steps")
    parser.add_argument("--model", default="efficientnet_b4")
    parser.add_argument("--size", type=int, default=380)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--loader-images", type=int, default=2048)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--mode", choices=["binary", "multilabel"], default="binary",
                        help="multilabel: one network with --outputs logits and the masked BCE (issue 17)")
    parser.add_argument("--outputs", type=int, default=9, help="--mode multilabel: logits of the network")
    args = parser.parse_args(argv)
    outputs = args.outputs if args.mode == "multilabel" else 1
    if args.quick:
        args.model, args.size, args.batches, args.steps, args.warmup, args.loader_images = "efficientnet_b0", 32, [2, 4], 2, 1, 64

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True  # as train.py does on a GPU
    amp = amp_dtype_for(device) or torch.bfloat16  # on the CPU, bf16 autocast: exercised, not a goal
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; {args.model} at {args.size} px; AMP dtype {str(amp).removeprefix('torch.')}"
          + (f"; fp32 convolutions may use TF32: {torch.backends.cudnn.allow_tf32} (PyTorch's default)" if device.type == "cuda" else "")
          + f"; mode {args.mode}" + (f" ({outputs} outputs, masked BCE)" if outputs > 1 else ""))
    modes = {"fp32 NCHW": (None, False), "AMP + channels_last": (amp, True)}
    rates = {}
    for mode, (dtype, channels_last) in modes.items():
        rates[mode] = train_rates(args.model, args.size, args.batches, device, dtype, channels_last, args.steps, args.warmup,
                                  outputs)
        for batch, rate in rates[mode].items():
            shown = f"{rate:9.1f}" if rate else "      OOM"
            print(f"train  batch {batch:4d}  {mode:20s} {shown} images/s", flush=True)
    ratios = {b: rates["AMP + channels_last"][b] / rates["fp32 NCHW"][b]
              for b in args.batches if rates["AMP + channels_last"][b] and rates["fp32 NCHW"][b]}
    for batch, ratio in ratios.items():
        print(f"ratio  batch {batch:4d}  AMP + channels_last / fp32 NCHW = {ratio:.2f}x (goal >= 1.5x)")
    best = max(r for mode in rates.values() for r in mode.values() if r)
    loader = loader_rates(args.size, max(args.batches), args.loader_images, max(4, args.steps), device)
    for part, rate in loader.items():
        print(f"loader {part:15s} {rate:9.1f} images/s  ({rate / best:.1f}x the fastest training rate, goal >= 3x)")
    best_amp = max((r for r in rates["AMP + channels_last"].values() if r), default=0.0)
    print(f"best AMP + channels_last: {best_amp:.1f} images/s (goal on an H100 for B4 at 380 px: >= 700)")
    if outputs > 1:
        smoke = smoke_train_multilabel(args.model, args.size, max(args.batches), 2, 12 * max(args.batches), outputs)
        trained = f"cxrflow.multilabel.train_multilabel ({smoke['outputs']} outputs)"
    else:
        smoke = smoke_train(args.model, args.size, max(args.batches), 2, 12 * max(args.batches))
        trained = "cxrflow.train.train"
    print(f"smoke  {trained}: {smoke['epochs_run']} epochs in {smoke['seconds']} s on {smoke['runtime']['device']} "
          f"({smoke['runtime']['device_name']}), AMP {smoke['runtime']['amp_dtype']}, micro-batch {smoke['micro_batch']} "
          f"of {smoke['effective_batch']}, epoch seconds {smoke['epoch_seconds']}")
    result = {"device": name, "model": args.model, "size": args.size, "mode": args.mode, "outputs": outputs,
              "train_images_per_s": rates,
              "amp_over_fp32": ratios, "loader_images_per_s": loader, "loader_over_fastest_training": loader["loader"] / best,
              "smoke_train": smoke}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
