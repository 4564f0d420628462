"""External evaluation: the trained models on another source's images ("trained here, tested there").

The external source brings its own tables and its own label map or vocabulary; everything else is the main run's:
the label keys, the cohort rules (filters, exclusions, the negative class, balancing, the cap), the image settings
and the QC rules, and each model's own threshold (its threshold.json, chosen on the main validation split and never
re-chosen here, or the figures would be tuned on the external data). There is no split: the external source's
patients never trained a model, so every selected image of an external cohort is a test image. Which images are
selected follows `split.test_prevalence`, as the main test split does: `balanced` takes the cohort proper (balanced
and capped as configured), `natural` every eligible image (the pool before balancing and the cap).

Only images that some cohort can take are decoded. The cohorts are first built without pixels (metadata filters and
labels); the union of their eligible images is decoded, measured and QC'd with the main run's rules; the cohorts are
then built again with that QC. An image no cohort could take is never decoded: it counts as passing QC (it has no
metrics to fail) and leaves each cohort at its own, earlier or later, step, so the flow's "quality" step counts
real QC failures only.

A pathology whose external cohort cannot be evaluated (the source never labels its target; fewer than
`evaluate.min_subgroup_patients` patients of a class, the rule that also withholds a subgroup's AUC) gets a metrics
file and a table row that say why, never a number and never a crash.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from cxrflow.cohorts import FLOW_COLUMNS, build_cohort
from cxrflow.errors import CxrflowError

# The columns of the external metrics table, in order. Names shared with results/metrics_table.csv mean the same;
# internal_* are the main test split's figures of the same model, for the side-by-side "here vs there".
TABLE_COLUMNS = ["pathology", "name_en", "name_ru", "status", "n_test", "n_test_positive", "n_test_patients",
                 "test_prevalence", "auc", "auc_ci_low", "auc_ci_high", "internal_auc", "internal_auc_ci_low",
                 "internal_auc_ci_high", "auc_minus_internal", "threshold", "accuracy", "precision_weighted",
                 "recall_weighted", "f1_weighted", "sensitivity", "specificity", "accuracy_at_0.5",
                 "precision_weighted_at_0.5", "recall_weighted_at_0.5", "f1_weighted_at_0.5", "ece"]
OK = "ok"


def external_cohorts(catalog: pd.DataFrame, quality: pd.DataFrame | None, cohorts_cfg: dict, pathologies: list[str],
                     keys: list[str], seed: int) -> dict[str, tuple[pd.DataFrame, pd.DataFrame] | str]:
    """Per pathology, build_cohort's (cohort with `selected`, flow) under the main run's rules, or the reason the
    source cannot give that cohort (it never labels the target, never affirms a normal study): a row, not a crash."""
    built = {}
    for pathology in pathologies:
        try:
            built[pathology] = build_cohort(catalog, quality, cohorts_cfg, pathology, keys, seed, with_pool=True)
        except CxrflowError as err:
            built[pathology] = f"no cohort: {err}"
    return built


def images_to_decode(catalog: pd.DataFrame, cohorts_cfg: dict, pathologies: list[str], keys: list[str],
                     seed: int) -> pd.Index:
    """The image ids some cohort can take before any pixel is read (every filter but QC): the only ones decoded."""
    pools = [c[0]["image_id"] for c in external_cohorts(catalog, None, cohorts_cfg, pathologies, keys, seed).values()
             if not isinstance(c, str)]
    return pd.Index(sorted(set().union(*map(set, pools))) if pools else [], dtype=object)


def decode_images(images: pd.DataFrame, image: dict, folder: Path, workers: int = 1) -> tuple[Path, list[Path]]:
    """Decode, measure and cache `images` (image_id, path) with the main run's image settings, in `workers` shards
    in parallel (cxrflow.preprocess.preprocess_shard); returns the index (image_id, shard, row, status and the QC
    metrics) and the shard files, which cxrflow.tensors.TensorCache opens."""
    from cxrflow.io import write_parquet
    from cxrflow.preprocess import preprocess_shard

    folder = Path(folder)
    n = max(1, min(int(workers), len(images)))
    jobs = [(images[["image_id", "path"]], s, n, image["size"], image, folder / f"shard_{s:04d}.npy",
             folder / f"shard_{s:04d}.parquet") for s in range(n)]
    if n == 1:
        tables = [preprocess_shard(*jobs[0])]
    else:
        # Forked (a Snakemake script has no __main__ guard for spawn): the caller runs no torch operation before.
        with ProcessPoolExecutor(n) as pool:
            tables = list(pool.map(preprocess_shard, *zip(*jobs)))
    index = folder / "index.parquet"
    write_parquet(pd.concat(tables, ignore_index=True), index)
    return index, [job[5] for job in jobs]


def quality_of_catalog(catalog: pd.DataFrame, judged: pd.DataFrame) -> pd.DataFrame:
    """image_id, qc_pass for every catalog image: the QC verdict where decoded, True where no cohort wanted the
    image (it was never decoded and leaves the cohorts at a step of its own; see the module's docstring)."""
    passed = judged.set_index("image_id")["qc_pass"].astype(bool)
    verdict = catalog["image_id"].map(passed)
    return pd.DataFrame({"image_id": catalog["image_id"], "qc_pass": verdict.fillna(True).astype(bool)})


def external_test_set(cohort: pd.DataFrame, test_prevalence: str, decoded: pd.Index) -> pd.DataFrame:
    """The external test set of one cohort (image_id, patient_id, label): see the module's docstring. Only images
    with a tensor (`decoded`) can be scored; without cohorts.filters.require_qc_pass an undecodable image reaches
    the cohort, and leaves here (the flow's last step counts it)."""
    rows = cohort if test_prevalence == "natural" else cohort[cohort["selected"].to_numpy(dtype=bool)]
    rows = rows[rows["image_id"].isin(decoded)]
    return rows[["image_id", "patient_id", "label"]].reset_index(drop=True)


def flow_with_test_set(flow: pd.DataFrame, cohort: pd.DataFrame, test: pd.DataFrame,
                       test_prevalence: str) -> pd.DataFrame:
    """The cohort's flow and a last step: the images the models are scored on."""
    last = flow.iloc[-1]
    if test_prevalence == "natural":  # the pool, before balancing and the cap
        last = {"images": len(cohort), "patients": cohort["patient_id"].nunique()}
    patients = test["patient_id"].nunique()
    reason = ("every selected image is a test image" if test_prevalence == "balanced"
              else "every eligible image, before balancing and the cap, is a test image (split.test_prevalence: natural)")
    removed = int(last["images"]) - len(test)
    step = {"step": "external test set", "images": len(test), "patients": patients,
            "positives": int((test["label"] == 1).sum()), "negatives": int((test["label"] == 0).sum()),
            "removed_images": removed, "removed_patients": int(last["patients"]) - patients,
            "reason": reason + (f"; {removed} could not be decoded" if removed else "")}
    return pd.concat([flow, pd.DataFrame([step], columns=FLOW_COLUMNS)], ignore_index=True)


def too_small(test: pd.DataFrame, min_patients: int) -> str | None:
    """Why the set gives no AUC (fewer than min_patients patients of a class), or None."""
    positive = test.loc[test["label"] == 1, "patient_id"].nunique()
    negative = test.loc[test["label"] == 0, "patient_id"].nunique()
    if min(positive, negative) >= min_patients:
        return None
    kind = "one class only" if min(positive, negative) == 0 else "too small"
    return (f"{kind}: {positive} positive and {negative} negative patients; an AUC needs at least {min_patients} of "
            f"each (evaluate.min_subgroup_patients)")


def evaluate_external(test: pd.DataFrame, threshold: dict, settings: dict, seed: int,
                      catalog: pd.DataFrame | None = None) -> dict:
    """test: image_id, patient_id, label, prob. The main evaluation's metrics (cxrflow.evaluate.evaluate_predictions)
    at the model folder's threshold (`threshold`: its threshold.json), calibration with the folder's temperature,
    and, given the catalog (age, view, sex...), the subgroups."""
    from cxrflow.calibration import apply_temperature, expected_calibration_error
    from cxrflow.evaluate import evaluate_predictions

    counts = {"n_test": len(test), "n_test_patients": int(test["patient_id"].nunique()),
              "n_test_positive": int(test["label"].sum()),
              "n_test_positive_patients": int(test.loc[test["label"] == 1, "patient_id"].nunique()),
              "test_prevalence": float(test["label"].mean()) if len(test) else float("nan")}
    reason = too_small(test, settings["min_subgroup_patients"])
    if reason:
        return {"status": reason, **counts, "threshold": threshold["threshold"]}
    metrics = evaluate_predictions(test.assign(split="test"), settings["bootstrap"], seed,
                                   prevalence=settings["prevalence"], threshold=threshold["threshold"])
    bins, temperature = settings["calibration_bins"], threshold.get("temperature")
    metrics["calibration"] = {"bins": bins, "ece": expected_calibration_error(test["label"], test["prob"], bins),
                              "temperature": temperature, "test_prevalence": metrics["test_prevalence"]}
    if temperature is not None:
        metrics["calibration"]["ece_temperature_scaled"] = expected_calibration_error(
            test["label"], apply_temperature(test["prob"], temperature), bins)
    if catalog is not None:
        from cxrflow.subgroups import subgroup_table

        meta = test.merge(catalog.drop(columns="patient_id", errors="ignore"), on="image_id", how="left")
        groups = subgroup_table(meta, settings["age_bands"], settings["min_subgroup_patients"], settings["bootstrap"],
                                seed)
        metrics["subgroups"] = groups.astype(object).where(groups.notna(), None).to_dict("records")
    return {"status": OK, **metrics}


def external_table(metrics: dict[str, dict], internal: dict[str, dict], names: dict[str, dict]) -> pd.DataFrame:
    """One row per pathology: the external figures beside the same model's on the main test split (`internal`: its
    results/metrics/{pathology}.json); a pathology that was not evaluated keeps its counts and says why."""
    rows = []
    for pathology, m in metrics.items():
        home = internal[pathology]
        row = {"pathology": pathology, "name_en": names[pathology].get("en", pathology),
               "name_ru": names[pathology].get("ru", ""), "status": m["status"],
               **{k: m.get(k) for k in ("n_test", "n_test_positive", "n_test_patients", "test_prevalence", "threshold")},
               "internal_auc": home["auc"], "internal_auc_ci_low": home["auc_ci95"][0],
               "internal_auc_ci_high": home["auc_ci95"][1]}
        if m["status"] == OK:
            row |= {"auc": m["auc"], "auc_ci_low": m["auc_ci95"][0], "auc_ci_high": m["auc_ci95"][1],
                    "auc_minus_internal": m["auc"] - home["auc"],
                    **{k: m[k] for k in ("accuracy", "precision_weighted", "recall_weighted", "f1_weighted")},
                    "sensitivity": m["clinical"]["sensitivity"]["value"],
                    "specificity": m["clinical"]["specificity"]["value"],
                    **{f"{k}_at_0.5": m["at_0.5"][k] for k in ("accuracy", "precision_weighted", "recall_weighted",
                                                                "f1_weighted")},
                    "ece": m["calibration"]["ece"]}
        rows.append(row)
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def _interval(value, low, high) -> str:
    return "n/a" if pd.isna(value) else f"{value:.3f} ({low:.3f}-{high:.3f})"


def external_markdown(table: pd.DataFrame, name: str, test_prevalence: str) -> str:
    header = ["Pathology", "n test (pos.)", "AUC, main test split", f"AUC, {name}", "Accuracy", "Precision (w)",
              "Recall (w)", "F1 (w)"]
    lines = [f"# Trained here, tested there: {name}", "",
             f"Each model applied, unchanged, to the external source `{name}`: its own tables and labels, the main "
             f"run's cohort rules, image settings and QC. There is no split: every "
             f"{'selected' if test_prevalence == 'balanced' else 'eligible'} image of an external cohort is a test "
             "image. Accuracy and the weighted precision, recall and F1 are at the model's own threshold "
             "(its threshold.json, chosen on the main validation split); AUC with a patient-level bootstrap 95% CI. "
             "The main test split's AUC is that of the same model on held-out patients of the training source.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table.to_dict("records"):
        cells = [r["name_en"], f"{r['n_test']} ({r['n_test_positive']})",
                 _interval(r["internal_auc"], r["internal_auc_ci_low"], r["internal_auc_ci_high"])]
        if r["status"] == OK:
            cells += [_interval(r["auc"], r["auc_ci_low"], r["auc_ci_high"]),
                      *(f"{r[k]:.3f}" for k in ("accuracy", "precision_weighted", "recall_weighted", "f1_weighted"))]
        else:
            cells += [f"not evaluated: {r['status']}", "", "", "", ""]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def clinical_preamble(name: str) -> str:
    return (f"# External evaluation: {name}\n\nThe tables below are those of results/clinical_table.md, on the "
            f"external source `{name}` (every selected image of its cohorts is a test image), at each model's own "
            "threshold, chosen on the main validation split. Pathologies that were not evaluated are listed in "
            "metrics_table.md with the reason.\n\n")


def prediction_frame(test: pd.DataFrame, probs: np.ndarray, threshold: float) -> pd.DataFrame:
    """The predictions file: image and patient pseudonyms, the label, split (always test), the probability and the
    call at the model's threshold."""
    out = test.assign(split="test", prob=np.round(np.asarray(probs, dtype=float), 6))
    out["call"] = (out["prob"] >= threshold).astype(int)
    return out[["image_id", "patient_id", "label", "split", "prob", "call"]]
