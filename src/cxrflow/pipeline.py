"""One function per workflow rule: read the rule's input files, call the stage's plain functions, write outputs.

This is the API layer between the Snakemake scripts (which only unpack `snakemake.*`) and the stage modules
(which take and return data). Tests call these functions directly, without Snakemake.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from cxrflow.io import write_csv, write_json, write_parquet, write_text

log = logging.getLogger("cxrflow")


def run_synthesize(settings: dict, seed: int, out_dir) -> dict:
    from cxrflow.synthetic import generate

    summary = generate(Path(out_dir), n_patients=settings.get("n_patients", 600), seed=seed,
                       image_size=settings.get("image_size", 256), bad_fraction=settings.get("bad_fraction", 0.03))
    log.info("synthetic dataset: %s", json.dumps(summary, default=str))
    return summary


def run_ingest(source: dict, keys_file, privacy: dict, catalog_out, ledger_out, summary_out, base=".", workers=1) -> dict:
    from cxrflow.ingest import build_catalog

    result = build_catalog(source, keys_file, base=base, privacy=privacy, workers=workers)
    write_parquet(result.catalog, catalog_out)
    write_csv(result.ledger, ledger_out)
    write_json(result.summary, summary_out)
    log.info("ingest: %s", json.dumps(result.summary))
    return result.summary


def run_preprocess_shard(catalog_path, shard: int, n_shards: int, image: dict, table_out, tensors_out) -> None:
    from cxrflow.tensors import preprocess_shard

    catalog = pd.read_parquet(catalog_path, columns=["image_id", "path"])
    table = preprocess_shard(catalog, shard, n_shards, image["size"], image, tensors_out, table_out)
    log.info("shard %d: %d images, status counts %s", shard, len(table), table["status"].value_counts().to_dict())


def run_tensor_index(tables, index_out) -> None:
    frames = [pd.read_parquet(t, columns=["image_id", "shard", "row", "status"]) for t in tables]
    index = pd.concat(frames, ignore_index=True)
    write_parquet(index, index_out)
    log.info("tensor index: %d images, %d usable", len(index), int((index["status"] == "ok").sum()))


def run_quality(tables, tensors, catalog_path, ingest_ledger, settings: dict, metrics_out, summary_png, sheets_dir,
                ledger_out) -> None:
    """Apply the QC rules; write the metrics, the figures, and the ledger of every input left out so far."""
    from cxrflow.figures import contact_sheets, quality_histograms
    from cxrflow.quality import RULES, apply_rules

    metrics = pd.concat([pd.read_parquet(t) for t in tables], ignore_index=True)
    catalog = pd.read_parquet(catalog_path, columns=["image_id"])
    if len(metrics) != len(catalog) or set(metrics["image_id"]) != set(catalog["image_id"]):
        raise RuntimeError("the preprocessing shards do not cover the catalog exactly; rerun the shards")
    judged = apply_rules(metrics, settings)
    write_parquet(judged, metrics_out)
    thresholds = {metric: settings.get(key) for _, metric, _, key in RULES}
    quality_histograms(judged, thresholds, summary_png)
    contact_sheets(judged, {int(Path(t).stem.split("_")[-1]): t for t in tensors}, sheets_dir)
    rejected = judged.loc[~judged["qc_pass"]]
    ledger = pd.concat([
        pd.read_csv(ingest_ledger, dtype=str),
        pd.DataFrame({"stage": "quality", "item": rejected["image_id"], "reason": rejected["qc_reason"],
                      "detail": rejected["detail"].fillna("")}),
    ], ignore_index=True)
    write_csv(ledger, ledger_out)
    log.info("quality: %d pass, rejects by reason %s", int(judged["qc_pass"].sum()),
             judged.loc[~judged["qc_pass"], "qc_reason"].value_counts().to_dict())


def run_cohort(catalog_path, quality_path, keys_file, cohorts: dict, pathology: str, seed: int, cohort_out, flow_out,
               figure_out=None) -> None:
    """One cohort: its rows (image_id, patient_id, label), its flow table and, given figure_out, its CONSORT diagram.
    quality_path may be None (cohorts.filters.require_qc_pass: false, e.g. metadata-only runs)."""
    from cxrflow.cohorts import COHORT_COLUMNS, build_cohort
    from cxrflow.figures import consort_figure
    from cxrflow.labels import load_keys

    keys = load_keys(keys_file)
    catalog = pd.read_parquet(catalog_path, columns=COHORT_COLUMNS + keys)  # not the report texts: they are large
    quality = pd.read_parquet(quality_path, columns=["image_id", "qc_pass"]) if quality_path else None
    cohort, flow = build_cohort(catalog, quality, cohorts, pathology, keys, seed)
    write_parquet(cohort, cohort_out)
    write_csv(flow, flow_out)
    if figure_out:
        name = cohorts["pathologies"][pathology].get("name", {})
        title = f"{name.get('en', pathology)} ({name['ru']})" if name.get("ru") else name.get("en", pathology)
        consort_figure(flow, f"Cohort flow: {title}", figure_out)
    log.info("cohort %s flow:\n%s", pathology, flow.to_string(index=False))


def run_cohort_flows(flow_files, summary_out, figure_out) -> None:
    """The cohorts side by side: images left after each filter, then each cohort's final positives, negatives
    and patients (a filter that a cohort does not use is empty in its column)."""
    from cxrflow.figures import flow_figure

    flows = {Path(f).stem.removesuffix("_flow"): pd.read_csv(f) for f in flow_files}
    summary = pd.concat({p: f.set_index("step")["images"] for p, f in flows.items()}, axis=1)
    final = pd.DataFrame({p: {"positives": f["positives"].iloc[-1], "negatives": f["negatives"].iloc[-1],
                              "patients": f["patients"].iloc[-1]} for p, f in flows.items()})
    write_csv(pd.concat([summary, final]).astype("Int64").reset_index(names="step"), summary_out)
    flow_figure(flows, figure_out)


def run_split(cohort_path, split: dict, seed: int, pathology: str, manifest_out) -> None:
    from cxrflow.splits import patient_exclusive_split

    manifest = patient_exclusive_split(pd.read_parquet(cohort_path), split, seed, pathology)
    write_csv(manifest, manifest_out)
    by = ["split", "fold"] if "fold" in manifest.columns else ["split"]
    counts = manifest.groupby(by + ["label"], dropna=False).size().unstack(fill_value=0)
    patients = manifest.groupby(by, dropna=False)["patient_id"].nunique().rename("patients")
    log.info("split %s (images per label, and patients):\n%s", pathology, counts.join(patients).to_string())


def run_train(manifest_path, index_path, tensor_files, config: dict, pathology: str, model_out, metadata_out, history_out) -> None:
    from cxrflow.tensors import TensorCache
    from cxrflow.train import finish, train

    manifest = pd.read_csv(manifest_path, dtype={"image_id": str, "patient_id": str})
    cache = TensorCache.open(index_path, tensor_files)
    out_dir = Path(model_out).parent
    result = train(manifest, cache, config, pathology, out_dir, config["seed"], log=log.info)
    finish(result, out_dir, model_out, metadata_out, history_out)


def run_evaluate(model_path, metadata_path, manifest_path, index_path, tensor_files, config: dict, pathology: str,
                 metrics_out, predictions_out, roc_out, *, history_path=None, confusion_out=None, curves_out=None,
                 gradcam_out=None) -> dict:
    """Predict val and test on the CPU; Table 1 metrics on test (threshold from val); the per-pathology figures."""
    import torch

    from cxrflow.evaluate import evaluate_predictions, plot_confusion, plot_roc_pr, plot_training_curves
    from cxrflow.models import load_trained
    from cxrflow.tensors import TensorCache
    from cxrflow.train import predict

    metadata = json.loads(Path(metadata_path).read_text())
    manifest = pd.read_csv(manifest_path, dtype={"image_id": str, "patient_id": str})
    rows = manifest[manifest["split"].isin(["val", "test"])].reset_index(drop=True)
    cache = TensorCache.open(index_path, tensor_files)
    model = load_trained(model_path, metadata["architecture"])
    zscore = metadata["input"]["zscore"]
    probs = predict(model, cache.load(rows["image_id"]), torch.device("cpu"), zscore)
    predictions = rows.assign(prob=np.round(probs, 6))
    metrics = evaluate_predictions(predictions, config["evaluate"]["bootstrap"], config["seed"])
    metrics.update({"pathology": pathology, "best_epoch": metadata["best_epoch"], "model": metadata["architecture"]})
    write_csv(predictions, predictions_out)
    write_json(metrics, metrics_out)
    title = config["cohorts"]["pathologies"][pathology].get("name", {}).get("en", pathology)
    plot_roc_pr(predictions, title, roc_out)
    if confusion_out:
        plot_confusion(metrics, title, confusion_out)
    if curves_out:
        plot_training_curves(pd.read_csv(history_path), metadata["best_epoch"], title, curves_out)
    if gradcam_out:
        from cxrflow.gradcam import grad_cam, pick_examples, plot_gradcam
        from cxrflow.train import prepare_batch

        per_kind = config["evaluate"].get("gradcam_examples", 4)
        examples = pick_examples(predictions[predictions["split"] == "test"], metrics["threshold"], per_kind)
        images = cache.load(examples["image_id"])
        heat, grid = np.zeros(images.shape), None
        if len(examples):
            heat, _, grid = grad_cam(model, prepare_batch(images, torch.device("cpu"), zscore))
        plot_gradcam(images, heat, examples, metrics["threshold"], title, gradcam_out, per_kind, grid)
    log.info("evaluate %s: %s", pathology, json.dumps(metrics))
    return metrics


def run_collect(metric_files, manifest_files, prediction_files, pathologies, names, table_out, markdown_out, roc_out) -> None:
    from cxrflow.report import metrics_table, plot_all_roc, to_markdown

    table = metrics_table(dict(zip(pathologies, metric_files)), dict(zip(pathologies, manifest_files)), names)
    write_csv(table.round(4), table_out)
    write_text(to_markdown(table), markdown_out)
    plot_all_roc(dict(zip(pathologies, prediction_files)), names, roc_out)
    log.info("metrics table:\n%s", table.to_string(index=False))


def run_predict(image_dir, model_files, metadata_files, metric_files, pathologies, quality: dict, probabilities_out) -> pd.DataFrame:
    """The trained models on a folder of new images; thresholds are the validation-chosen ones of the metrics."""
    from cxrflow.predict import predict_folder

    models = {p: (m, meta) for p, m, meta in zip(pathologies, model_files, metadata_files)}
    thresholds = {p: json.loads(Path(f).read_text())["threshold"] for p, f in zip(pathologies, metric_files or [])}
    table = predict_folder(image_dir, models, quality, thresholds, log=log.info)
    write_csv(table, probabilities_out)
    return table
