"""Benchmark: does the patient-level bootstrap's 95% interval hold the true AUC about 95% of the time?

Simulated test splits with a known population AUC and clustered images: each patient has 1-4 images whose scores
share the patient's level (score = label x shift + patient effect + image noise, all normal), so the population AUC
of an image pair from two random patients is Phi(shift / sqrt(2 (sd_patient^2 + sd_image^2))). Each draw builds a
test split, computes the percentile interval from `cxrflow.metrics.bootstrap_metrics` (resampling patients, as the
evaluation does) and, for contrast, from resampling images as if they were independent; coverage is the share of
draws whose interval holds the true AUC. Also checked: the sensitivity at a fixed threshold, whose true value is
P(score >= threshold | positive image) = 1 - Phi((threshold - shift) / sqrt(sd_patient^2 + sd_image^2)).

    python benchmarks/bootstrap_coverage.py                     # 1,000 draws x 1,000 resamples, and the figure
    python benchmarks/bootstrap_coverage.py --quick --json f    # 200 draws x 300 resamples (seconds); tests run it
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cxrflow.metrics import bootstrap_metrics  # noqa: E402

SHIFT, SD_PATIENT, SD_IMAGE, THRESHOLD = 1.2, 0.8, 0.6, 0.6
PATIENTS = 100  # per simulated test split, half of them positive


def true_values() -> dict[str, float]:
    total = np.sqrt(SD_PATIENT**2 + SD_IMAGE**2)
    return {"auc": float(norm.cdf(SHIFT / (np.sqrt(2) * total))),
            "sensitivity": float(norm.sf((THRESHOLD - SHIFT) / total))}


def simulate(rng, n_patients: int):
    labels_p = np.arange(n_patients) % 2
    images = rng.integers(1, 5, n_patients)
    patient = np.repeat(np.arange(n_patients), images)
    label = labels_p[patient]
    score = label * SHIFT + rng.normal(0, SD_PATIENT, n_patients)[patient] + rng.normal(0, SD_IMAGE, len(patient))
    return label, score, patient


def coverage(draws: int, resamples: int, n_patients: int, seed: int) -> dict:
    truth = true_values()
    rng = np.random.default_rng(seed)
    held = {"patient": {"auc": [], "sensitivity": []}, "image": {"auc": [], "sensitivity": []}}
    widths = {"patient": [], "image": []}
    for draw in range(draws):
        label, score, patient = simulate(rng, n_patients)
        for unit, groups in (("patient", patient), ("image", np.arange(len(patient)))):
            ci = bootstrap_metrics(label, score, groups, THRESHOLD, resamples, seed + draw)
            for name in ("auc", "sensitivity"):
                held[unit][name].append(ci[name][0] <= truth[name] <= ci[name][1])
            widths[unit].append(ci["auc"][1] - ci["auc"][0])
    return {"true": truth, "draws": draws, "resamples": resamples, "patients_per_draw": n_patients,
            "coverage": {unit: {name: float(np.mean(v)) for name, v in by.items()} for unit, by in held.items()},
            "mean_auc_interval_width": {unit: float(np.mean(w)) for unit, w in widths.items()},
            "running_patient_auc_coverage": np.cumsum(held["patient"]["auc"]) / np.arange(1, draws + 1),
            "running_image_auc_coverage": np.cumsum(held["image"]["auc"]) / np.arange(1, draws + 1)}


def figure(result: dict, out_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    draws = np.arange(1, result["draws"] + 1)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(draws, result["running_patient_auc_coverage"], label="resampling patients (cxrflow)")
    ax.plot(draws, result["running_image_auc_coverage"], label="resampling images as if independent")
    ax.axhline(0.95, color="k", ls=":", lw=0.8, label="nominal 95%")
    band = 1.96 * np.sqrt(0.95 * 0.05 / draws)
    ax.fill_between(draws, 0.95 - band, 0.95 + band, color="0.85", label="binomial 95% band around 95%")
    ax.set(xlabel="simulated test splits", ylabel="share of intervals holding the true AUC", ylim=(0.6, 1.0),
           title=f"Bootstrap 95% CI coverage of the AUC (true AUC {result['true']['auc']:.3f}, "
                 f"{result['patients_per_draw']} patients/split)")
    ax.title.set_fontsize(9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 draws x 300 resamples")
    parser.add_argument("--json", type=Path, help="write the figures as JSON here")
    parser.add_argument("--figure", type=Path, help="write the running-coverage figure (PNG) here")
    args = parser.parse_args()
    draws, resamples = (200, 300) if args.quick else (1000, 1000)
    started = time.perf_counter()
    result = coverage(draws, resamples, n_patients=PATIENTS, seed=0)
    seconds = time.perf_counter() - started
    print(f"true AUC {result['true']['auc']:.4f}, true sensitivity at {THRESHOLD} {result['true']['sensitivity']:.4f}; "
          f"{draws} simulated test splits of {PATIENTS} patients (1-4 images each), {resamples} resamples each, {seconds:.1f} s")
    for unit in ("patient", "image"):
        c = result["coverage"][unit]
        print(f"resampling {unit}s: AUC coverage {c['auc']:.3f}, sensitivity coverage {c['sensitivity']:.3f}, "
              f"mean AUC interval width {result['mean_auc_interval_width'][unit]:.3f}")
    if args.figure:
        figure(result, args.figure)
    if args.json:
        shown = {k: v for k, v in result.items() if not k.startswith("running")}
        args.json.write_text(json.dumps(shown, indent=2))


if __name__ == "__main__":
    main()
