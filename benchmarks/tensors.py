"""Benchmark: cxrflow's decode + QC + normalize against a plain MONAI pipeline, and an epoch read from the cache.

It writes 12-bit MONOCHROME2 DICOMs rendered by cxrflow.synthetic (so that percentiles and QC metrics behave as
on real radiographs), uncompressed and JPEG 2000 / JPEG-LS lossless compressed, then measures, over the same
files and in one process on one core (CPU time, so that other load on the machine does not count):

  decode   cxrflow.decode.decode_image alone
  cxrflow  cxrflow.preprocess.process_image: decode + QC metrics + resize/clip/uint8 tensor
  monai    LoadImage + ScaleIntensity + Resize, which computes no QC
  epoch    one training epoch from the tensor cache: TensorCache.load in shuffled batches, as model input

Goals (issue 4): cxrflow / monai <= 1.0 on every format; epoch >= 100x faster than monai per image.

    python benchmarks/tensors.py            # 300 + 16 + 16 images at 2048 px, tensors at 380 px (a few minutes)
    python benchmarks/tensors.py --quick    # 6 images at 512 px, tensors at 64 px (seconds)
"""

from __future__ import annotations

import os

# Per core means one thread: set before numpy and torch load their thread pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # benchmark the working tree

from cxrflow.decode import decode_image  # noqa: E402
from cxrflow.synthetic import render  # noqa: E402
from cxrflow.preprocess import preprocess_shard, process_image  # noqa: E402
from cxrflow.tensors import TensorCache  # noqa: E402

# (name, transfer syntax UID). JPEG Lossless (Process 14) has no encoder in pydicom, so JPEG-LS stands in.
FORMATS = {
    "uncompressed": "1.2.840.10008.1.2.1",
    "jpeg2000_lossless": "1.2.840.10008.1.2.4.90",
    "jpegls_lossless": "1.2.840.10008.1.2.4.80",
}
FINDINGS = [set(), {"enlarged_heart"}, {"aortic_atherosclerosis", "scoliosis"}, {"pneumonia"}]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6 images at 512 px: checks that the benchmark runs")
    parser.add_argument("--images", type=int, default=300, help="uncompressed DICOMs")
    parser.add_argument("--compressed", type=int, default=16, help="DICOMs per compressed format")
    parser.add_argument("--source-size", type=int, default=2048, help="side of the written images, px")
    parser.add_argument("--size", type=int, default=380, help="side of the cached tensors (image.size), px")
    parser.add_argument("--batch", type=int, default=32, help="training batch size for the epoch read")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--workdir", help="where to write the files (default: a temporary folder, removed after)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.compressed, args.source_size, args.size, args.shards = 4, 1, 512, 64, 2
    return args


def synthetic_radiographs(n: int, size: int, seed: int = 0):
    """Yield n 12-bit (uint16, 0..4095) chest radiographs: a few rendered bases, each file with its own exposure,
    noise and orientation, so that files differ as an archive's do without rendering each at 2k (1.7 s)."""
    rng = np.random.default_rng(seed)
    bases = [render(FINDINGS[i], rng.spawn(1)[0], size, sex="FM"[i % 2]) for i in range(min(n, len(FINDINGS)))]
    for i in range(n):
        image = bases[i % len(bases)] * np.float32(rng.uniform(0.85, 1.1)) + np.float32(rng.uniform(-0.04, 0.04))
        image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(0.004)
        if rng.random() < 0.5:
            image = image[:, ::-1]
        yield np.round(np.clip(image, 0.0, 1.0) * 4095).astype(np.uint16)


def write_dicom(path: Path, stored: np.ndarray, transfer_syntax: str, number: int) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.PatientID, ds.PatientSex, ds.InstanceNumber = f"BENCH{number:05d}", "F", number
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax)
    ds.save_as(path, enforce_file_format=True)


def write_archive(folder: Path, args) -> dict[str, list[str]]:
    """Write the benchmark's DICOMs; returns the paths per format (formats without an encoder are left out).

    Image i of every format holds the same pixels, so the formats differ only in their transfer syntax."""
    counts = {"uncompressed": args.images, "jpeg2000_lossless": args.compressed, "jpegls_lossless": args.compressed}
    files: dict[str, list[str]] = {name: [] for name in FORMATS}
    for i, pixels in enumerate(synthetic_radiographs(max(counts.values()), args.source_size)):
        for name, uid in FORMATS.items():
            if i >= counts[name] or name not in files:
                continue
            path = folder / name / f"{i:05d}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                write_dicom(path, pixels, uid, i)
            except (RuntimeError, NotImplementedError, ImportError) as err:  # no encoder plugin installed
                print(f"  {name}: left out, cannot encode ({type(err).__name__}: {err})")
                del files[name]
                continue
            files[name].append(str(path))
    return {name: paths for name, paths in files.items() if paths}


class Clock:
    """Adds up CPU and wall time of one kind of work."""

    def __init__(self):
        self.cpu = self.wall = 0.0
        self.count = 0

    def time(self, work, *args):
        cpu, wall = time.process_time(), time.perf_counter()
        result = work(*args)
        self.cpu += time.process_time() - cpu
        self.wall += time.perf_counter() - wall
        self.count += 1
        return result

    def per_image_ms(self) -> float:
        return 1000 * self.cpu / max(1, self.count)

    def images_per_s(self) -> float:
        return self.count / self.cpu if self.cpu > 0 else float("inf")


def monai_pipeline(size: int):
    import torch
    from monai.transforms import Compose, LoadImage, Resize, ScaleIntensity

    torch.set_num_threads(1)
    return Compose([LoadImage(image_only=True, ensure_channel_first=True, reader="PydicomReader"),
                    ScaleIntensity(), Resize((size, size))])


def measure_formats(files: dict[str, list[str]], size: int, norm: dict, monai) -> dict:
    """Per format: decode, cxrflow and MONAI over the same files, interleaved so that drift hits all three alike."""
    results = {}
    for name, paths in files.items():
        clocks = {"decode": Clock(), "cxrflow": Clock(), "monai": Clock()}
        work = {"decode": decode_image, "cxrflow": lambda p: process_image(p, size, norm), "monai": monai}
        for p in paths[:1]:  # warm-up: lazy imports and plugin look-ups are not per-image costs
            for run in work.values():
                run(p)
        records = []
        for i, path in enumerate(paths):
            names = list(work)
            for what in names[i % 3 :] + names[: i % 3]:
                out = clocks[what].time(work[what], path)
                if what == "cxrflow":
                    records.append(out[0])
        qc = pd.DataFrame.from_records(records)
        results[name] = {
            "images": len(paths),
            **{f"{k}_ms": c.per_image_ms() for k, c in clocks.items()},
            **{f"{k}_images_per_s": c.images_per_s() for k, c in clocks.items()},
            **{f"{k}_wall_ms": 1000 * c.wall / max(1, c.count) for k, c in clocks.items()},
            "cxrflow_vs_monai": clocks["cxrflow"].cpu / clocks["monai"].cpu,
            "qc_ok": int((qc["status"] == "ok").sum()),
            "qc_p50_median": float(qc["p50"].median()) if "p50" in qc else float("nan"),
            "qc_dynamic_range_median": float(qc["dynamic_range"].median()) if "dynamic_range" in qc else float("nan"),
        }
    return results


def measure_epoch(paths: list[str], workdir: Path, args, norm: dict, min_seconds: float) -> dict:
    """Build the shards from `paths` as the workflow does, then time shuffled batched epochs from the cache."""
    import torch

    catalog = pd.DataFrame({"image_id": [Path(p).stem for p in paths], "path": paths})
    tables = [preprocess_shard(catalog, s, args.shards, args.size, norm, workdir / f"shard_{s:04d}.npy",
                               workdir / f"shard_{s:04d}.parquet") for s in range(args.shards)]
    index = pd.concat(tables, ignore_index=True)
    index.to_parquet(workdir / "index.parquet", index=False)
    cache = TensorCache.open(workdir / "index.parquet", [workdir / f"shard_{s:04d}.npy" for s in range(args.shards)])
    ids = cache.index.index.to_numpy()
    rng = np.random.default_rng(0)

    def epoch(as_model_input: bool):
        order = ids[rng.permutation(len(ids))]
        for start in range(0, len(order), args.batch):
            batch = cache.load(order[start : start + args.batch])
            if as_model_input:  # what the model is fed: uint8 / 255 as (N, 1, S, S) floats (INTENSITY_CONVENTION)
                batch = torch.from_numpy(batch).float().div_(255.0).unsqueeze(1)
        return batch

    results = {"images": len(ids)}
    for name, as_model_input in (("read", False), ("model_input", True)):
        epoch(as_model_input)  # warm-up: opens the memory maps
        clock = Clock()
        while clock.cpu < min_seconds or clock.count < 3:
            clock.time(epoch, as_model_input)
        per_image = clock.cpu / (clock.count * len(ids))
        results[name] = {"epochs": clock.count, "us_per_image": 1e6 * per_image, "images_per_s": 1 / per_image,
                         "epoch_ms": 1000 * clock.cpu / clock.count}
    return results


def report(args, formats: dict, epoch: dict) -> list[str]:
    lines = [f"cxrflow tensors benchmark: {args.source_size} px 12-bit DICOMs -> {args.size} px uint8 tensors; "
             "one process, one thread; CPU time per image (wall time in brackets)", ""]
    lines.append(f"{'format':<18} {'n':>4} {'decode ms':>14} {'cxrflow ms':>14} {'monai ms':>14} "
                 f"{'cxrflow img/s':>14} {'monai img/s':>12} {'cxrflow/monai':>14}")
    for name, r in formats.items():
        lines.append(
            f"{name:<18} {r['images']:>4} "
            + " ".join(f"{r[f'{k}_ms']:>6.1f} [{r[f'{k}_wall_ms']:>5.1f}]" for k in ("decode", "cxrflow", "monai"))
            + f" {r['cxrflow_images_per_s']:>14.1f} {r['monai_images_per_s']:>12.1f} {r['cxrflow_vs_monai']:>14.2f}"
        )
    lines.append("")
    for name, r in formats.items():
        lines.append(f"{name}: QC ok {r['qc_ok']}/{r['images']}, median p50 {r['qc_p50_median']:.3f}, "
                     f"median dynamic range {r['qc_dynamic_range_median']:.3f}; decode is "
                     f"{r['decode_ms'] / r['cxrflow_ms']:.0%} of cxrflow's time")
    monai_us = 1000 * formats["uncompressed"]["monai_ms"]
    read, model_input = epoch["read"], epoch["model_input"]
    lines += [
        "",
        f"epoch from the cache, {epoch['images']} images in shuffled batches of {args.batch} (CPU time):",
        f"  TensorCache.load only       {read['us_per_image']:>7.1f} us/image = {read['images_per_s']:>8.0f} img/s "
        f"({read['epoch_ms']:.1f} ms per epoch)",
        f"  + uint8 -> float input      {model_input['us_per_image']:>7.1f} us/image = "
        f"{model_input['images_per_s']:>8.0f} img/s ({model_input['epoch_ms']:.1f} ms per epoch)",
        "",
        "ratios (goal):",
        *(f"  cxrflow / monai, {name}: {r['cxrflow_vs_monai']:.2f}  (<= 1.0: "
          f"{'met' if r['cxrflow_vs_monai'] <= 1.0 else 'NOT met'})" for name, r in formats.items()),
        f"  epoch from the cache vs monai per epoch (uncompressed): {monai_us / read['us_per_image']:.0f}x  "
        f"(>= 100x: {'met' if monai_us / read['us_per_image'] >= 100 else 'NOT met'}); "
        f"{monai_us / model_input['us_per_image']:.0f}x with the float conversion",
    ]
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")  # MONAI's reader warns per file about missing orientation tags
    norm = {"size": args.size, "clip_percentiles": [0.5, 99.5], "clahe": False}
    with tempfile.TemporaryDirectory(prefix="cxrflow-bench-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        files = write_archive(workdir / "dicom", args)
        print(f"wrote {sum(map(len, files.values()))} DICOMs {dict((k, len(v)) for k, v in files.items())} "
              f"in {time.perf_counter() - started:.0f} s", flush=True)
        monai = monai_pipeline(args.size)
        formats = measure_formats(files, args.size, norm, monai)
        epoch = measure_epoch(files["uncompressed"], workdir / "cache", args, norm, 0.2 if args.quick else 2.0)
    lines = report(args, formats, epoch)
    print("\n".join(lines))
    if args.json:
        speedup = 1000 * formats["uncompressed"]["monai_ms"] / epoch["read"]["us_per_image"]
        Path(args.json).write_text(json.dumps({"args": vars(args), "formats": formats, "epoch": epoch,
                                               "epoch_vs_monai": speedup}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
