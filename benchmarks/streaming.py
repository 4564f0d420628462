"""Benchmark: peak memory of training and prediction against the size of the tensor cache (issue 14, item 2).

For each size (2k and 50k images by default) it writes a synthetic tensor cache in the pipeline's format (random
uint8 images at 64 px in 8 shards: one .npy per shard and index.parquet with image_id, shard, row, status), then runs,
each in a fresh process, and reports the process's peak resident memory (`resource.getrusage` ru_maxrss):

  train           one epoch of `cxrflow.train.train` (80% train, 20% val, batch 64; validation included)
  predict         `cxrflow.inference.predict_cached` over every image
  train-old       the same epoch with cxrflow.train as it was before streaming (commit OLD_COMMIT): the whole train
                  and val splits read into memory first (skipped outside a git checkout)
  predict-old     `predict` on `cache.load(every id)`, as evaluation did
  train-mapped    the new epoch, but with the pages of the memory map kept mapped (`release_pages` off): what a
                  streaming reader without it shows, since an epoch's touched pages count in RSS

The network is tiny (`--model tiny`: one strided convolution, BatchNorm and a linear head) so that a 50k epoch takes
a minute on a CPU; the data path, the epoch loop, the augmentation and the validation are the pipeline's own.
`--model resnet10t` (or any timm name) trains the real network instead, slower. Goal: train and predict peak RSS
flat (within 10%) from 2k to 50k images.

    python benchmarks/streaming.py                  # 2k and 50k images (a few minutes on 2 cores)
    python benchmarks/streaming.py --sizes 500 4000 --modes train predict
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # benchmark the working tree

OLD_COMMIT = "a08eb2e"  # the last commit whose training read the whole split into memory
SIZE = 64
SHARDS = 8
MODES = ["train", "predict", "train-old", "predict-old", "train-mapped"]


def write_cache(folder: Path, n: int, size: int = SIZE, shards: int = SHARDS) -> tuple[Path, list[Path]]:
    """A tensor cache in the pipeline's format: shard_NNNN.npy (uint8 rows x S x S) and index.parquet."""
    rng = np.random.default_rng(n)
    shard_of = np.arange(n) % shards
    files, rows = [], np.zeros(n, dtype=np.int64)
    for shard in range(shards):
        members = np.flatnonzero(shard_of == shard)
        rows[members] = np.arange(len(members))
        path = folder / f"shard_{shard:04d}.npy"
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(members), size, size))
        for start in range(0, len(members), 1024):
            stop = min(len(members), start + 1024)
            array[start:stop] = rng.integers(0, 256, (stop - start, size, size), dtype=np.uint8)
        array.flush()
        del array
        files.append(path)
    index = pd.DataFrame({"image_id": [f"img{i:07d}" for i in range(n)], "shard": shard_of, "row": rows, "status": "ok"})
    index.to_parquet(folder / "index.parquet", index=False)
    return folder / "index.parquet", files


def tiny_network():
    import torch

    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 5, stride=4), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 1))


def old_train_module():
    """cxrflow.train as of OLD_COMMIT, imported from git under its own name; None outside a git checkout."""
    import importlib.util

    try:
        source = subprocess.run(["git", "show", f"{OLD_COMMIT}:src/cxrflow/train.py"], cwd=ROOT, capture_output=True,
                                text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(tempfile.mkdtemp()) / "train_before_streaming.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("train_before_streaming", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def child(mode: str, folder: Path, model: str) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    import cxrflow.datasets
    import cxrflow.train
    from cxrflow.inference import predict, predict_cached
    from cxrflow.tensors import TensorCache

    torch.set_num_threads(1)
    cache = TensorCache.open(folder / "index.parquet", sorted(folder.glob("shard_*.npy")))
    ids = cache.index.index.to_numpy()
    n = len(ids)
    build = (lambda spec: tiny_network()) if model == "tiny" else cxrflow.train.build_model
    started = time.perf_counter()
    if mode.startswith("train"):
        module = cxrflow.train
        if mode == "train-old":
            module = old_train_module()
            if module is None:
                return {"skipped": f"not a git checkout with commit {OLD_COMMIT}"}
        if mode == "train-mapped":
            cxrflow.datasets.release_pages = lambda array: None
        module.build_model = build
        rng = np.random.default_rng(0)
        manifest = pd.DataFrame({"image_id": ids, "patient_id": ids, "label": rng.integers(0, 2, n),
                                 "split": np.where(np.arange(n) % 5 == 0, "val", "train")})
        cfg = {"image": {"size": SIZE, "zscore": True}, "model": {"library": "timm", "name": model},
               "train": {"epochs": 1, "batch_size": 64, "lr": 1e-3}, "cohorts": {"pathologies": {"x": {"positive": ["x"]}}}}
        with tempfile.TemporaryDirectory() as out:
            result = module.train(manifest, cache, cfg, "x", out, seed=0, log=lambda m: print(m, file=sys.stderr))
        done = {"steps": int(len(manifest[manifest["split"] == "train"]) // 64), "val_auc": result.best_val_auc}
    else:
        network = build({"name": model}).eval()
        if mode == "predict":
            probs = predict_cached(network, cache, ids, "cpu", zscore=True, log=lambda m: print(m, file=sys.stderr))
        else:
            probs = predict(network, cache.load(ids), "cpu", zscore=True)
        done = {"predicted": int(len(probs))}
    seconds = time.perf_counter() - started
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": round(seconds, 1), **done}


def measure(mode: str, folder: Path, model: str) -> dict:
    command = [sys.executable, __file__, "--child", mode, str(folder), "--model", model]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"{mode} on {folder} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 50000])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    parser.add_argument("--model", default="tiny", help="tiny, or a timm model name")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.model)))
        return {}

    figures: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            folder = Path(tmp) / str(n)
            folder.mkdir()
            write_cache(folder, n)
            cache_mb = sum(f.stat().st_size for f in folder.glob("shard_*.npy")) / 2**20
            figures[n] = {"cache_mb": round(cache_mb, 1)}
            for mode in args.modes:
                figures[n][mode] = measure(mode, folder, args.model)
                print(f"{n:7d} images ({cache_mb:6.1f} MB cache)  {mode:13s} {json.dumps(figures[n][mode])}", flush=True)
            for f in folder.iterdir():
                f.unlink()
    small, large = min(args.sizes), max(args.sizes)
    print(f"\n| mode | peak RSS at {small} images (MB) | at {large} (MB) | ratio | seconds ({small} / {large}) |")
    print("|---|---|---|---|---|")
    for mode in args.modes:
        a, b = figures[small][mode], figures[large][mode]
        if "skipped" in a or "skipped" in b:
            print(f"| {mode} | skipped: {a.get('skipped') or b.get('skipped')} | | | |")
            continue
        print(f"| {mode} | {a['peak_rss_mb']:.0f} | {b['peak_rss_mb']:.0f} | {b['peak_rss_mb'] / a['peak_rss_mb']:.2f} "
              f"| {a['seconds']} / {b['seconds']} |")
    print(f"cache: {figures[small]['cache_mb']} MB / {figures[large]['cache_mb']} MB; goal: train and predict within "
          "10% (ratio <= 1.10)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
