"""Calibration: does P(finding) = 0.8 mean "8 in 10 such images have the finding"?

Expected calibration error (ECE) over equal-width probability bins, the reliability diagram, and temperature
scaling (Guo et al. 2017): one scalar T fitted on the validation split by likelihood, probabilities
sigmoid(logit / T). T changes no ranking, so AUC, the threshold's decisions and every metric at the threshold
are unchanged; only what the probabilities claim is. Calibration is measured at the test split's prevalence
(about 50% in a balanced cohort), which is not a clinic's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

EPS = 1e-6
TEMPERATURE_BOUNDS = (0.05, 20.0)  # the search range; a fit at either end means validation could not pin T down


def logit(probs) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=float), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def apply_temperature(probs, temperature: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logit(probs) / temperature))


def reliability_bins(labels, probs, bins: int = 10) -> pd.DataFrame:
    """Per equal-width bin of the predicted probability: count, mean prediction, observed frequency."""
    labels, probs = np.asarray(labels, dtype=float), np.asarray(probs, dtype=float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(probs, edges[1:-1], right=False), 0, bins - 1)
    frame = pd.DataFrame({"bin": which, "prob": probs, "label": labels})
    grouped = frame.groupby("bin").agg(n=("label", "size"), mean_prob=("prob", "mean"), observed=("label", "mean"))
    grouped = grouped.reindex(range(bins))
    grouped["n"] = grouped["n"].fillna(0).astype(int)
    grouped.insert(0, "low", edges[:-1])
    grouped.insert(1, "high", edges[1:])
    return grouped.reset_index(drop=True)


def expected_calibration_error(labels, probs, bins: int = 10) -> float:
    """Sum over bins of (share of images in the bin) x |observed frequency - mean predicted probability|."""
    table = reliability_bins(labels, probs, bins)
    filled = table[table["n"] > 0]
    return float((filled["n"] * (filled["observed"] - filled["mean_prob"]).abs()).sum() / max(1, filled["n"].sum()))


def fit_temperature(labels, probs) -> float:
    """The T > 0 minimising the binary cross-entropy of sigmoid(logit / T) on (validation) labels."""
    from scipy.optimize import minimize_scalar

    y, z = np.asarray(labels, dtype=float), logit(probs)

    def nll(log_t):
        q = np.clip(1.0 / (1.0 + np.exp(-z / np.exp(log_t))), EPS, 1 - EPS)
        return -np.mean(y * np.log(q) + (1 - y) * np.log(1 - q))

    bounds = np.log(TEMPERATURE_BOUNDS)
    return float(np.exp(minimize_scalar(nll, bounds=tuple(bounds), method="bounded").x))


def plot_reliability(labels, probs, title: str, out_path, bins: int = 10, calibrated=None) -> None:
    """The reliability diagram (observed frequency against mean prediction per bin, marker size ~ count) and
    the histogram of predictions by class; with `calibrated`, the temperature-scaled curve beside the raw one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.asarray(labels, dtype=int)
    fig, (ax, ax_hist) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="perfect calibration")
    curves = [("raw", probs, "tab:blue")] + ([("temperature-scaled", calibrated, "tab:orange")] if calibrated is not None else [])
    for name, values, colour in curves:
        table = reliability_bins(labels, values, bins)
        filled = table[table["n"] > 0]
        ece = expected_calibration_error(labels, values, bins)
        ax.plot(filled["mean_prob"], filled["observed"], "-", color=colour, lw=1)
        ax.scatter(filled["mean_prob"], filled["observed"], s=10 + 200 * filled["n"] / max(1, len(labels)), color=colour,
                   label=f"{name}: ECE {ece:.3f}")
    ax.set(ylabel="observed frequency of the finding", xlim=(0, 1), ylim=(-0.02, 1.02),
           title=f"{title}: reliability (test, {len(labels)} images)")
    ax.legend(loc="upper left", fontsize=8)
    shown = calibrated if calibrated is not None else probs
    ax_hist.hist([np.asarray(shown)[labels == 0], np.asarray(shown)[labels == 1]], bins=np.linspace(0, 1, bins + 1),
                 label=["no finding", "finding"], color=["0.6", "tab:red"])
    ax_hist.set(xlabel="predicted probability" + (" (temperature-scaled)" if calibrated is not None else ""), ylabel="images")
    ax_hist.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
