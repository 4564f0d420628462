"""Test-split metrics from the confusion matrix and their patient-level bootstrap.

Every metric at a threshold is a function of the four counts (TN, FP, FN, TP), so the bootstrap resamples
counts: each resample gives every patient a multiplicity, an image counts as often as its patient was drawn,
and the counts of a resample are one matrix product. The AUC of a resample is the weighted Mann-Whitney
statistic (ties count one half), the same number scikit-learn's `roc_auc_score(..., sample_weight=w)` gives.
A paired difference (network minus baseline) uses the same resamples for both scores.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

COUNTS = ("tn", "fp", "fn", "tp")
# The metrics at a threshold, in the order of the clinical table. The paper's weighted precision, recall and F1
# are the support-weighted means of the per-class figures (scikit-learn's average="weighted", zero_division=0);
# weighted recall is accuracy, always, and is kept only because the paper's Table 1 has it.
THRESHOLD_METRICS = ("sensitivity", "specificity", "ppv", "npv", "accuracy", "precision_weighted", "recall_weighted",
                     "f1_weighted")


def confusion_counts(labels, predicted) -> np.ndarray:
    """[TN, FP, FN, TP] of binary labels against binary calls."""
    labels, predicted = np.asarray(labels).astype(int), np.asarray(predicted).astype(int)
    return np.array([np.sum((labels == 0) & (predicted == 0)), np.sum((labels == 0) & (predicted == 1)),
                     np.sum((labels == 1) & (predicted == 0)), np.sum((labels == 1) & (predicted == 1))])


def _ratio(num, den, empty=np.nan):
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), empty)


def rates(counts) -> dict[str, np.ndarray]:
    """The metrics at a threshold from counts [..., 4] (TN, FP, FN, TP); vectorised over leading axes.

    A rate whose denominator is empty (PPV with no positive call) is NaN; inside the weighted means it counts 0,
    as in scikit-learn with zero_division=0, so the paper's columns match scikit-learn's numbers exactly.
    """
    tn, fp, fn, tp = np.moveaxis(np.asarray(counts, dtype=float), -1, 0)
    n, pos, neg = tn + fp + fn + tp, tp + fn, tn + fp
    sens, spec = _ratio(tp, pos), _ratio(tn, neg)
    ppv, npv = _ratio(tp, tp + fp), _ratio(tn, tn + fn)
    f1_pos, f1_neg = _ratio(2 * tp, 2 * tp + fp + fn, 0.0), _ratio(2 * tn, 2 * tn + fn + fp, 0.0)
    zero = lambda x: np.nan_to_num(x, nan=0.0)  # noqa: E731
    return {
        "sensitivity": sens,
        "specificity": spec,
        "ppv": ppv,
        "npv": npv,
        "accuracy": _ratio(tp + tn, n),
        "precision_weighted": _ratio(pos * zero(ppv) + neg * zero(npv), n),
        "recall_weighted": _ratio(pos * zero(sens) + neg * zero(spec), n),
        "f1_weighted": _ratio(pos * f1_pos + neg * f1_neg, n),
    }


def bayes_predictive_values(sensitivity, specificity, prevalence: float) -> tuple[np.ndarray, np.ndarray]:
    """PPV and NPV at a given prevalence (Bayes' rule): what a call means in a clinic whose prevalence is not
    the test split's (a balanced cohort's test split has about 50%)."""
    sens, spec, p = np.asarray(sensitivity, dtype=float), np.asarray(specificity, dtype=float), float(prevalence)
    ppv = _ratio(sens * p, sens * p + (1 - spec) * (1 - p))
    npv = _ratio(spec * (1 - p), spec * (1 - p) + (1 - sens) * p)
    return ppv, npv


def weighted_auc(labels, scores, weights=None) -> np.ndarray | float:
    """AUC (Mann-Whitney, ties count 1/2) with per-image weights [..., n_images]; NaN where a class weighs 0."""
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=float)
    weights = np.ones(len(scores)) if weights is None else np.asarray(weights, dtype=float)
    order = np.argsort(scores, kind="mergesort")
    sorted_scores, sorted_labels, w = scores[order], labels[order], weights[..., order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    neg = np.add.reduceat(w * (sorted_labels == 0), starts, axis=-1)
    pos = np.add.reduceat(w * (sorted_labels == 1), starts, axis=-1)
    below = np.cumsum(neg, axis=-1) - neg
    auc = _ratio((pos * (below + 0.5 * neg)).sum(-1), pos.sum(-1) * neg.sum(-1))
    return float(auc) if auc.ndim == 0 else auc


def patient_resamples(patients, n: int, seed: int, chunk: int = 250) -> Iterator[np.ndarray]:
    """Bootstrap resamples of whole patients, as image multiplicities [chunk, n_images] (ints), `n` in all.

    Images of one patient are not independent (follow-up films, the same anatomy): resampling images would
    pretend there are more independent units than there are and make every interval too narrow.
    """
    codes, uniques = pd.factorize(pd.Series(np.asarray(patients)))
    rng = np.random.default_rng(seed)
    done = 0
    while done < n:
        size = min(chunk, n - done)
        # Drawing P patients with replacement = one multinomial draw of how often each patient is drawn.
        per_patient = rng.multinomial(len(uniques), np.full(len(uniques), 1 / len(uniques)), size=size)
        yield per_patient[:, codes]
        done += size


def percentile_interval(values, level: float = 0.95) -> list[float]:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return [float("nan"), float("nan")]
    alpha = (1 - level) / 2
    return [float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))]


def bootstrap_metrics(labels, probs, patients, threshold: float, n: int, seed: int, *, prevalence: float | None = None,
                      reference=None, level: float = 0.95) -> dict[str, list[float]]:
    """Percentile intervals, from the same patient resamples, of the AUC, every metric at `threshold`, the PPV
    and NPV at `prevalence` (keys ppv_at_prevalence, npv_at_prevalence) and, given `reference` scores (a
    baseline on the same images), the paired AUC difference (key auc_difference: probs minus reference)."""
    labels, probs = np.asarray(labels).astype(int), np.asarray(probs, dtype=float)
    predicted = (probs >= threshold).astype(int)
    indicator = np.stack([(labels == 0) & (predicted == 0), (labels == 0) & (predicted == 1),
                          (labels == 1) & (predicted == 0), (labels == 1) & (predicted == 1)], axis=1).astype(float)
    draws: dict[str, list[np.ndarray]] = {}
    for weights in patient_resamples(patients, n, seed):
        found = rates(weights @ indicator)
        found["auc"] = weighted_auc(labels, probs, weights)
        if prevalence is not None:
            found["ppv_at_prevalence"], found["npv_at_prevalence"] = bayes_predictive_values(
                found["sensitivity"], found["specificity"], prevalence)
        if reference is not None:
            found["auc_difference"] = found["auc"] - weighted_auc(labels, reference, weights)
        for key, value in found.items():
            draws.setdefault(key, []).append(value)
    return {key: percentile_interval(np.concatenate(values), level) for key, values in draws.items()}


def point_metrics(labels, probs, threshold: float, prevalence: float | None = None) -> dict[str, float]:
    """The point estimates matching `bootstrap_metrics`' keys (without the paired difference)."""
    labels, probs = np.asarray(labels).astype(int), np.asarray(probs, dtype=float)
    counts = confusion_counts(labels, probs >= threshold)
    found = {k: float(v) for k, v in rates(counts).items()}
    found["auc"] = float(weighted_auc(labels, probs))
    if prevalence is not None:
        ppv, npv = bayes_predictive_values(found["sensitivity"], found["specificity"], prevalence)
        found["ppv_at_prevalence"], found["npv_at_prevalence"] = float(ppv), float(npv)
    return found


def auc_null_sd(n_positive: int, n_negative: int) -> float:
    """The standard deviation of the AUC of scores unrelated to the labels (the Mann-Whitney U null, no ties):
    sqrt((n_pos + n_neg + 1) / (12 n_pos n_neg))."""
    return float(np.sqrt((n_positive + n_negative + 1) / (12 * n_positive * n_negative)))
