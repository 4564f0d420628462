"""Learning control: the real training and evaluation code learns the labels, and nothing else.

One synthetic archive (400 patients), one cohort (unfolded aorta, both sexes, no exclusions, balanced), one
patient-exclusive split with a large test share (40%). `cxrflow.pipeline.run_train` + `run_evaluate` run twice on
it: with the true labels, and with `train.permute_labels: true` (the training labels shuffled among the training
images, and the validation labels that choose the epoch among the validation images). tests/test_metrics_control.py runs this and asserts: true labels give a test AUC >= 0.9; permuted labels
give an AUC within 3 null standard deviations of 0.5.

The bound: for scores that carry no information about the labels, the AUC is the Mann-Whitney statistic under H0,
with mean 1/2 and SD sqrt((n_pos + n_neg + 1) / (12 n_pos n_neg)). A patient's images are correlated, so the SD is
taken with PATIENT counts (fewer units: a wider, conservative bound). With about 30 patients per class that SD is
about 0.075: chance passes with probability 0.997, and a model that kept the true signal (AUC 0.9) fails.

    python benchmarks/learning_control.py --json figures.json --figure control.png   # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PATHOLOGY = "aorta_unfolded"
COHORTS = {"filters": {"views": ["PA", "AP"], "require_qc_pass": True}, "exclusions": [], "balance": "undersample",
           "pathologies": {PATHOLOGY: {"name": {"en": "Unfolded aorta"}, "positive": [PATHOLOGY]}}}
SETTINGS = {"seed": 42, "image": {"size": 32, "zscore": False}, "model": {"library": "timm", "name": "resnet10t"},
            "train": {"epochs": 8, "batch_size": 16, "lr": 0.002, "warmup_epochs": 1},
            "evaluate": {"bootstrap": 200, "prevalence": 0.1, "min_subgroup_patients": 5}, "cohorts": COHORTS}


def build_data(out: Path) -> dict:
    """Synthetic archive -> catalog -> 32 px tensors -> QC -> the cohort -> its split, all through the API."""
    import yaml

    from cxrflow.cohorts import build_cohort
    from cxrflow.ingest import build_catalog
    from cxrflow.labels import load_keys
    from cxrflow.quality import apply_rules
    from cxrflow.splits import patient_exclusive_split
    from cxrflow.synthetic import generate
    from cxrflow.preprocess import preprocess_shard

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    generate(out / "synthetic", n_patients=400, seed=11, image_size=64)
    source = {**config["source"], "annotations": str(out / "synthetic" / "annotations.csv"), "images": str(out / "synthetic"),
              "vocabulary": str(ROOT / config["source"]["vocabulary"])}
    keys_file = ROOT / "config" / "labels" / "keys.yaml"
    catalog = build_catalog(source, keys_file, base="/").catalog
    table = preprocess_shard(catalog, 0, 1, 32, {}, out / "shard_0000.npy", out / "index.parquet")
    quality = apply_rules(table, {"dark_p50": 0.08, "bright_p50": 0.92, "blank_std": 0.02, "max_line_score": 0.35})
    cohort, _ = build_cohort(catalog, quality, COHORTS, PATHOLOGY, load_keys(keys_file), seed=42)
    manifest = patient_exclusive_split(cohort, {"val": 0.15, "test": 0.4}, 42, PATHOLOGY)
    manifest.to_csv(out / "manifest.csv", index=False)
    catalog.to_parquet(out / "catalog.parquet", index=False)
    return {"manifest": out / "manifest.csv", "index": out / "index.parquet", "shards": [out / "shard_0000.npy"],
            "catalog": out / "catalog.parquet"}


def train_and_evaluate(data: dict, out: Path, permute: bool) -> dict:
    from cxrflow.pipeline import run_evaluate, run_train

    settings = {**SETTINGS, "train": {**SETTINGS["train"], "permute_labels": permute}}
    run_train(data["manifest"], data["index"], data["shards"], settings, PATHOLOGY, out / "model.pt", out / "metadata.json",
              out / "history.csv")
    return run_evaluate(out / "model.pt", out / "metadata.json", data["manifest"], data["index"], data["shards"], settings,
                        PATHOLOGY, out / "metrics.json", out / "predictions.csv", out / "roc.png",
                        catalog_path=data["catalog"], threshold_out=out / "threshold.json")


def figure(runs: dict, n_pos: int, n_neg: int, out_dir: Path, out_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from sklearn.metrics import roc_auc_score, roc_curve

    from cxrflow.metrics import auc_null_sd

    fig, (ax_roc, ax_null) = plt.subplots(1, 2, figsize=(10, 4.2))
    for arm, colour in (("true", "tab:blue"), ("permuted", "tab:red")):
        test = pd.read_csv(out_dir / arm / "predictions.csv").query("split == 'test'")
        fpr, tpr, _ = roc_curve(test["label"], test["prob"])
        ax_roc.plot(fpr, tpr, color=colour, label=f"{arm} training labels: AUC {runs[arm]['auc']:.3f}")
    ax_roc.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax_roc.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"Test ROC ({len(test)} images)")
    ax_roc.legend(loc="lower right", fontsize=8)
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    null = [roc_auc_score(labels, rng.random(len(labels))) for _ in range(4000)]
    sd = auc_null_sd(n_pos, n_neg)
    ax_null.hist(null, bins=40, color="0.7", density=True, label=f"AUC of random scores ({n_pos} / {n_neg} patients)")
    ax_null.axvspan(0.5 - 3 * sd, 0.5 + 3 * sd, color="tab:green", alpha=0.12, label=f"pass band 0.5 +- 3 SD ({3 * sd:.3f})")
    ax_null.axvline(runs["permuted"]["auc"], color="tab:red", label=f"permuted labels {runs['permuted']['auc']:.3f}")
    ax_null.axvline(runs["true"]["auc"], color="tab:blue", label=f"true labels {runs['true']['auc']:.3f}")
    ax_null.axvline(0.9, color="tab:blue", ls="--", lw=0.8, label="true-label floor 0.9")
    ax_null.set(xlabel="test AUC", title="Null distribution of the AUC, and the two runs", xlim=(0, 1.02))
    ax_null.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def main() -> None:
    import tempfile

    import pandas as pd

    from cxrflow.metrics import auc_null_sd

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures as JSON here")
    parser.add_argument("--figure", type=Path, help="write the ROC and null-distribution figure (PNG) here")
    parser.add_argument("--out", type=Path, help="keep the runs' files here (default: a temporary folder)")
    args = parser.parse_args()
    os.environ["CXRFLOW_PSEUDONYM_KEY"] = "learning-control"  # pseudonyms order the split: the same split for every caller
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        data = build_data(out)
        test = pd.read_csv(data["manifest"]).query("split == 'test'")
        n_pos = int(test.loc[test["label"] == 1, "patient_id"].nunique())
        n_neg = int(test.loc[test["label"] == 0, "patient_id"].nunique())
        runs = {arm: train_and_evaluate(data, out / arm, permute=arm == "permuted") for arm in ("true", "permuted")}
        sd = auc_null_sd(n_pos, n_neg)
        figures = {"n_test_images": len(test), "n_test_positive_patients": n_pos, "n_test_negative_patients": n_neg,
                   "null_sd": sd, "bound": 3 * sd, "seconds": time.perf_counter() - started,
                   **{arm: {"auc": m["auc"], "auc_ci95": m["auc_ci95"], "permuted_labels": m["permuted_labels"],
                            "network_beats_baseline": m["baseline"]["network_beats_baseline"],
                            "baseline_auc": m["baseline"]["auc"],
                            "config_hash": json.loads((out / arm / "metadata.json").read_text())["config_hash"]}
                      for arm, m in runs.items()}}
        print(f"control on {len(test)} test images ({n_pos} positive / {n_neg} negative patients): true labels AUC "
              f"{runs['true']['auc']:.3f} {np.round(runs['true']['auc_ci95'], 3).tolist()}; permuted labels AUC "
              f"{runs['permuted']['auc']:.3f} {np.round(runs['permuted']['auc_ci95'], 3).tolist()}; null SD {sd:.3f}, "
              f"pass band 0.5 +- {3 * sd:.3f}; {figures['seconds']:.0f} s")
        if args.figure:
            figure(runs, n_pos, n_neg, out, args.figure)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
