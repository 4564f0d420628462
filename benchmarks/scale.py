"""Benchmark: how each rule's cost grows with the archive, and what that means at the paper's scale (issue 14).

It runs the whole workflow with Snakemake, for real, on the built-in synthetic archive at growing sizes (1 epoch,
64 px tensors), each size in a fresh work directory holding a copy of a code checkout, and reads every job's
`benchmark:` file (results/benchmarks/**.tsv). Per rule it prints the wall time (sum over the rule's jobs) and the
peak RSS of one job (max over its jobs), the growth exponent of each (the log-log slope over the sizes: 1.0 is
linear, 0 flat), and the disk the tensor cache takes. Rules without a benchmark file get their wall time from
Snakemake's own log (no RSS). With --before, an older checkout runs the same sizes on the same archives.

Then, on paper, the paper's archive: 2M images at 380 px, of which the women's frontal films are a share measured
from PadChest's table. Cache disk, CPU-hours of decoding at the measured per-image rate, and each job's time and
peak RAM extrapolated with its exponents, against the limits the rules and profiles/slurm give it. Last, it times
`snakemake -n` on a 2M-row annotations table and 256 shards (goal: under 10 s).

    python benchmarks/scale.py                          # 2k, 10k and 30k images (tens of minutes on 2 cores)
    python benchmarks/scale.py --sizes 2000 10000 --before /tmp/old-checkout
    python benchmarks/scale.py --quick                  # two tiny sizes, one cohort, 32 px (a minute or two)

The synthetic archive is drawn once (at the largest size; a smaller archive is the first patients of a larger
one, cxrflow.synthetic) and hard-linked into each work directory, so drawing it counts in no rule. Every
Snakemake runs under `nice -n 10` with at most --cores cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
# What a work directory needs from a checkout: the workflow, its configs, package and environments.
CODE_ITEMS = ("Snakefile", "workflow", "config", "src", "envs", "profiles", "resources")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".snakemake", "results", "synthetic")
PADCHEST = Path("/work/shared/data/padchest/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz")
FRONTAL = ("PA", "AP", "AP_horizontal")  # PadChest's Projection values of frontal films
IMAGES_PER_PATIENT = 2.5  # cxrflow.synthetic draws 1-4 images per patient with p = .2, .3, .3, .2
SEED = 42  # config.yaml's seed, which the synthesize rule would draw with
PAPER = {"images": 2_000_000, "size": 380, "shards": 256}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two tiny sizes, one cohort, 32 px: checks that it runs")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 30000], help="archive sizes, images")
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout to measure (default: this repository)")
    parser.add_argument("--before", type=Path, help="an older checkout to measure on the same archives")
    parser.add_argument("--configfile", type=Path, help="a config applied on top of the benchmark's own settings")
    parser.add_argument("--workdir", type=Path, help="where to run (default: a temporary folder, removed after)")
    parser.add_argument("--cores", type=int, default=2, help="Snakemake --cores (at most 2 on a shared machine)")
    parser.add_argument("--source-size", type=int, default=128, help="side of the synthetic images, px")
    parser.add_argument("--image-size", type=int, default=64, help="image.size: side of the cached tensors, px")
    parser.add_argument("--images-per-shard", type=int, default=5000, help="preprocess.shards = images / this")
    parser.add_argument("--plan-rows", type=int, default=PAPER["images"], help="annotation rows for the dry run")
    parser.add_argument("--plan-shards", type=int, default=PAPER["shards"], help="preprocess.shards for the dry run")
    parser.add_argument("--no-plan", action="store_true", help="skip the dry-run timing")
    parser.add_argument("--label", help="the name --code's figures go under (default: after with --before, else code)")
    parser.add_argument("--reuse", action="store_true",
                        help="read the figures of the runs an earlier call finished in --workdir, run only the others")
    parser.add_argument("--decode-ms", type=float, help="decode + QC + tensor per image, ms, for the extrapolation "
                        "(e.g. benchmarks/tensors.py's cxrflow figure on 2048 px films; default: the measured rate)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds one workflow run may take")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.image_size, args.source_size, args.plan_rows, args.plan_shards = [250, 500], 32, 64, 20000, 16
    args.sizes = sorted(set(args.sizes))
    args.cores = min(args.cores, 2)
    return args


def run_settings(n_images: int, args) -> dict:
    """The config every run of one size gets, before and after alike (applied on top of config/config.yaml)."""
    settings = {
        "synthetic": {"n_patients": max(1, round(n_images / IMAGES_PER_PATIENT)), "image_size": args.source_size},
        "preprocess": {"shards": max(2, math.ceil(n_images / args.images_per_shard))},
        "image": {"size": args.image_size},
        "train": {"epochs": 1},
    }
    if args.quick:
        settings["cohorts"] = {"enabled": ["enlarged_heart"]}
        settings["model"] = {"name": "resnet10t"}
        settings["evaluate"] = {"bootstrap": 50, "min_subgroup_patients": 2}
    return settings


# --- the archive ----------------------------------------------------------------------------------------------------


def draw_archives(root: Path, sizes: list[int], args) -> dict[int, Path]:
    """One synthetic archive per size under root/archives/: the largest drawn, the others its first patients."""
    sys.path.insert(0, str(ROOT / "src"))
    from cxrflow import synthetic

    patients = {n: run_settings(n, args)["synthetic"]["n_patients"] for n in sizes}
    drawn = {int(m.group(1)): folder for folder in (root / "archives").glob(f"p*_s{args.source_size}")
             if (m := re.fullmatch(r"p(\d+)_s\d+", folder.name)) and (folder / "annotations.csv").exists()}
    large_enough = [n for n in drawn if n >= max(patients.values())]  # an earlier call's archive may serve
    largest = (drawn[min(large_enough)] if large_enough
               else root / "archives" / f"p{max(patients.values())}_s{args.source_size}")
    if not (largest / "annotations.csv").exists():
        started = time.perf_counter()
        synthetic.generate(largest, max(patients.values()), seed=SEED, image_size=args.source_size)
        print(f"drew {largest.name} in {time.perf_counter() - started:.0f} s", flush=True)
    annotations = pd.read_csv(largest / "annotations.csv", dtype=str, keep_default_na=False)
    truth = pd.read_csv(largest / "truth.csv", dtype=str, keep_default_na=False)
    archives = {}
    for n, n_patients in patients.items():
        folder = root / "archives" / f"p{n_patients}_s{args.source_size}"
        if not (folder / "annotations.csv").exists():
            rows = len(synthetic.plan_archive(n_patients, SEED))
            (folder / "images").mkdir(parents=True, exist_ok=True)
            for file in annotations["file"].iloc[:rows]:
                os.link(largest / file, folder / file)
            annotations.iloc[:rows].to_csv(folder / "annotations.csv", index=False, lineterminator="\n")
            truth.iloc[:rows].to_csv(folder / "truth.csv", index=False, lineterminator="\n")
        archives[n] = folder
    return archives


def copy_checkout(code: Path, workdir: Path) -> None:
    """A fresh work directory holding what a run needs from the checkout (no results, no Snakemake state)."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    for item in CODE_ITEMS:
        source = code / item
        if source.is_dir():
            shutil.copytree(source, workdir / item, ignore=IGNORED)
        elif source.exists():
            shutil.copy2(source, workdir / item)


def prepare_workdir(code: Path, workdir: Path, archive: Path, settings: dict, extra: Path | None) -> list[str]:
    """A fresh copy of the checkout with the archive hard-linked where the synthesize rule writes it; returns the
    --configfile arguments."""
    copy_checkout(code, workdir)
    # Existing outputs without Snakemake metadata: the synthesize rule does not run, drawing counts in no rule.
    target = workdir / "resources" / "synthetic"
    shutil.copytree(archive, target, copy_function=os.link)
    (workdir / "config" / "scale.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    configs = ["config/scale.yaml"]
    if extra:
        shutil.copy2(extra, workdir / "config" / "scale_extra.yaml")
        configs.append("config/scale_extra.yaml")
    return configs


def snakemake(workdir: Path, *args: str, cores: int, timeout: int, env: dict | None = None):
    """Run Snakemake; the result carries .cpu_s, the CPU seconds of Snakemake and all its jobs (exact, unlike the
    benchmark files' sampled cpu_time), which a loaded machine does not stretch as it stretches wall time."""
    command = ["nice", "-n", "10", str(SNAKEMAKE), "--cores", str(cores), *args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result.cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


# --- what a run cost -------------------------------------------------------------------------------------------------


def rule_blocks(workdir: Path) -> dict[str, str]:
    """Each rule's text in workflow/rules/*.smk, by rule name."""
    blocks = {}
    for path in sorted((workdir / "workflow" / "rules").glob("*.smk")):
        text = path.read_text()
        starts = [(m.start(), m.group(2)) for m in re.finditer(r"^(rule|checkpoint) (\w+):", text, re.M)]
        for (start, name), (end, _) in zip(starts, starts[1:] + [(len(text), "")]):
            block = text[start:end]
            body = block.index("\n") + 1
            following = re.search(r"^\S", block[body:], re.M)  # a top-level statement ends the rule
            blocks[name] = block[: body + following.start()] if following else block
    return blocks


def benchmark_patterns(blocks: dict[str, str]) -> dict[str, re.Pattern]:
    """Rule name -> a regex matching its benchmark files (wildcards become one path component)."""
    patterns = {}
    for name, block in blocks.items():
        found = re.search(r"^\s+benchmark:\s*\n\s+\"([^\"]+)\"", block, re.M)
        if found:
            parts = re.split(r"(\{[^}]+\})", found.group(1))
            regex = "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts)
            patterns[name] = re.compile(regex + "$")
    return patterns


def log_job_times(log: Path) -> dict[str, list[float]]:
    """Rule -> wall seconds of each job, from Snakemake's log (second resolution: a start and a finish line)."""
    now, started, times = None, {}, {}
    pending_rule = None
    for line in log.read_text(errors="replace").splitlines():
        stamp = re.match(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$", line.strip())
        if stamp:
            now = datetime.strptime(" ".join(stamp.group(1).split()), "%a %b %d %H:%M:%S %Y")
            continue
        rule = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):$", line.strip())
        if rule:
            pending_rule = rule.group(1)
            continue
        jobid = re.match(r"^jobid: (\d+)$", line.strip())
        if jobid and pending_rule and now:
            started[jobid.group(1)] = (pending_rule, now)
            pending_rule = None
            continue
        finished = re.match(r"^Finished jobid: (\d+)", line.strip())
        if finished and finished.group(1) in started and now:
            name, start = started.pop(finished.group(1))
            times.setdefault(name, []).append((now - start).total_seconds())
    return times


def job_stats(output: str) -> dict[str, int]:
    """Rule -> jobs, from the first "Job stats" table Snakemake prints (what it planned to run)."""
    table = output.split("Job stats:", 1)[1] if "Job stats:" in output else ""
    counts = {}
    for line in table.splitlines()[3:]:
        cells = line.split()
        if len(cells) != 2 or not cells[1].isdigit():
            break
        counts[cells[0]] = int(cells[1])
    return counts


def run_costs(workdir: Path, n_images: int) -> dict:
    """Per rule: jobs, summed and largest job wall time, peak RSS of one job (MB), from the benchmark files; the
    rules without benchmark files get wall times from the log."""
    patterns = benchmark_patterns(rule_blocks(workdir))
    rules = {}
    for tsv in sorted((workdir / "results" / "benchmarks").rglob("*.tsv")):
        relative = tsv.relative_to(workdir).as_posix()
        name = next((rule for rule, regex in patterns.items() if regex.match(relative)), tsv.parent.name)
        table = pd.read_csv(tsv, sep="\t")
        row = table.iloc[-1]  # a retried job appends; the last line is the run that made the output
        entry = rules.setdefault(name, {"jobs": 0, "s": 0.0, "job_s": 0.0, "max_rss": 0.0, "cpu_s": 0.0,
                                        "source": "benchmark"})
        rss = pd.to_numeric(row.get("max_rss"), errors="coerce")
        cpu = pd.to_numeric(row.get("cpu_time"), errors="coerce")
        entry["cpu_s"] += float(cpu) if pd.notna(cpu) else 0.0  # sampled (0.5 s, then 30 s): a lower bound
        entry["jobs"] += 1
        entry["s"] += float(row["s"])
        entry["job_s"] = max(entry["job_s"], float(row["s"]))
        entry["max_rss"] = max(entry["max_rss"], float(rss) if pd.notna(rss) else 0.0)
    logs = sorted((workdir / ".snakemake" / "log").glob("*.snakemake.log"))
    for name, seconds in (log_job_times(logs[-1]) if logs else {}).items():
        if name not in rules and name != "all":
            rules[name] = {"jobs": len(seconds), "s": float(sum(seconds)), "job_s": float(max(seconds)),
                           "max_rss": None, "source": "log"}
    cache = workdir / "results" / "tensors"
    cache_bytes = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) if cache.exists() else 0
    # The images in the cache: its index, else the shard tables' rows (one per image a shard decoded).
    index = cache / "index.parquet"
    tables = [index] if index.exists() else sorted((workdir / "results" / "preprocess" / "shards").glob("*.parquet"))
    cached = sum(pq.ParquetFile(table).metadata.num_rows for table in tables)
    return {"images": n_images, "rules": rules, "cache_bytes": cache_bytes, "cached_images": cached}


def sample_load(loads: list, done: threading.Event) -> None:
    """The 1-minute load average every 10 s: wall times on a shared machine stretch with it."""
    while not done.wait(10):
        loads.append(os.getloadavg()[0])


def run_size(label: str, code: Path, n_images: int, archive: Path, root: Path, args) -> dict:
    settings = run_settings(n_images, args)
    workdir = root / label / str(n_images)
    finished = workdir / "scale_wall.json"
    if args.reuse and finished.exists():  # a finished run of an earlier call: read its figures again
        wall = json.loads(finished.read_text())["wall_s"]
        result = subprocess.CompletedProcess([], 0, "", "")
    else:
        configs = prepare_workdir(code, workdir, archive, settings, args.configfile)
        loads, done = [], threading.Event()
        sampler = threading.Thread(target=sample_load, args=(loads, done), daemon=True)
        sampler.start()
        started = time.perf_counter()
        result = snakemake(workdir, "--configfile", *configs, cores=args.cores, timeout=args.timeout)
        wall = time.perf_counter() - started
        done.set()
        sampler.join()
        load = float(np.mean(loads)) if loads else None
        (workdir / "scale_run.log").write_text(result.stdout + result.stderr)
        if result.returncode == 0:
            finished.write_text(json.dumps({"wall_s": wall, "cpu_s": result.cpu_s, "load": load}))
    if result.returncode != 0:
        raise SystemExit(f"{label} at {n_images} images failed (exit {result.returncode}); see "
                         f"{workdir}/scale_run.log:\n{(result.stdout + result.stderr)[-3000:]}")
    costs = run_costs(workdir, len(pd.read_csv(archive / "annotations.csv", usecols=["image_id"])))
    costs["planned"] = job_stats((workdir / "scale_run.log").read_text())
    recorded = json.loads(finished.read_text()) if finished.exists() else {}
    costs |= {"wall_s": wall, "cpu_s": recorded.get("cpu_s"), "load": recorded.get("load"),
              "shards": settings["preprocess"]["shards"], "workdir": str(workdir)}
    print(f"{label}: {costs['images']} images, {len(costs['rules'])} rules, {wall:.0f} s, machine load "
          f"{fmt(costs['load'])} on {os.cpu_count()} cores", flush=True)
    return costs


# --- growth and the paper's scale ----------------------------------------------------------------------------------


def slope(xs, ys) -> float | None:
    """The log-log slope of ys over xs (least squares), or None with fewer than two usable points."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(points) < 2 or len({p[0] for p in points}) < 2:
        return None
    x, y = np.array(points).T
    return float(np.polyfit(x, y, 1)[0])


def growth(runs: list[dict]) -> dict:
    """Rule -> exponents of its summed time, its largest job's time and its peak RSS over archive size."""
    sizes = [run["images"] for run in runs]
    exponents = {}
    for name in sorted({name for run in runs for name in run["rules"]}):
        rows = [run["rules"].get(name, {}) for run in runs]
        exponents[name] = {
            key: slope(sizes, [row.get(key) for row in rows]) for key in ("s", "job_s", "max_rss")
        }
    exponents["cache"] = {"bytes": slope(sizes, [run["cache_bytes"] for run in runs])}
    return exponents


def frontal_women_share(table: Path = PADCHEST) -> tuple[float, str]:
    """The share of PadChest's rows that are women's frontal films (the study's candidates)."""
    if not table.exists():
        return 1 / 3, "about 1/3 (PadChest table not found)"
    rows = pd.read_csv(table, usecols=["PatientSex_DICOM", "Projection"])
    women = rows["PatientSex_DICOM"].eq("F")
    share = float((women & rows["Projection"].isin(FRONTAL)).mean())
    strict = float((women & rows["Projection"].isin(["PA", "AP"])).mean())
    return share, f"PadChest: {share:.3f} of {len(rows):,} rows ({strict:.3f} with PA/AP only, no AP_horizontal)"


def limits(workdir: Path, blocks: dict[str, str]) -> dict[str, dict]:
    """Rule -> threads, mem_mb, runtime (minutes) on SLURM: the rule's own, then profiles/slurm's set-resources,
    default-resources filling what neither gives."""
    profile_file = workdir / "profiles" / "slurm" / "config.yaml"
    profile = yaml.safe_load(profile_file.read_text()) if profile_file.exists() else {}
    defaults = profile.get("default-resources") or {}
    out = {}
    for name, block in blocks.items():
        own = {}
        threads = re.search(r"^\s+threads:\s*(\d+)", block, re.M)
        own["threads"] = int(threads.group(1)) if threads else 1
        for key in ("mem_mb", "runtime"):
            found = re.search(rf"^\s+{key}\s*=\s*(\d+)", block, re.M)
            if found:
                own[key] = int(found.group(1))
        own |= (profile.get("set-resources") or {}).get(name, {})
        if name in (profile.get("set-threads") or {}):
            own["threads"] = profile["set-threads"][name]
        for key in ("mem_mb", "runtime"):
            own.setdefault(key, defaults.get(key))
        local = re.search(r"^\s+localrule:\s*True", block, re.M) is not None
        gpu = re.search(r"^\s+gpu\s*=\s*(\d+)", block, re.M)
        gpu = int(own.get("gpu", gpu.group(1) if gpu else 0))
        out[name] = {"threads": own["threads"], "mem_mb": own["mem_mb"], "runtime": own["runtime"], "local": local,
                     "gpu": gpu}
    return out


# Rules whose work follows one cohort (its images, women's frontal films) rather than the archive or the cache.
COHORT_RULES = ("cohort", "split", "train", "evaluate", "model_card")
# Rules that read every cached image (not sharded): they follow the cache, like the shards.
CACHE_RULES = ("quality", "duplicates", "tensor_index")


def candidate_share(archive: Path) -> float:
    """The share of the synthetic archive that is women's frontal films (the cohorts' view and sex filters)."""
    rows = pd.read_csv(archive / "annotations.csv", usecols=["sex", "view"], dtype=str)
    return float((rows["sex"].isin(["Ж", "F"]) & rows["view"].isin(["PA", "AP"])).mean())


def paper_epochs(workdir: Path) -> int:
    paper = workdir / "config" / "paper.yaml"
    settings = yaml.safe_load(paper.read_text()) if paper.exists() else {}
    return int(((settings or {}).get("train") or {}).get("epochs") or 1)


def affine(xs, ys) -> tuple[float, float]:
    """Intercept and slope (clamped at 0) of ys over xs: a fixed cost plus a cost per unit of work."""
    points = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if len(points) < 2 or len({x for x, _ in points}) < 2:
        x, y = points[-1]
        return 0.0, y / x
    slope_, intercept = np.polyfit(*np.array(points).T, 1)
    slope_ = max(float(slope_), 0.0)
    return max(float(np.mean([y - slope_ * x for x, y in points])), 0.0), slope_


def extrapolate(runs: list[dict], exponents: dict, workdir: Path, share: float, synthetic_share: float,
                args) -> dict:
    """The paper's archive on paper. A job's work is counted in images: per shard for sharded rules (the
    archive's, or the candidates' when the measured cache held only candidates), all cached images for cache-wide
    rules, one cohort's (women's frontal films: PadChest's share against the synthetic archive's) for cohort
    rules, else the archive. Time: a fixed cost plus a cost per image, fitted over the sizes, at the paper's work
    per job. RSS two ways: the largest job's x work ratio ^ its exponent, and fixed plus per-image as for time.
    Training and evaluation read the cache: their per-image costs (time, RSS) also scale with pixels, (380 /
    measured size)^2, and training's time with the paper's epochs. Decoding depends on the source films' size,
    which the synthetic archive does not match: --decode-ms gives a rate measured on real-sized films.
    Times are wall times: on a loaded machine (see the load row) they overstate, the extrapolation with them."""
    largest = runs[-1]
    n = largest["images"]
    cached = largest["cached_images"] or n
    prefiltered = cached < 0.9 * n  # the cache held the candidates only
    decoded = PAPER["images"] * share if prefiltered else PAPER["images"]
    pixel = (PAPER["size"] / args.image_size) ** 2
    epochs = paper_epochs(workdir)
    bytes_per_image = largest["cache_bytes"] / max(cached, 1)
    rule_limits = limits(workdir, rule_blocks(workdir))
    shard_rules = {name for name, row in largest["rules"].items()
                   if row["jobs"] == largest["shards"] and all(r["rules"].get(name, {}).get("jobs") == r["shards"]
                                                               for r in runs)}
    decode_s = sum(row["s"] for name, row in largest["rules"].items() if name in shard_rules
                   and row["source"] == "benchmark") / cached
    decode_s = args.decode_ms / 1000 if args.decode_ms else decode_s
    paper = {
        "images": PAPER["images"], "share": share, "synthetic_share": synthetic_share, "decoded": decoded,
        "prefiltered": prefiltered, "cache_gb": decoded * bytes_per_image * pixel / 1e9,
        "cache_gb_candidates_only": PAPER["images"] * share * bytes_per_image * pixel / 1e9,
        "decode_s_per_image": decode_s, "decode_rate_from": "--decode-ms" if args.decode_ms else "measured",
        "decode_cpu_hours": decoded * decode_s / 3600, "pixel_factor": pixel, "paper_epochs": epochs, "rules": {},
    }

    def work(name: str, run: dict) -> tuple[float, float]:
        """Images one job of the rule handles: in the run, and at the paper's scale."""
        run_cached = run["cached_images"] or run["images"]
        if name in shard_rules:
            return run_cached / run["shards"], decoded / PAPER["shards"]
        if name in CACHE_RULES:
            return run_cached, decoded
        if name.startswith(COHORT_RULES):
            return run["images"] * synthetic_share, PAPER["images"] * share
        return run["images"], PAPER["images"]

    for name, row in largest["rules"].items():
        measured = [(work(name, run)[0], run["rules"].get(name)) for run in runs if run["rules"].get(name)]
        paper_work = work(name, largest)[1]
        per_image = pixel if name.startswith(("train", "evaluate")) else 1.0
        fixed, rate = affine([x for x, _ in measured], [r["job_s"] for _, r in measured])
        job_s = fixed + rate * paper_work * per_image * (epochs if name.startswith("train") else 1)
        rss_exp = rss_lin = None
        if row.get("max_rss"):
            ratio = paper_work / work(name, largest)[0]
            rss_exp = row["max_rss"] * ratio ** max(exponents.get(name, {}).get("max_rss") or 0.0, 0.0)
            peaks = [r["max_rss"] for _, r in measured]
            fixed_rss, rate_rss = affine([x for x, _ in measured], peaks)
            if max(peaks) < 1.1 * min(peaks):  # flat within 10% (the issue's goal): noise, not a per-image cost
                fixed_rss, rate_rss = max(peaks), 0.0
            rss_lin = fixed_rss + rate_rss * paper_work * per_image
        limit = rule_limits.get(name, {"local": False})
        flags = []
        if not limit["local"]:
            if limit.get("runtime") and job_s / 60 > limit["runtime"]:
                # A GPU job's time measured on CPU says nothing about its time on the GPU it gets.
                on_gpu = " on CPU, a GPU job" if limit.get("gpu") else ""
                flags.append(f"time {job_s / 60:.0f} > {limit['runtime']} min{on_gpu}")
            rss = max(rss_exp or 0, rss_lin or 0)
            if rss and limit.get("mem_mb") and rss > limit["mem_mb"]:
                flags.append(f"RSS {rss:.0f} > {limit['mem_mb']} MB")
        paper["rules"][name] = {"work": paper_work, "job_min": job_s / 60, "rss_mb_exp": rss_exp,
                                "rss_mb_lin": rss_lin, **limit, "exceeded": flags}
    return paper


# --- planning ----------------------------------------------------------------------------------------------------


def plan_time(code: Path, root: Path, rows: int, shards: int, args) -> dict:
    """`snakemake -n` on an annotations table of `rows` rows (metadata only: source.check_files false) and
    `shards` shards, in a fresh work directory: the seconds it takes and the jobs it plans."""
    workdir = root / "plan"
    copy_checkout(code, workdir)
    started = time.perf_counter()
    archive = workdir / "resources" / "archive"
    archive.mkdir(parents=True)
    ids = np.arange(rows)
    notes = np.array(["Без патологических изменений.", "Сердце расширено влево.", "Сколиоз. Аорта уплотнена."])
    pd.DataFrame({
        "image_id": [f"i{i:08d}" for i in ids], "patient_id": [f"p{i // 3:08d}" for i in ids],
        "sex": np.where(ids % 2 == 0, "Ж", "М"), "age": 20 + ids % 70, "view": np.where(ids % 3 == 2, "LL", "PA"),
        "file": [f"images/i{i:08d}.png" for i in ids], "study_date": "2019-01-01", "annotation": notes[ids % 3],
    }).to_csv(archive / "annotations.csv", index=False, lineterminator="\n")
    written = time.perf_counter() - started
    settings = {"source": {"annotations": "resources/archive/annotations.csv", "images": "resources/archive",
                           "check_files": False},
                "preprocess": {"shards": shards}}
    (workdir / "config" / "plan.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    env = {"CXRFLOW_PSEUDONYM_KEY": "scale-benchmark-key-not-secret"}
    timings, cpu = [], []
    for _ in range(2):  # the first run also writes .snakemake/; the second is what a user waits for again
        started = time.perf_counter()
        result = snakemake(workdir, "-n", "--configfile", "config/plan.yaml", cores=args.cores, timeout=600, env=env)
        timings.append(time.perf_counter() - started)
        cpu.append(result.cpu_s)
        if result.returncode != 0:
            raise SystemExit(f"dry run failed:\n{(result.stdout + result.stderr)[-3000:]}")
    counts = job_stats(result.stdout)
    shard_jobs = max((count for name, count in counts.items() if "shard" in name), default=None)
    return {"rows": rows, "shards": shards, "seconds": min(timings), "first_seconds": timings[0],
            "cpu_seconds": cpu[timings.index(min(timings))], "load": os.getloadavg()[0],
            "jobs": counts.get("total"), "job_counts": counts, "shard_jobs": shard_jobs, "table_written_s": written}


# --- printing ---------------------------------------------------------------------------------------------------


def fmt(value, spec=".1f", none="-"):
    return none if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def print_table(label: str, runs: list[dict], exponents: dict) -> None:
    sizes = [run["images"] for run in runs]
    print(f"\n== {label}: per rule, wall time (s, sum over jobs) / peak RSS of one job (MB); exponents over sizes")
    header = f"{'rule':24s}{'jobs':>6s}" + "".join(f"{f'{n} img':>20s}" for n in sizes) + f"{'exp time':>10s}"
    print(header + f"{'exp job':>9s}{'exp RSS':>9s}  source")
    for name in sorted(exponents):
        if name == "cache":
            continue
        rows = [run["rules"].get(name) for run in runs]
        cells = "".join(f"{(fmt(r['s']) + ' / ' + fmt(r['max_rss'], '.0f')) if r else '-':>20s}" for r in rows)
        jobs = "/".join(str(r["jobs"]) if r else "-" for r in rows)
        grow = exponents[name]
        source = next((r["source"] for r in rows if r), "")
        print(f"{name:24s}{jobs:>6s}{cells}{fmt(grow['s'], '.2f'):>10s}{fmt(grow['job_s'], '.2f'):>9s}"
              f"{fmt(grow['max_rss'], '.2f'):>9s}  {source}")
    cache = "".join(f"{run['cache_bytes'] / 1e6:>19.1f}M" for run in runs)
    print(f"{'cache (results/tensors)':24s}{'':6s}{cache}{fmt(exponents['cache']['bytes'], '.2f'):>10s}")
    print(f"{'cached / archive images':24s}{'':6s}" + "".join(
        f"{str(run['cached_images']) + ' / ' + str(run['images']):>20s}" for run in runs))
    print(f"{'workflow wall (s)':24s}{'':6s}" + "".join(f"{run['wall_s']:>20.0f}" for run in runs))
    print(f"{'workflow CPU (s)':24s}{'':6s}" + "".join(f"{fmt(run.get('cpu_s'), '.0f'):>20s}" for run in runs))
    print(f"{'machine load (1 min avg)':24s}{'':6s}" + "".join(f"{fmt(run.get('load')):>20s}" for run in runs)
          + f"   on {os.cpu_count()} cores: wall times stretch when the load exceeds the cores")


def print_paper(label: str, paper: dict, note: str, args) -> None:
    print(f"\n== {label}: the paper's archive on paper ({paper['images']:,} images, {PAPER['size']} px, "
          f"{PAPER['shards']} shards)")
    print(f"women's frontal share: {note}")
    print(f"decoded images: {paper['decoded']:,.0f} ({'candidates only' if paper['prefiltered'] else 'every image'})")
    print(f"tensor cache: {paper['cache_gb']:.0f} GB (candidates only would be "
          f"{paper['cache_gb_candidates_only']:.0f} GB)")
    source = ("given by --decode-ms" if paper["decode_rate_from"] == "--decode-ms"
              else f"measured on {args.source_size} px synthetic films; real films are larger, see --decode-ms")
    print(f"decoding: {paper['decode_s_per_image'] * 1000:.1f} ms per image ({source}) -> "
          f"{paper['decode_cpu_hours']:.0f} CPU-hours")
    print("work of one job, in images: its shard's, all cached, the candidates (cohort rules: a cohort grows with "
          "them) or the archive.")
    print(f"per job: time = fixed + per image; RSS = largest x ratio^exponent (exp) and fixed + "
          f"per image (lin); train/evaluate per image x {paper['pixel_factor']:.0f} (pixels), train time x "
          f"{paper['paper_epochs']} epochs (the measured model, not EfficientNet-B4). Wall times: a loaded machine "
          f"overstates them.")
    print(f"{'rule':24s}{'work':>12s}{'job min':>10s}{'limit':>8s}{'RSS exp':>10s}{'RSS lin':>10s}{'limit':>8s}"
          f"  exceeded")
    for name, row in sorted(paper["rules"].items()):
        local = row.get("local")
        print(f"{name:24s}{row['work']:>12,.0f}{fmt(row['job_min'], '.1f'):>10s}"
              f"{'local' if local else fmt(row.get('runtime'), 'd'):>8s}{fmt(row['rss_mb_exp'], '.0f'):>10s}"
              f"{fmt(row['rss_mb_lin'], '.0f'):>10s}{'local' if local else fmt(row.get('mem_mb'), 'd'):>8s}"
              f"  {', '.join(row['exceeded']) or 'no'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    temporary = None
    if args.workdir is None:
        temporary = tempfile.TemporaryDirectory(prefix="cxrflow-scale-")
        args.workdir = Path(temporary.name)
    root = args.workdir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    share, share_note = frontal_women_share()
    archives = draw_archives(root, args.sizes, args)
    checkouts = {args.label or ("after" if args.before else "code"): args.code.resolve()}
    checkouts |= {"before": args.before.resolve()} if args.before else {}
    figures = {"sizes": args.sizes, "share": share, "share_note": share_note, "checkouts": {}}
    for label in sorted(checkouts, key=lambda name: name != "before"):  # before first: it is the baseline
        runs = [run_size(label, checkouts[label], n, archives[n], root, args) for n in args.sizes]
        exponents = growth(runs)
        synthetic_share = candidate_share(archives[args.sizes[-1]])
        paper = extrapolate(runs, exponents, Path(runs[-1]["workdir"]), share, synthetic_share, args)
        figures["checkouts"][label] = {"code": str(checkouts[label]), "runs": runs, "exponents": exponents,
                                       "paper": paper}
    for label, entry in figures["checkouts"].items():
        print_table(f"{label} ({entry['code']})", entry["runs"], entry["exponents"])
    for label, entry in figures["checkouts"].items():
        print_paper(label, entry["paper"], share_note, args)
    if not args.no_plan:
        plan = plan_time(args.code.resolve(), root, args.plan_rows, args.plan_shards, args)
        figures["plan"] = plan
        print(f"\n== dry run: snakemake -n on {plan['rows']:,} annotation rows, {plan['shards']} shards: "
              f"{plan['seconds']:.1f} s wall, {plan['cpu_seconds']:.1f} s CPU ({plan['jobs']} jobs, "
              f"{plan['shard_jobs']} shard jobs; first run {plan['first_seconds']:.1f} s; machine load "
              f"{plan['load']:.1f} on {os.cpu_count()} cores; goal < 10 s)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    if temporary:
        temporary.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
