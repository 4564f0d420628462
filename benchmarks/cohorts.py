"""Benchmark: the nine cohorts of config/config.yaml and their patient-exclusive splits from a 2,000,000-row catalog.

The catalog is synthetic but shaped like a real archive's (cxrflow.ingest's columns and dtypes, one column per
canonical key of config/labels/keys.yaml): about 3 images per patient, 30% women, 55% PA / 25% AP / 18% lateral
views, half the images with findings, 1% of each key uncertain (missing), 3% failing quality control; 95% of the
images without findings are affirmed normal (key `normal`), and 1% carry a dataset quality tag.

Phases, each with wall and CPU time (CPU time is what to compare on a shared machine) and the peak RSS so far:
  api       build_cohorts (the four shared filters once) + patient_exclusive_split for each cohort, in memory
  jobs      what the workflow's 9 cohort jobs and 9 split jobs do, one after the other: read the catalog columns
            from parquet, build_cohort, write the cohort; read it, split, write the manifest CSV
  unbalanced  the largest split there is: the enlarged_heart cohort with `balance: none`
  baseline  the previous implementation (pandas DataFrame filtering, sklearn's StratifiedGroupKFold), run in the
            same process on one cohort; printed as a ratio to the new code on the same cohort. The baseline knows
            only the older negative rule, so its cohort size is compared with `negatives: unlabelled`.

Goal (issue 5): the nine cohorts and their splits in <= 30 s and <= 4 GB peak RSS on 2 cores.

    python benchmarks/cohorts.py            # 2,000,000 rows (about a minute with the baseline)
    python benchmarks/cohorts.py --quick    # 20,000 rows (seconds); tests/test_benchmarks_cohorts.py runs it
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # benchmark the working tree

from cxrflow.cohorts import (  # noqa: E402
    COHORT_COLUMNS,
    OPTIONAL_COLUMNS,
    build_cohort,
    build_cohorts,
    cohort_seed,
    exclusion_keys,
)
from cxrflow.labels import load_keys  # noqa: E402
from cxrflow.splits import patient_exclusive_split  # noqa: E402

KEYS_FILE = ROOT / "config" / "labels" / "keys.yaml"
PREVALENCE = {"target": (0.04, 0.12), "exclusion": (0.01, 0.05), "other": (0.005, 0.03)}  # among images with findings


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20,000 rows: checks that the benchmark runs")
    parser.add_argument("--rows", type=int, default=2_000_000, help="catalog rows (images)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic catalog")
    parser.add_argument("--no-baseline", action="store_true", help="skip the previous implementation (slow at 2M rows)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows = 20_000
    return args


def synthetic_catalog(n_rows: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(catalog, quality): a catalog as cxrflow.ingest writes it, and a QC table as cxrflow.quality writes it."""
    rng = np.random.default_rng(seed)
    roles = {k: v.get("role", "other") for k, v in yaml.safe_load(KEYS_FILE.read_text(encoding="utf-8"))["keys"].items()}
    sizes = rng.geometric(1 / 3, n_rows // 2)
    patient = np.repeat(np.arange(len(sizes)), sizes)[:n_rows]
    n_patients = int(patient[-1]) + 1
    visit = np.arange(n_rows) - np.searchsorted(patient, patient)  # 0, 1, 2, ... within each patient
    pseudonyms = pd.Series(rng.integers(0, 2**63, n_patients)).map("{:016x}".format).astype("string")
    sex = pd.array(rng.choice(np.array(["F", "M", None], dtype=object), n_patients, p=[0.30, 0.68, 0.02]), dtype="string")
    image_id = (pd.Series(patient).map("{:08d}".format) + "_" + pd.Series(visit).map("{:03d}".format) + ".png").astype("string")
    age = rng.integers(1, 95, n_patients)[patient] + visit // 2
    catalog = pd.DataFrame({
        "image_id": image_id,
        "patient_id": pseudonyms.to_numpy()[patient],
        "sex": sex[patient],
        "age": pd.array(np.where(rng.random(n_rows) < 0.01, -1, age), dtype="Int16"),
        "view": pd.array(rng.choice(np.array(["PA", "AP", "LAT", None], dtype=object), n_rows, p=[0.55, 0.25, 0.18, 0.02]),
                         dtype="string"),
        "study_date": pd.array((2010 + visit).astype(str), dtype="string") + "-06-01",
        "path": "images/" + image_id,
        "text": pd.array(rng.choice(np.array(["Без патологии.", "Сердце расширено влево.", "Аорта уплотнена, развёрнута.",
                                              "Сколиоз грудного отдела.", "Корни сосудистые."], dtype=object), n_rows),
                         dtype="string"),
    })
    catalog["age"] = catalog["age"].mask(catalog["age"] < 0)
    with_findings = rng.random(n_rows) < 0.5
    for key, role in roles.items():
        lo, hi = PREVALENCE.get(role, PREVALENCE["other"])
        present = with_findings & (rng.random(n_rows) < rng.uniform(lo, hi) * 2)
        if role == "normal":
            present = ~with_findings & (rng.random(n_rows) < 0.95)
        catalog[key] = pd.arrays.IntegerArray(present.astype(np.int8), rng.random(n_rows) < 0.01)
    catalog["quality_tag"] = pd.array((rng.random(n_rows) < 0.01).astype(np.int8), dtype="Int8")
    quality = pd.DataFrame({"image_id": catalog["image_id"], "qc_pass": rng.random(n_rows) > 0.03})
    return catalog, quality


class Clock:
    """Wall and CPU seconds of a phase, and the process's peak RSS at its end."""

    def __init__(self, name: str, figures: dict):
        self.name, self.figures = name, figures

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall_s = time.perf_counter() - self.wall
        self.cpu_s = time.process_time() - self.cpu
        self.figures[self.name] = {"wall_s": round(self.wall_s, 3), "cpu_s": round(self.cpu_s, 3), "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


# --- the previous implementation, kept here as the baseline ------------------------------------------------------

def baseline_build_cohort(catalog, quality, cohorts_cfg, pathology, keys, seed):
    """cxrflow.cohorts.build_cohort before this benchmark: DataFrame copies per filter, pandas isin on strings."""
    entry = cohorts_cfg["pathologies"][pathology]
    filters = cohorts_cfg.get("filters", {})
    frame = catalog
    flow = [(len(frame), frame["patient_id"].nunique())]

    def keep(mask):
        nonlocal frame
        frame = frame.loc[mask.fillna(False).astype(bool)]
        flow.append((len(frame), frame["patient_id"].nunique()))

    keep(frame["view"].isin(filters["views"]))
    keep(frame["sex"] == filters["sex"])
    keep(frame["age"].between(*filters["age"]))
    keep(frame["image_id"].isin(quality.loc[quality["qc_pass"], "image_id"]))
    excluded = exclusion_keys(cohorts_cfg, pathology)
    keep(~frame[excluded].eq(1).fillna(False).any(axis=1))
    positive = frame[entry["positive"]].eq(1).fillna(False).any(axis=1)
    findings = [k for k in keys if k != "normal"]
    no_pathology = ~frame[findings].eq(1).fillna(False).any(axis=1) & frame[entry["positive"]].eq(0).fillna(False).all(axis=1)
    keep(positive | no_pathology)
    frame = frame.assign(label=positive.loc[frame.index].astype(np.int8))
    rng = np.random.default_rng(cohort_seed(seed, pathology))
    n = frame["label"].value_counts().min()
    chosen = pd.Series(False, index=frame.index)
    for _, group in frame.sort_values("image_id").groupby("label"):
        chosen.loc[group.index if len(group) <= n else rng.choice(group.index.to_numpy(), size=n, replace=False)] = True
    keep(chosen)
    return frame[["image_id", "patient_id", "label"]].sort_values("image_id").reset_index(drop=True)


def baseline_split(cohort, fractions, seed, pathology):
    """cxrflow.splits.patient_exclusive_split before this benchmark: two rounds of sklearn's StratifiedGroupKFold."""
    from sklearn.model_selection import StratifiedGroupKFold

    def carve(frame, fraction, seed):
        folds = StratifiedGroupKFold(n_splits=max(2, round(1 / fraction)), shuffle=True, random_state=seed)
        _, held_out = next(folds.split(frame, frame["label"], groups=frame["patient_id"]))
        mask = np.zeros(len(frame), dtype=bool)
        mask[held_out] = True
        return mask

    frame = cohort.sort_values("image_id").reset_index(drop=True)
    seed = cohort_seed(seed, pathology)
    split = np.full(len(frame), "train", dtype=object)
    test = carve(frame, fractions["test"], seed)
    split[test] = "test"
    rest = np.flatnonzero(~test)
    val = carve(frame.iloc[rest].reset_index(drop=True), fractions["val"] / (1 - fractions["test"]), seed + 1)
    split[rest[val]] = "val"
    return frame.assign(split=split)


# --- the benchmark ------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    args = parse_args(argv)
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text(encoding="utf-8"))
    cohorts, split, seed = config["cohorts"], config["split"], config["seed"]
    pathologies = sorted(cohorts["pathologies"])
    keys = load_keys(KEYS_FILE)
    figures: dict = {"rows": args.rows, "phases": {}, "cohorts": {}}
    phases = figures["phases"]
    print(f"benchmark: {len(pathologies)} cohorts of config/config.yaml and their splits, {args.rows:,}-row catalog")

    with Clock("synthesize", phases):
        catalog, quality = synthetic_catalog(args.rows, args.seed)
    women = float((catalog["sex"] == "F").mean())
    print(f"catalog: {len(catalog):,} images, {catalog['patient_id'].nunique():,} patients, {women:.0%} women, "
          f"{len(keys)} label keys; {catalog.memory_usage(deep=True).sum() / 2**20:,.0f} MiB in memory")
    figures["patients"] = int(catalog["patient_id"].nunique())

    with Clock("api", phases):
        built = build_cohorts(catalog, quality, cohorts, pathologies, keys, seed)
        manifests = {p: patient_exclusive_split(built[p][0], split, seed, p) for p in pathologies}
    for p in pathologies:
        flow = built[p][1]
        figures["cohorts"][p] = {"images": len(manifests[p]), "patients": int(manifests[p]["patient_id"].nunique()),
                                 "positives": int(flow["positives"].iloc[-1])}
    print("\ncohort flows (images after each filter):")
    print(pd.DataFrame({p: built[p][1].set_index("step")["images"] for p in pathologies}).to_string())

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        catalog.to_parquet(tmp / "catalog.parquet", index=False)
        quality.to_parquet(tmp / "quality.parquet", index=False)
        with Clock("jobs", phases):
            per_job = {}
            for p in pathologies:
                start = time.perf_counter()
                table = pd.read_parquet(tmp / "catalog.parquet", columns=COHORT_COLUMNS + keys + OPTIONAL_COLUMNS)
                qc = pd.read_parquet(tmp / "quality.parquet")
                cohort, flow = build_cohort(table, qc, cohorts, p, keys, seed)
                cohort.to_parquet(tmp / f"{p}.parquet", index=False)
                del table, qc
                patient_exclusive_split(pd.read_parquet(tmp / f"{p}.parquet"), split, seed, p).to_csv(tmp / f"{p}.csv", index=False)
                per_job[p] = round(time.perf_counter() - start, 3)
                figures["cohorts"][p]["job_wall_s"] = per_job[p]
                same = (tmp / f"{p}.csv").read_bytes() == manifests[p].to_csv(index=False).encode()
                figures["cohorts"][p]["job_manifest_identical_to_api"] = same

    unbalanced = {**cohorts, "balance": "none"}
    big, _ = build_cohort(catalog, quality, unbalanced, "enlarged_heart", keys, seed)
    with Clock("unbalanced_split", phases):
        patient_exclusive_split(big, split, seed, "enlarged_heart")
    figures["unbalanced_images"] = len(big)
    new_peak = peak_rss_mb()

    target = "enlarged_heart"
    if not args.no_baseline:
        with Clock("new_one_cohort", phases):
            cohort, _ = build_cohort(catalog, quality, cohorts, target, keys, seed)
            patient_exclusive_split(cohort, split, seed, target)
        with Clock("baseline_build", phases):
            old = baseline_build_cohort(catalog, quality, cohorts, target, keys, seed)
        with Clock("baseline_split", phases):
            baseline_split(old, split, seed, target)
        legacy = {**cohorts, "negatives": "unlabelled", "uncertain_exclusions": "keep"}
        legacy_cohort, _ = build_cohort(catalog, quality, legacy, target, keys, seed)
        figures["baseline_same_cohort_size"] = len(old) == len(legacy_cohort)
        figures["normal_negatives_cohort_size"] = {"unlabelled": len(legacy_cohort), "normal": len(cohort)}

    print("\nphase                      wall s    CPU s   peak RSS MiB")
    for name, row in phases.items():
        print(f"{name:<24} {row['wall_s']:>8.2f} {row['cpu_s']:>8.2f} {row['peak_rss_mb']:>12,.0f}")
    print("\nper cohort: images (patients) in the manifest, and one cohort job + split job, wall s")
    for p in pathologies:
        c = figures["cohorts"][p]
        print(f"  {p:<24} {c['images']:>8,} ({c['patients']:,})  {c['job_wall_s']:.2f} s"
              f"{'' if c['job_manifest_identical_to_api'] else '  MANIFEST DIFFERS FROM THE API RUN'}")
    print(f"\nbalance: none, {target}: {figures['unbalanced_images']:,} images split in "
          f"{phases['unbalanced_split']['wall_s']:.2f} s wall, {phases['unbalanced_split']['cpu_s']:.2f} s CPU")
    if not args.no_baseline:
        new = phases["new_one_cohort"]["cpu_s"]
        old = phases["baseline_build"]["cpu_s"] + phases["baseline_split"]["cpu_s"]
        figures["speedup_one_cohort_cpu"] = round(old / max(new, 1e-9), 1)
        print(f"baseline (previous implementation), {target} cohort + split: {old:.2f} s CPU vs {new:.2f} s CPU now: "
              f"{figures['speedup_one_cohort_cpu']}x faster")
    api, jobs = phases["api"], phases["jobs"]
    figures["goal_api_met"] = api["wall_s"] <= 30 and new_peak <= 4096
    figures["goal_jobs_met"] = jobs["wall_s"] <= 30 and new_peak <= 4096
    print(f"\ngoal <= 30 s and <= 4 GiB on 2 cores: api {api['wall_s']:.1f} s wall ({api['cpu_s']:.1f} s CPU), "
          f"jobs {jobs['wall_s']:.1f} s wall ({jobs['cpu_s']:.1f} s CPU), peak RSS {new_peak:,.0f} MiB before the baseline "
          f"-> {'met' if figures['goal_api_met'] else 'NOT met'} (api), {'met' if figures['goal_jobs_met'] else 'NOT met'} (jobs)")
    figures["peak_rss_mb_without_baseline"] = new_peak
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
