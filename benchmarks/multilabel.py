"""Nine binary networks against one multi-label network (issue 17), side by side, in one run each.

    python benchmarks/multilabel.py synthetic   # CPU: the synthetic archive, every cohort, both modes, AUC with CIs
    python benchmarks/multilabel.py nih1000     # CPU: NIH1000 women's cardiomegaly, patient-grouped 5-fold CV
    python benchmarks/multilabel.py compute     # GPU-hours of both modes at the paper's configuration
    python benchmarks/multilabel.py synthetic --quick   # tiny sizes (tests/test_multilabel.py runs nothing heavier)
    python benchmarks/multilabel.py synthetic --patients 1200 --balance none --keep-findings 0.3
                                                # the paper's layout (every negative kept) on a normal-dominated archive

synthetic: the built-in synthetic archive (--patients) -> catalog -> tensors (--size px) -> QC -> every cohort ->
one split shared by all cohorts (cxrflow.multilabel.shared_split), then a binary network per cohort
(cxrflow.train.train) and one multi-label network (cxrflow.multilabel.train_multilabel), same recipe and epochs.
Each pathology is evaluated on the same test images through cxrflow.evaluate.evaluate_predictions; the paired
patient-bootstrap difference multilabel - binary comes from the same resamples. Training images x epochs and
CPU-seconds (process time: every thread) of each mode are printed beside the table.

nih1000 (../shared/data/nih1000; skipped with a reason without it): women's cardiomegaly, frontal films, every
positive against the women's "No Finding" films (the cohort of tests/test_evaluate.py), under patient-grouped,
label-stratified 5-fold CV (fold i test, fold i+1 val, the rest train). Three modes: `binary` (cxrflow.train);
`multilabel` (one output, cardiomegaly, on the cohort: the multi-label code path with the binary design);
`multilabel+aux14` (the cardiomegaly output plus the 14 NIH labels as auxiliary outputs, on all 1,000 images,
men included, except every image of a patient in the test or val fold). The recipe of each mode is chosen among
--recipes on folds drawn with --select-seed, by pooled out-of-fold AUC; the reported figures come from other folds
(--report-seed), never used for choosing. Reported: pooled out-of-fold AUC with a patient-bootstrap 95% interval,
the paired differences between modes, and the view-only baseline (AP scored 1, PA 0: the issue's 0.648) with the
paired interval against it; the view baseline fitted on the training folds is printed beside it.

compute: GPU-hours for the paper's configuration (EfficientNet-B4, 380 px, 20 epochs, women cohorts, balanced or not) from
images/s (--images-per-s, or a benchmarks/gpu_train.py --json file) and cohort sizes from PadChest's real label
table (../shared/data/padchest; its six cohorts of config/padchest.yaml): 9 binary models read sum_k |train_k|
images per epoch, one multi-label model reads |union_k train_k|.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SHARED = ROOT.parent / "shared" / "data"
QC = {"dark_p50": 0.08, "bright_p50": 0.92, "blank_std": 0.02, "max_line_score": 0.35}


def quiet(*_):
    pass


def auc_difference(labels, a, b, patients, n: int, seed: int) -> tuple[float, list[float]]:
    """AUC(a) - AUC(b) on the same images, with a paired patient-bootstrap percentile 95% interval."""
    from cxrflow.metrics import patient_resamples, percentile_interval, weighted_auc

    draws = [weighted_auc(labels, a, w) - weighted_auc(labels, b, w) for w in patient_resamples(patients, n, seed)]
    return weighted_auc(labels, a) - weighted_auc(labels, b), percentile_interval(np.concatenate(draws))


def interval(values) -> str:
    return f"{values[0]:.3f}-{values[1]:.3f}"


# --- synthetic ---------------------------------------------------------------------------------------------------

def synthetic(args) -> dict:
    import torch
    import yaml

    from cxrflow.cohorts import build_cohorts, enabled_pathologies
    from cxrflow.evaluate import evaluate_predictions
    from cxrflow.ingest import build_catalog
    from cxrflow.labels import load_keys
    from cxrflow.models import load_trained
    from cxrflow.multilabel import (load_multilabel, pathology_predictions, shared_split, split_conflicts,
                                    train_multilabel, training_table)
    from cxrflow.quality import apply_rules
    from cxrflow.synthetic import generate
    from cxrflow.preprocess import preprocess_shard
    from cxrflow.tensors import TensorCache
    from cxrflow.inference import predict
    from cxrflow.train import train

    os.environ.setdefault("CXRFLOW_PSEUDONYM_KEY", "benchmark-key")
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    keys_file = ROOT / "config" / "labels" / "keys.yaml"
    cfg = {"seed": config["seed"], "image": {"size": args.size, "zscore": False},
           "model": {"library": "timm", "name": args.model},
           "train": {**config["train"], "epochs": args.epochs, "batch_size": 32},
           "cohorts": {**config["cohorts"], "balance": args.balance}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        generate(tmp / "synthetic", n_patients=args.patients, seed=config["seed"], image_size=128)
        source = {**config["source"], "annotations": str(tmp / "synthetic" / "annotations.csv"),
                  "images": str(tmp / "synthetic"), "vocabulary": str(ROOT / config["source"]["vocabulary"])}
        catalog = build_catalog(source, keys_file, base="/").catalog
        pathologies = enabled_pathologies(config["cohorts"])
        if args.keep_findings < 1:
            # A clinic's archive is mostly normal studies; the synthetic one is a third normal. Keep each image with
            # a target finding with this probability (seeded), every other image, to get a normal-dominated archive.
            targets = sorted({k for p in pathologies for k in config["cohorts"]["pathologies"][p]["positive"]})
            finding = catalog[targets].eq(1).fillna(False).any(axis=1).to_numpy()
            drop = finding & (np.random.default_rng(config["seed"]).random(len(catalog)) >= args.keep_findings)
            catalog = catalog[~drop].reset_index(drop=True)
        shards, index = [tmp / "shard_0000.npy"], tmp / "index.parquet"
        quality = apply_rules(preprocess_shard(catalog, 0, 1, args.size, {}, shards[0], index), QC)
        built = build_cohorts(catalog, quality, cfg["cohorts"], pathologies, load_keys(keys_file), config["seed"])
        cohorts = {p: built[p][0] for p in pathologies}
        manifests = shared_split(cohorts, config["split"], config["seed"])
        assert split_conflicts(manifests).empty
        cache = TensorCache.open(index, shards)
        print(f"synthetic archive: {args.patients} patients, {len(catalog)} images (images with a target finding kept "
              f"with probability {args.keep_findings}); {len(pathologies)} cohorts, "
              f"{sum(len(c) for c in cohorts.values())} cohort images; data stages {time.perf_counter() - started:.0f} s",
              flush=True)

        binary, cost = {}, {"binary": {"image_epochs": 0, "cpu_s": 0.0, "wall_s": 0.0}}
        for pathology in pathologies:
            cpu, wall = time.process_time(), time.perf_counter()
            result = train(manifests[pathology], cache, cfg, pathology, tmp / "binary" / pathology, cfg["seed"], log=quiet)
            cost["binary"]["cpu_s"] += time.process_time() - cpu
            cost["binary"]["wall_s"] += time.perf_counter() - wall
            cost["binary"]["image_epochs"] += int((manifests[pathology]["split"] == "train").sum()) * result.metadata["epochs_run"]
            model = load_trained(tmp / "binary" / pathology / "best.pt", result.metadata["architecture"])
            rows = manifests[pathology][manifests[pathology]["split"].isin(["val", "test"])].reset_index(drop=True)
            binary[pathology] = rows.assign(prob=predict(model, cache.load(rows["image_id"]), torch.device("cpu"), False))
            print(f"  binary {pathology}: best epoch {result.best_epoch}, val AUC {result.best_val_auc:.3f}", flush=True)

        table = training_table(manifests)
        cpu, wall = time.process_time(), time.perf_counter()
        result = train_multilabel(table, cache, cfg, tmp / "multilabel", cfg["seed"], log=quiet)
        cost["multilabel"] = {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall,
                              "image_epochs": result.metadata["training_images"] * result.metadata["epochs_run"]}
        model = load_multilabel(tmp / "multilabel" / "best.pt", result.metadata["architecture"], len(pathologies))
        print(f"  multilabel: best epoch {result.best_epoch}, mean val AUC {result.best_val_auc:.3f}", flush=True)

        rows = []
        for k, pathology in enumerate(pathologies):
            multi = pathology_predictions(model, cache, manifests[pathology], k, len(pathologies), zscore=False)
            merged = multi.merge(binary[pathology][["image_id", "prob"]].rename(columns={"prob": "binary_prob"}), on="image_id")
            m_multi = evaluate_predictions(merged, args.bootstrap, cfg["seed"], reference="binary_prob")
            m_binary = evaluate_predictions(binary[pathology], args.bootstrap, cfg["seed"])
            difference = m_multi["reference_auc_difference"]
            rows.append({"pathology": pathology, "n_test": m_binary["n_test"], "n_test_positive": m_binary["n_test_positive"],
                         "binary_auc": m_binary["auc"], "binary_ci": m_binary["auc_ci95"],
                         "multilabel_auc": m_multi["auc"], "multilabel_ci": m_multi["auc_ci95"],
                         "difference": difference["value"], "difference_ci": difference["ci95"],
                         "within_binary_ci": bool(m_binary["auc_ci95"][0] <= m_multi["auc"] <= m_binary["auc_ci95"][1])
                         or m_multi["auc"] >= m_binary["auc"]})
    frame = pd.DataFrame(rows)
    print(f"\nSynthetic archive ({args.patients} patients, target findings kept with probability {args.keep_findings}), "
          f"cohorts.balance: {args.balance}, {args.model} at {args.size} px, "
          f"{args.epochs} epochs, CPU; "
          f"AUC on the shared test split with patient-bootstrap 95% CI ({args.bootstrap} resamples)\n")
    print("| pathology | test images (pos) | binary AUC (95% CI) | multilabel AUC (95% CI) | multilabel - binary (95% CI) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['pathology']} | {r['n_test']} ({r['n_test_positive']}) | {r['binary_auc']:.3f} ({interval(r['binary_ci'])}) "
              f"| {r['multilabel_auc']:.3f} ({interval(r['multilabel_ci'])}) | {r['difference']:+.3f} ({interval(r['difference_ci'])}) |")
    print(f"| mean | | {frame['binary_auc'].mean():.3f} | {frame['multilabel_auc'].mean():.3f} | "
          f"{frame['difference'].mean():+.3f} |")
    print("\n| mode | networks | training images x epochs | CPU-seconds | wall seconds |\n| --- | --- | --- | --- | --- |")
    for mode, c in cost.items():
        print(f"| {mode} | {len(pathologies) if mode == 'binary' else 1} | {c['image_epochs']} | {c['cpu_s']:.0f} | {c['wall_s']:.0f} |")
    ratio = cost["multilabel"]["image_epochs"] / cost["binary"]["image_epochs"]
    print(f"multilabel / binary: image-epochs {ratio:.2f}, CPU-seconds {cost['multilabel']['cpu_s'] / cost['binary']['cpu_s']:.2f}; "
          f"multilabel within the binary interval (or above the binary AUC) on {int(frame['within_binary_ci'].sum())} of "
          f"{len(frame)} pathologies")
    return {"rows": rows, "cost": cost, "image_epoch_ratio": ratio, "patients": args.patients, "balance": args.balance,
            "keep_findings": args.keep_findings,
            "size": args.size,
            "epochs": args.epochs, "model": args.model}


# --- NIH1000 -----------------------------------------------------------------------------------------------------

NIH_COHORT = {
    "filters": {"views": ["PA", "AP"], "sex": "F", "require_qc_pass": True},
    "exclusions": [],
    "balance": "none",
    "pathologies": {"enlarged_heart": {"name": {"en": "Cardiomegaly"}, "positive": ["enlarged_heart"]}},
}
RECIPES = {
    # resnet10t from scratch at the cache's size; patient weighting: three women hold 44 of the 58 positive films.
    "lr3e-4": {"epochs": 12, "batch_size": 32, "lr": 3e-4, "weight_decay": 0.05, "warmup_epochs": 1, "weighting": "patient"},
    "lr1e-3": {"epochs": 12, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 1, "weighting": "patient"},
    # The same, averaged over 5 networks of consecutive seeds: less variance from the initialisation on 13 women.
    "lr1e-3-ens5": {"epochs": 12, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 1,
                    "weighting": "patient", "ensemble": 5},
}
MODES = ("binary", "multilabel", "multilabel+aux14")


def nih_data(tmp: Path, size: int):
    """The NIH1000 catalog (through the NIH adapter), its tensor cache at `size` px, QC, and the women's cohort."""
    from cxrflow.cohorts import build_cohort
    import yaml

    from cxrflow.ingest import build_catalog
    from cxrflow.labels import load_keys
    from cxrflow.quality import apply_rules
    from cxrflow.preprocess import preprocess_shard

    labels = pd.read_csv(SHARED / "nih1000" / "labels.csv", dtype=str)
    pd.DataFrame({"Image Index": labels["image_path"], "Finding Labels": labels["finding_labels"],
                  "Patient ID": labels["patient_id"], "Patient Age": labels["age"], "Patient Gender": labels["sex"],
                  "View Position": labels["view"]}).to_csv(tmp / "Data_Entry.csv", index=False)
    label_map = ROOT / "config" / "labels" / "nih.yaml"
    source = {"format": "nih", "annotations": str(tmp / "Data_Entry.csv"), "images": str(SHARED), "label_map": str(label_map)}
    keys_file = ROOT / "config" / "labels" / "keys.yaml"
    catalog = build_catalog(source, keys_file, base="/").catalog
    shards, index = [tmp / "shard_0000.npy"], tmp / "index.parquet"
    quality = apply_rules(preprocess_shard(catalog, 0, 1, size, {}, shards[0], index), QC)
    cohort, _ = build_cohort(catalog, quality, NIH_COHORT, "enlarged_heart", load_keys(keys_file), seed=42)
    native = yaml.safe_load(label_map.read_text())["labels"]  # NIH's 14 findings and "No Finding"
    aux = sorted({k for k in native.values() if k in catalog.columns and k not in ("normal", "other_finding")})
    passed = set(quality.loc[quality["qc_pass"], "image_id"])
    return catalog, cohort, aux, passed, index, shards


def nih_folds(cohort: pd.DataFrame, seed: int, k: int = 5) -> np.ndarray:
    from sklearn.model_selection import StratifiedGroupKFold

    folds = np.empty(len(cohort), dtype=int)
    splitter = StratifiedGroupKFold(k, shuffle=True, random_state=seed)
    for fold, (_, members) in enumerate(splitter.split(cohort, cohort["label"], groups=cohort["patient_id"])):
        folds[members] = fold
    return folds


def nih_cross_validate(mode: str, recipe: dict, data, folds: np.ndarray, size: int, model_name: str, work: Path,
                       k: int = 5) -> tuple[pd.DataFrame, dict]:
    """Out-of-fold test predictions (image_id, patient_id, label, prob, fold) of one mode and recipe; its cost."""
    import torch

    from cxrflow.models import load_trained
    from cxrflow.multilabel import load_multilabel, pathology_predictions, train_multilabel, training_table
    from cxrflow.tensors import TensorCache
    from cxrflow.inference import predict
    from cxrflow.train import train

    catalog, cohort, aux, passed, index, shards = data
    cache = TensorCache.open(index, shards)
    cfg = {"seed": 42, "image": {"size": size, "zscore": False}, "model": {"library": "timm", "name": model_name},
           "train": {**recipe, "augment": {}}, "cohorts": NIH_COHORT}
    out, cost = [], {"image_epochs": 0, "cpu_s": 0.0}
    seeds = [42 + i for i in range(int(recipe.get("ensemble", 1)))]  # an ensemble averages networks of other seeds
    cfg["train"].pop("ensemble", None)
    for fold in range(k):
        split = np.where(folds == fold, "test", np.where(folds == (fold + 1) % k, "val", "train"))
        manifest = cohort[["image_id", "patient_id", "label"]].assign(split=split)
        members = []
        for seed in seeds:
            cpu = time.process_time()
            run = work / f"{mode}-{fold}-{seed}"
            if mode == "binary":
                result = train(manifest, cache, cfg, "enlarged_heart", run, seed, log=quiet)
                n_train = int((split == "train").sum())
                model = load_trained(run / "best.pt", result.metadata["architecture"])
                rows = manifest[manifest["split"] == "test"].reset_index(drop=True)
                probs = predict(model, cache.load(rows["image_id"]), torch.device("cpu"), False)
                rows = rows.assign(prob=probs)
            else:
                extra = sorted(passed) if mode == "multilabel+aux14" else None
                table = training_table({"enlarged_heart": manifest}, catalog, aux if extra else [], extra_images=extra)
                assert not set(table["patient_id"]) & set(manifest.loc[split == "test", "patient_id"])
                result = train_multilabel(table, cache, cfg, run, seed, log=quiet)
                n_outputs = len(result.metadata["outputs"])
                n_train = result.metadata["training_images"]
                model = load_multilabel(run / "best.pt", result.metadata["architecture"], n_outputs)
                rows = pathology_predictions(model, cache, manifest, 0, n_outputs, zscore=False)
                rows = rows[rows["split"] == "test"].reset_index(drop=True)
            cost["cpu_s"] += time.process_time() - cpu
            cost["image_epochs"] += n_train * result.metadata["epochs_run"]
            members.append(rows.set_index("image_id"))
        rows = members[0].assign(prob=np.mean([m.loc[members[0].index, "prob"].to_numpy() for m in members], axis=0))
        out.append(rows.reset_index().assign(fold=fold))
    return pd.concat(out, ignore_index=True), cost


def view_indicator(cohort: pd.DataFrame, catalog: pd.DataFrame) -> np.ndarray:
    """1 for an AP film, 0 for PA: the view alone, with the direction known in advance (the issue's 0.648)."""
    return (cohort["image_id"].map(catalog.set_index("image_id")["view"]).astype(str) == "AP").to_numpy(dtype=float)


def view_baseline(cohort: pd.DataFrame, catalog: pd.DataFrame, folds: np.ndarray, k: int = 5) -> np.ndarray:
    """P(cardiomegaly | view) estimated on the training folds (test and val folds left out), per test fold."""
    view = cohort["image_id"].map(catalog.set_index("image_id")["view"]).astype(str).to_numpy()
    label = cohort["label"].to_numpy()
    score = np.zeros(len(cohort))
    for fold in range(k):
        train = (folds != fold) & (folds != (fold + 1) % k)
        rates = pd.Series(label[train]).groupby(view[train]).mean()
        score[folds == fold] = pd.Series(view[folds == fold]).map(rates).fillna(label[train].mean()).to_numpy()
    return score


def nih1000(args) -> dict:
    from sklearn.metrics import roc_auc_score

    from cxrflow.evaluate import patient_bootstrap_auc

    if not (SHARED / "nih1000" / "labels.csv").is_file():
        print(f"nih1000: skipped, {SHARED / 'nih1000'} is absent")
        return {"skipped": True}
    os.environ.setdefault("CXRFLOW_PSEUDONYM_KEY", "benchmark-key")
    recipes = {name: RECIPES[name] for name in args.recipes}
    if args.quick or args.epochs:
        recipes = {name: {**r, "epochs": 1 if args.quick else args.epochs} for name, r in recipes.items()}
    modes = args.modes
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = nih_data(tmp, args.size)
        catalog, cohort = data[0], data[1]
        print(f"NIH1000: {len(catalog)} images; women's cardiomegaly cohort {len(cohort)} images, "
              f"{int(cohort['label'].sum())} positive from {cohort.loc[cohort['label'] == 1, 'patient_id'].nunique()} women; "
              f"auxiliary keys {data[2]}", flush=True)
        # 1. Choose each mode's recipe on folds of another seed.
        chosen, selection, pooled, costs = {}, {}, {}, {}
        select_folds = nih_folds(cohort, args.select_seed)
        folds = nih_folds(cohort, args.report_seed)
        saved = {m: args.out / f"nih1000_{m}_{args.select_seed}_{args.report_seed}.json" for m in modes} if args.out else {}
        for mode in modes:
            if mode in saved and saved[mode].is_file():  # a mode measured by an earlier (e.g. parallel) run
                record = json.loads(saved[mode].read_text())
                chosen[mode], selection[mode], costs[mode] = record["chosen"], record["selection"], record["cost"]
                pooled[mode] = pd.DataFrame(record["pooled"])
                print(f"  {mode}: read from {saved[mode]}")
                continue
            scores = {}
            for name, recipe in recipes.items():
                if len(recipes) == 1 and not args.score_selection:
                    scores[name] = float("nan")
                    continue
                pred, _ = nih_cross_validate(mode, recipe, data, select_folds, args.size, args.model, tmp / "select")
                scores[name] = float(roc_auc_score(pred["label"], pred["prob"]))
                print(f"  select (fold seed {args.select_seed}) {mode:17s} {name}: pooled AUC {scores[name]:.3f}", flush=True)
            chosen[mode] = max(scores, key=lambda n: (np.nan_to_num(scores[n], nan=-1), n))
            selection[mode] = scores
            # 2. Report on other folds.
            pred, costs[mode] = nih_cross_validate(mode, recipes[chosen[mode]], data, folds, args.size, args.model,
                                                   tmp / "report")
            pooled[mode] = pred.set_index("image_id").loc[cohort["image_id"]].reset_index()
            print(f"  report (fold seed {args.report_seed}) {mode:17s} {chosen[mode]}: pooled AUC "
                  f"{roc_auc_score(pooled[mode]['label'], pooled[mode]['prob']):.3f}", flush=True)
            if mode in saved:
                saved[mode].write_text(json.dumps({"chosen": chosen[mode], "selection": scores, "cost": costs[mode],
                                                   "pooled": pooled[mode][["image_id", "patient_id", "label", "prob", "fold"]]
                                                   .to_dict("list")}, default=float))
        fitted_view = view_baseline(cohort, catalog, folds)
        view = view_indicator(cohort, catalog)
    labels, patients = cohort["label"].to_numpy(), cohort["patient_id"].to_numpy()
    report = {"select_seed": args.select_seed, "report_seed": args.report_seed, "selection": selection, "chosen": chosen,
              "size": args.size, "model": args.model, "modes": {}}
    view_auc = float(roc_auc_score(labels, view))
    view_ci = patient_bootstrap_auc(labels, view, patients, args.bootstrap, 42)
    print(f"\nNIH1000 women, cardiomegaly, {args.model} at {args.size} px from scratch, CPU; 5-fold patient-grouped CV "
          f"(fold seed {args.report_seed}); recipes chosen on fold seed {args.select_seed}: {chosen}\n")
    print("| mode | recipe | pooled OOF AUC (95% CI) | vs view-only (95% CI) | vs binary (95% CI) | training images x epochs | CPU-s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    fitted_auc = float(roc_auc_score(labels, fitted_view))
    fitted_ci = patient_bootstrap_auc(labels, fitted_view, patients, args.bootstrap, 42)
    print(f"| view only: AP = 1, PA = 0 (the reference below) | none | {view_auc:.3f} ({interval(view_ci)}) | | | 0 | 0 |")
    print(f"| view only, fitted: P(pos given view) on the train folds | | {fitted_auc:.3f} ({interval(fitted_ci)}) | | | 0 | 0 |")
    for mode in modes:
        probs = pooled[mode]["prob"].to_numpy()
        auc = float(roc_auc_score(labels, probs))
        ci = patient_bootstrap_auc(labels, probs, patients, args.bootstrap, 42)
        d_view = auc_difference(labels, probs, view, patients, args.bootstrap, 42)
        d_binary = (auc_difference(labels, probs, pooled["binary"]["prob"].to_numpy(), patients, args.bootstrap, 42)
                    if "binary" in pooled and mode != "binary" else None)
        report["modes"][mode] = {"auc": auc, "ci95": list(ci), "minus_view": d_view[0], "minus_view_ci95": d_view[1],
                                 "minus_binary": d_binary[0] if d_binary else None,
                                 "minus_binary_ci95": d_binary[1] if d_binary else None, **costs[mode]}
        shown_binary = f"{d_binary[0]:+.3f} ({interval(d_binary[1])})" if d_binary else ""
        print(f"| {mode} | {chosen[mode]} | {auc:.3f} ({interval(ci)}) | {d_view[0]:+.3f} ({interval(d_view[1])}) | "
              f"{shown_binary} | {costs[mode]['image_epochs']} | {costs[mode]['cpu_s']:.0f} |")
    report["view_only"] = {"auc": view_auc, "ci95": list(view_ci), "fitted_auc": fitted_auc, "fitted_ci95": list(fitted_ci)}
    met = [m for m, r in report["modes"].items() if r["auc"] >= 0.70 and r["minus_view_ci95"][0] > 0]
    print(f"target (pooled AUC >= 0.70 and a paired interval against view-only above 0): "
          f"{'met by ' + ', '.join(met) if met else 'not met by any mode'}")
    report["target_met_by"] = met
    return report


# --- compute -----------------------------------------------------------------------------------------------------

def compute(args) -> dict:
    """GPU-hours of 9 binary models vs one multi-label model at the paper's configuration."""
    import yaml

    from cxrflow.cohorts import build_cohorts, enabled_pathologies
    from cxrflow.ingest import build_catalog
    from cxrflow.labels import load_keys
    from cxrflow.multilabel import shared_split

    rate, rate_source = args.images_per_s, "--images-per-s"
    if args.gpu_json:
        figures = json.loads(Path(args.gpu_json).read_text())
        rate = max(r for r in figures["train_images_per_s"]["AMP + channels_last"].values() if r)
        rate_source = f"{args.gpu_json} ({figures['device']}, {figures['model']} at {figures['size']} px)"
    padchest = SHARED / "padchest" / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
    if not padchest.is_file():
        print(f"compute: skipped, {padchest} is absent")
        return {"skipped": True}
    os.environ.setdefault("CXRFLOW_PSEUDONYM_KEY", "benchmark-key")
    from snakemake.utils import update_config

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    update_config(config, yaml.safe_load((ROOT / "config" / "padchest.yaml").read_text()))
    update_config(config, yaml.safe_load((ROOT / "config" / "paper.yaml").read_text()) | {"source": {}})
    keys_file = ROOT / "config" / "labels" / "keys.yaml"
    source = {**config["source"], "annotations": str(padchest), "label_map": str(ROOT / config["source"]["label_map"])}
    catalog = build_catalog(source, keys_file, base="/").catalog
    pathologies = enabled_pathologies(config["cohorts"])
    epochs = config["train"]["epochs"]
    out = {"rate_images_per_s": rate, "rate_source": rate_source, "epochs": epochs, "layouts": {}}
    print(f"\nCompute at the paper's configuration ({config['model']['name']} at {config['image']['size']} px, {epochs} "
          f"epochs), training at {rate:.0f} images/s ({rate_source}); cohort sizes from PadChest's real label table "
          f"({len(pathologies)} cohorts of config/padchest.yaml), shared split\n")
    print("| cohorts | binary: sum of train images | multilabel: union | ratio | binary GPU-h (per 9 cohorts) | multilabel GPU-h |")
    print("| --- | --- | --- | --- | --- | --- |")
    for balance in ("undersample", "none"):
        cohorts_cfg = {**config["cohorts"], "balance": balance}
        built = build_cohorts(catalog, None, cohorts_cfg, pathologies, load_keys(keys_file), config["seed"])
        manifests = shared_split({p: built[p][0] for p in pathologies}, config["split"], config["seed"])
        train_sets = {p: set(m.loc[m["split"] == "train", "image_id"]) for p, m in manifests.items()}
        binary = sum(len(s) for s in train_sets.values())
        union = len(set().union(*train_sets.values()))
        # Nine cohorts: scale the six PadChest has by 9/6 for the binary models; the union is kept as measured (a
        # lower bound on the saving's size, since three more cohorts would share the same negatives).
        binary_9 = binary * 9 / len(pathologies)
        hours = lambda n: n * epochs / rate / 3600  # noqa: E731
        out["layouts"][balance] = {"binary_images": binary, "union_images": union, "ratio": union / binary,
                                   "binary_gpu_h": hours(binary), "binary_gpu_h_9": hours(binary_9),
                                   "multilabel_gpu_h": hours(union)}
        print(f"| balance: {balance} | {binary} | {union} | {union / binary:.2f} | {hours(binary):.2f} ({hours(binary_9):.2f}) "
              f"| {hours(union):.2f} |")
    # Why: K binary models read the shared normal pool N K times, one multi-label model once. With every negative
    # kept the ratio is (N + |union of positives|) / (K N + sum of positives), which tends to 1/K as normals dominate;
    # balanced cohorts draw nested negatives (cxrflow.cohorts), so the union holds the largest cohort's N_k = P_k once
    # and the ratio is (|union of positives| + max_k P_k) / (2 sum of positives): 1/2 or more when the cohorts'
    # positives are disjoint, down to 1/K only when every cohort has the same positives.
    floor = 1 / len(pathologies)
    out["floor_balance_none"] = floor
    print(f"floor of the ratio with balance: none, as normals dominate: 1/{len(pathologies)} = {floor:.2f}")
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["synthetic", "nih1000", "compute"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: seconds, for the tests")
    parser.add_argument("--patients", type=int, default=400, help="synthetic: patients in the archive")
    parser.add_argument("--size", type=int, default=None, help="image size (synthetic 64, nih1000 32)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="synthetic: epochs of every network (default 10); nih1000: replaces the recipes' epochs")
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--keep-findings", type=float, default=1.0,
                        help="synthetic: keep each image with a target finding with this probability (a normal-dominated "
                        "archive, as a clinic's is, for the compute comparison with --balance none)")
    parser.add_argument("--balance", default="undersample", choices=["undersample", "none"],
                        help="synthetic: cohorts.balance (none: every cohort keeps all its negatives, as the paper's "
                        "\"finding against images with no pathology\" reads)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--select-seed", type=int, default=42, help="nih1000: fold seed the recipe is chosen on")
    parser.add_argument("--report-seed", type=int, default=20261130, help="nih1000: fold seed of the reported figures")
    parser.add_argument("--score-selection", action="store_true",
                        help="nih1000: score a single recipe on the selection folds too (to compare it with another run's)")
    parser.add_argument("--images-per-s", type=float, default=242.0,
                        help="compute: training images/s of B4 at 380 px (default: timm's published RTX 3090 AMP figure)")
    parser.add_argument("--gpu-json", type=Path, help="compute: a benchmarks/gpu_train.py --json file to take images/s from")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--out", type=Path, help="nih1000: keep each mode's out-of-fold predictions here and reuse them "
                        "(run modes in parallel processes, then once with all modes for the paired figures)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.size is None:
        args.size = 32 if args.part == "nih1000" else 64
    if args.epochs is None and args.part == "synthetic":
        args.epochs = 10
    if args.quick:
        args.patients, args.size, args.epochs, args.bootstrap = 140, 32, 1, 50
    result = {"synthetic": synthetic, "nih1000": nih1000, "compute": compute}[args.part](args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
