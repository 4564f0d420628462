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


# The image index: the source's own image id (as the private catalog's source_id), where the file is, and what the
# pre-filter reads. Row i is pixel_id i.
IMAGE_INDEX_COLUMNS = ["pixel_id", "source_id", "path", "view", "sex", "age"]


def run_image_index(source: dict, images_out, base=".", workers=1) -> pd.DataFrame:
    """Reads identifiers (ids, paths): writes them only to the private image index. The pixel branch starts here:
    the images ingest keeps, in its order, without labels and without the pseudonym key, so that neither a label
    edit nor a new key changes this file (and so no shard is decoded again)."""
    from cxrflow.ingest import build_catalog

    catalog = build_catalog(source, None, base=base, workers=workers, labels=False).catalog
    images = catalog.rename(columns={"image_id": "source_id"})
    images.insert(0, "pixel_id", np.arange(len(images), dtype=np.int64))
    images = images[IMAGE_INDEX_COLUMNS]
    write_parquet(images, images_out)
    log.info("image index: %d images", len(images))
    return images


def pixel_ids(source_ids: pd.Series, images_path) -> np.ndarray:
    """Each catalog row's pixel_id, joined on the source's image id. The image index lists exactly the catalog's
    images (both come from build_catalog's rules); any difference means they were built from different sources or
    settings, and is an error, never a guess."""
    from cxrflow.errors import CxrflowError

    images = pd.read_parquet(images_path, columns=["pixel_id", "source_id"])
    position = pd.Index(images["source_id"]).get_indexer(source_ids.astype(images["source_id"].dtype))
    unknown = int((position < 0).sum())
    if unknown or len(images) != len(source_ids):
        raise CxrflowError(
            f"{images_path}: the image index lists {len(images)} images, the catalog {len(source_ids)} "
            f"({unknown} of them not in the index); both must come from the same source and settings: "
            f"rerun them (snakemake --forcerun image_index)")
    return images["pixel_id"].to_numpy()[position]


def run_ingest(source: dict, keys_file, privacy: dict, catalog_out, ledger_out, summary_out, private_catalog_out=None,
               private_ledger_out=None, base=".", workers=1, images_path=None) -> dict:
    """Reads identifiers (notes, paths, ids, dates): writes them only to the private catalog and ledger
    (by default ``private/`` beside the shareable outputs); the shareable catalog and ledger hold pseudonyms.
    Given the image index (images_path), both catalogs take each image's pixel_id, where the branches meet."""
    from cxrflow.ingest import build_catalog
    from cxrflow.labels import load_keys
    from cxrflow.privacy import private_catalog, shareable_catalog, source_key, split_ledger

    key = source_key(source, base)  # before any work: a real archive without a key stops here
    result = build_catalog(source, keys_file, base=base, workers=workers)
    private_catalog_out = private_catalog_out or Path(catalog_out).parent / "private" / "catalog.parquet"
    private_ledger_out = private_ledger_out or Path(ledger_out).parent / "private" / "ledger.csv"
    private = private_catalog(result.catalog, key)
    if images_path:
        private.insert(2, "pixel_id", pixel_ids(private["source_id"], images_path))
    write_parquet(private, private_catalog_out)
    write_parquet(shareable_catalog(private, load_keys(Path(base) / keys_file), key, privacy), catalog_out)
    shared_ledger, private_ledger = split_ledger(result.ledger, key)
    write_csv(shared_ledger, ledger_out)
    write_csv(private_ledger, private_ledger_out)
    result.summary.pop("source", None)  # the annotations' path may name the archive's owner
    write_json(result.summary, summary_out)
    log.info("ingest: %s", json.dumps(result.summary))
    return result.summary


def run_candidates(images_path, filters: dict, candidates_out, prefiltered_out) -> pd.DataFrame:
    """The pre-filter: the images that some consumer of the pixels can take (filters: view, sex, age, their union;
    see cxrflow.cohorts.prefilter) go to the shards; the others are listed by pixel_id with the filter they fail,
    for the ledger."""
    from cxrflow.cohorts import prefilter

    images = pd.read_parquet(images_path, columns=["pixel_id", "path", "view", "sex", "age"])
    left_out = prefilter(images, filters)
    kept = left_out["reason"].isna().to_numpy()
    candidates = images.loc[kept, ["pixel_id", "path"]].reset_index(drop=True)
    write_parquet(candidates, candidates_out)
    write_parquet(pd.concat([images[["pixel_id"]], left_out], axis=1).loc[~kept].reset_index(drop=True),
                  prefiltered_out)
    log.info("candidates: %d of %d images (filters %s); left out by filter %s", len(candidates), len(images), filters,
             left_out["reason"].value_counts().to_dict())
    return candidates


def run_preprocess_shard(candidates_path, shard: int, n_shards: int, image: dict, table_out, tensors_out) -> None:
    """This shard's candidates (pixel_id % n_shards == shard): decoded, measured and cached, keyed by pixel_id."""
    from cxrflow.preprocess import preprocess_shard

    candidates = pd.read_parquet(candidates_path, columns=["pixel_id", "path"])
    table = preprocess_shard(candidates, shard, n_shards, image["size"], image, tensors_out, table_out)
    log.info("shard %d: %d images, status counts %s", shard, len(table), table["status"].value_counts().to_dict())


def shard_tables(tables, catalog_path, columns=None) -> pd.DataFrame:
    """The shard tables with each pixel_id replaced by the catalog's image_id (pseudonym): the pixel branch meets
    the label branch here, so that everything downstream names images as the catalog does."""
    from cxrflow.errors import CxrflowError

    frame = pd.concat([pd.read_parquet(t, columns=columns) for t in tables], ignore_index=True)
    catalog = pd.read_parquet(catalog_path, columns=["image_id", "pixel_id"])
    position = pd.Index(catalog["pixel_id"]).get_indexer(frame["pixel_id"])
    unknown = int((position < 0).sum())
    if unknown:
        raise CxrflowError(f"{catalog_path}: {unknown} images of the preprocessing shards have a pixel_id the catalog "
                           f"does not hold; the shards and the catalog come from different image indexes: rerun "
                           f"the workflow (snakemake --forcerun image_index)")
    frame.insert(0, "image_id", catalog["image_id"].to_numpy()[position])
    return frame.drop(columns="pixel_id")


def run_tensor_index(tables, catalog_path, index_out) -> None:
    """Where each cached image is (shard, row) and whether it is usable (status), by image pseudonym."""
    index = shard_tables(tables, catalog_path, columns=["pixel_id", "shard", "row", "status"])
    write_parquet(index, index_out)
    log.info("tensor index: %d images, %d usable", len(index), int((index["status"] == "ok").sum()))


def run_quality(tables, tensors, catalog_path, ingest_ledger, settings: dict, metrics_out, summary_png, sheets_dir,
                ledger_out, prefiltered_path) -> None:
    """Apply the QC rules; write the metrics, the figures, and the ledger of every input left out so far: at
    ingest, by the pre-filter (never decoded), and by QC."""
    from cxrflow.errors import CxrflowError
    from cxrflow.figures import contact_sheets, quality_histograms
    from cxrflow.quality import RULES, apply_rules

    catalog = pd.read_parquet(catalog_path, columns=["image_id", "pixel_id"])
    prefiltered = pd.read_parquet(prefiltered_path)
    metrics = shard_tables(tables, catalog_path)
    # The shards cover the candidates exactly: the catalog's images less those the pre-filter left out.
    candidates = catalog.loc[~catalog["pixel_id"].isin(prefiltered["pixel_id"]), "image_id"]
    if len(metrics) != len(candidates) or set(metrics["image_id"]) != set(candidates):
        raise CxrflowError(f"the preprocessing shards hold {len(metrics)} images, the candidates are {len(candidates)} "
                           f"(a different set); rerun the shards: snakemake --forcerun candidates")
    judged = apply_rules(metrics, settings)
    write_parquet(judged, metrics_out)
    thresholds = {}  # p50 has two (too_dark, too_bright): a list per metric
    for _, metric, _, key in RULES:
        thresholds.setdefault(metric, []).append(settings.get(key))
    quality_histograms(judged, thresholds, summary_png)
    contact_sheets(judged, {int(Path(t).stem.split("_")[-1]): t for t in tensors}, sheets_dir)
    rejected = judged.loc[~judged["qc_pass"]]
    left_out = prefiltered.merge(catalog, on="pixel_id", how="left", validate="one_to_one")
    ledger = pd.concat([
        pd.read_csv(ingest_ledger, dtype=str),
        pd.DataFrame({"stage": "prefilter", "item": left_out["image_id"], "reason": left_out["reason"],
                      "detail": left_out["detail"].fillna("")}),
        pd.DataFrame({"stage": "quality", "item": rejected["image_id"], "reason": rejected["qc_reason"],
                      "detail": rejected["detail"].fillna("")}),
    ], ignore_index=True)
    write_csv(ledger, ledger_out)
    log.info("quality: %d pass, rejects by reason %s; %d images left out before decoding, by filter %s",
             int(judged["qc_pass"].sum()), judged.loc[~judged["qc_pass"], "qc_reason"].value_counts().to_dict(),
             len(prefiltered), prefiltered["reason"].value_counts().to_dict())


def run_cohort(catalog_path, quality_path, keys_file, cohorts: dict, pathology: str, seed: int, cohort_out, flow_out,
               figure_out=None, duplicates_path=None) -> None:
    """One cohort: its rows (image_id, patient_id, label, selected: see build_cohort's with_pool), its flow table and,
    given figure_out, its CONSORT diagram. quality_path may be None (cohorts.filters.require_qc_pass: false, e.g.
    metadata-only runs); duplicates_path (image_id, group) is given with split.duplicates: drop."""
    import pyarrow.parquet as pq

    from cxrflow.cohorts import COHORT_COLUMNS, OPTIONAL_COLUMNS, build_cohort
    from cxrflow.figures import consort_figure
    from cxrflow.labels import load_keys

    keys = load_keys(keys_file)
    present = set(pq.read_schema(catalog_path).names)
    columns = COHORT_COLUMNS + keys + [c for c in OPTIONAL_COLUMNS if c in present]
    catalog = pd.read_parquet(catalog_path, columns=columns)  # not the report texts: they are large
    quality = pd.read_parquet(quality_path, columns=["image_id", "qc_pass"]) if quality_path else None
    duplicates = pd.read_parquet(duplicates_path, columns=["image_id", "group"]) if duplicates_path else None
    cohort, flow = build_cohort(catalog, quality, cohorts, pathology, keys, seed, duplicates=duplicates, with_pool=True)
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


def run_split(cohort_path, split: dict, seed: int, pathology: str, manifest_out, duplicates_path=None) -> None:
    """The manifest of one cohort; duplicates_path (image_id, group) is given with split.duplicates: group."""
    from cxrflow.splits import patient_exclusive_split

    duplicates = pd.read_parquet(duplicates_path, columns=["image_id", "group"]) if duplicates_path else None
    manifest = patient_exclusive_split(pd.read_parquet(cohort_path), split, seed, pathology, duplicates)
    write_csv(manifest, manifest_out)
    by = ["split", "fold"] if "fold" in manifest.columns else ["split"]
    counts = manifest.groupby(by + ["label"], dropna=False).size().unstack(fill_value=0)
    patients = manifest.groupby(by, dropna=False)["patient_id"].nunique().rename("patients")
    log.info("split %s (images per label, and patients):\n%s", pathology, counts.join(patients).to_string())
    if duplicates is not None:
        linked = manifest.merge(duplicates.drop_duplicates("image_id"), on="image_id")
        spanning = linked.groupby("group")["patient_id"].nunique().gt(1).sum()
        log.info("split %s: %d images in %d duplicate groups, %d of them across patients (kept in one split)", pathology,
                 len(linked), linked["group"].nunique(), spanning)


def run_train(manifest_path, index_path, tensor_files, config: dict, pathology: str, model_out, metadata_out, history_out,
              threads: int | None = None) -> None:
    """The `train` rule: one pathology's binary model; torch uses the rule's `threads` CPU threads."""
    from cxrflow.inference import use_threads
    from cxrflow.tensors import TensorCache
    from cxrflow.train import finish, train

    use_threads(threads)
    manifest = pd.read_csv(manifest_path, dtype={"image_id": str, "patient_id": str})
    cache = TensorCache.open(index_path, tensor_files)
    out_dir = Path(model_out).parent
    result = train(manifest, cache, config, pathology, out_dir, config["seed"], log=log.info)
    finish(result, out_dir, model_out, metadata_out, history_out)


def run_evaluate(model_path, metadata_path, manifest_path, index_path, tensor_files, config: dict, pathology: str,
                 metrics_out, predictions_out, roc_out, *, threads: int | None = None, **outputs) -> dict:
    """The `evaluate` rule (see _evaluate for the outputs): on a GPU when one is visible, taken as training takes
    it (cxrflow.devices), with torch on the rule's `threads` CPU threads."""
    import torch

    from cxrflow.devices import acquire_slot, visible_devices
    from cxrflow.inference import use_threads

    use_threads(threads)
    slot = acquire_slot(visible_devices(torch.cuda.device_count()))
    try:
        return _evaluate(model_path, metadata_path, manifest_path, index_path, tensor_files, config, pathology,
                         metrics_out, predictions_out, roc_out, device=torch.device(slot.device), **outputs)
    finally:
        slot.release()


def _evaluate(model_path, metadata_path, manifest_path, index_path, tensor_files, config: dict, pathology: str,
              metrics_out, predictions_out, roc_out, *, device, history_path=None, confusion_out=None, curves_out=None,
              gradcam_out=None, catalog_path=None, reliability_out=None, threshold_out=None, label_out=None,
              subgroups_out=None) -> dict:
    """Predict val and test, streamed from the cache in batches; Table 1 and clinical metrics on test (threshold
    from val), calibration and, given the catalog, subgroups and the metadata baseline; the per-pathology figures.
    threshold_out and label_out (in the model folder) record the decision threshold and temperature, and the label
    definition, that go with the model: with metadata.json (the input convention) the folder describes itself."""
    import torch

    from cxrflow.calibration import (TEMPERATURE_BOUNDS, apply_temperature, expected_calibration_error, fit_temperature,
                                     plot_reliability)
    from cxrflow.evaluate import evaluate_predictions, plot_confusion, plot_roc_pr, plot_training_curves
    from cxrflow.inference import amp_dtype_for, predict_cached
    from cxrflow.multilabel import load_for_pathology
    from cxrflow.tensors import TensorCache

    settings = config["evaluate"]
    metadata = json.loads(Path(metadata_path).read_text())
    manifest = pd.read_csv(manifest_path, dtype={"image_id": str, "patient_id": str})
    rows = manifest[manifest["split"].isin(["val", "test"])].reset_index(drop=True)
    cache = TensorCache.open(index_path, tensor_files)
    model = load_for_pathology(model_path, metadata, pathology)  # a binary model, or its output of the multi-label one
    model = model.to(device, memory_format=torch.channels_last) if device.type == "cuda" else model
    zscore = metadata["input"]["zscore"]
    log.info("evaluate %s: %d val and test images on %s", pathology, len(rows), device)
    probs = predict_cached(model, cache, rows["image_id"], device, zscore, amp_dtype=amp_dtype_for(device), log=log.info)
    predictions = rows.assign(prob=np.round(probs, 6))
    catalog = None
    if catalog_path:
        from cxrflow.baselines import ORDER_COLUMNS, metadata_baseline, metadata_features

        wanted = ["image_id", "patient_id", "age", "view", "sex", "manufacturer", "site", *ORDER_COLUMNS]
        columns = [c for c in wanted if c in _parquet_columns(catalog_path)]
        # Only the cohort's patients (all their images: the follow-up index counts them), not the whole archive.
        patients = manifest["patient_id"].astype(str).unique().tolist()
        catalog = pd.read_parquet(catalog_path, columns=columns, filters=[("patient_id", "in", patients)])
        catalog["image_id"] = catalog["image_id"].astype(str)
        baseline, features = metadata_baseline(manifest, metadata_features(catalog))
        predictions["baseline_prob"] = np.round(baseline[manifest["split"].isin(["val", "test"]).to_numpy()], 6)
    prevalence = settings.get("prevalence")
    metrics = evaluate_predictions(predictions, settings["bootstrap"], config["seed"], prevalence=prevalence,
                                   reference="baseline_prob" if catalog is not None else None)
    metrics.update({"pathology": pathology, "mode": metadata.get("mode", "binary"), "best_epoch": metadata["best_epoch"],
                    "model": metadata["architecture"],
                    "permuted_labels": metadata.get("permuted_labels", False)})

    bins = settings.get("calibration_bins", 10)
    val, test = predictions[predictions["split"] == "val"], predictions[predictions["split"] == "test"]
    temperature = fit_temperature(val["label"], val["prob"]) if settings.get("temperature_scaling", False) else None
    metrics["calibration"] = {"bins": bins, "ece": expected_calibration_error(test["label"], test["prob"], bins),
                              "temperature": temperature, "test_prevalence": metrics["test_prevalence"]}
    calibrated = None
    if temperature is not None:
        # A validation split that the model separates perfectly (or not at all) has no finite best temperature.
        metrics["calibration"]["temperature_at_bound"] = bool(np.isclose(temperature, TEMPERATURE_BOUNDS, rtol=1e-3).any())
        predictions["prob_calibrated"] = np.round(apply_temperature(predictions["prob"], temperature), 6)
        calibrated = predictions.loc[predictions["split"] == "test", "prob_calibrated"]
        metrics["calibration"]["ece_temperature_scaled"] = expected_calibration_error(test["label"], calibrated, bins)
    if catalog is not None:
        from cxrflow.evaluate import patient_bootstrap_auc
        from cxrflow.metrics import weighted_auc
        from cxrflow.subgroups import subgroup_table

        difference = metrics.pop("reference_auc_difference")
        metrics["baseline"] = {
            "model": "logistic regression on metadata alone, fitted on the train split", "features": features,
            "auc": weighted_auc(test["label"], test["baseline_prob"]),
            "auc_ci95": list(patient_bootstrap_auc(test["label"], test["baseline_prob"], test["patient_id"],
                                                   settings["bootstrap"], config["seed"])),
            "auc_difference": difference["value"], "auc_difference_ci95": difference["ci95"],
            # The network "beats" the baseline when the paired interval of the difference excludes 0.
            "network_beats_baseline": bool(difference["ci95"][0] > 0),
        }
        test_meta = test.merge(catalog.drop(columns=["patient_id", *ORDER_COLUMNS], errors="ignore"), on="image_id", how="left")
        groups = subgroup_table(test_meta, settings.get("age_bands", [40, 60, 80]), settings.get("min_subgroup_patients", 10),
                                settings["bootstrap"], config["seed"])
        metrics["subgroups"] = groups.astype(object).where(groups.notna(), None).to_dict("records")
        metrics["min_subgroup_patients"] = settings.get("min_subgroup_patients", 10)
        if subgroups_out:
            write_csv(groups.round(4), subgroups_out)
    write_csv(predictions, predictions_out)
    write_json(metrics, metrics_out)
    if threshold_out:
        from cxrflow.model_card import strict_json

        write_json(strict_json({
            "pathology": pathology, "threshold": metrics["threshold"],
            "applies_to": "sigmoid(logit), the model's raw probability",
            "chosen_on": "the validation split, maximising Youden's J (sensitivity + specificity - 1)",
            "temperature": temperature,
            "calibrated_probability": "sigmoid(logit / temperature)" if temperature is not None else None,
            "threshold_calibrated": float(apply_temperature(metrics["threshold"], temperature)) if temperature is not None else None,
        }), threshold_out)
    if label_out:
        from cxrflow.model_card import label_definition

        write_json(label_definition(config["cohorts"], pathology), label_out)
    title = config["cohorts"]["pathologies"][pathology].get("name", {}).get("en", pathology)
    plot_roc_pr(predictions, title, roc_out)
    if reliability_out:
        plot_reliability(test["label"], test["prob"], title, reliability_out, bins, calibrated)
    if confusion_out:
        plot_confusion(metrics, title, confusion_out)
    if curves_out:
        plot_training_curves(pd.read_csv(history_path), metadata["best_epoch"], title, curves_out)
    if gradcam_out:
        from cxrflow.gradcam import grad_cam, pick_examples, plot_gradcam
        from cxrflow.inference import prepare_batch

        per_kind = settings.get("gradcam_examples", 4)
        examples = pick_examples(predictions[predictions["split"] == "test"], metrics["threshold"], per_kind)
        images = cache.load(examples["image_id"])  # its few examples only
        heat, grid = np.zeros(images.shape), None
        if len(examples):
            heat, _, grid = grad_cam(model, prepare_batch(images, device, zscore))
        plot_gradcam(images, heat, examples, metrics["threshold"], title, gradcam_out, per_kind, grid)
    log.info("evaluate %s: %s", pathology, json.dumps(metrics, default=str))
    return metrics


def _parquet_columns(path) -> list[str]:
    import pyarrow.parquet as pq

    return list(pq.read_schema(path).names)


def run_model_card(metadata_path, threshold_path, metrics_path, flow_path, manifest_path, config: dict, pathology: str,
                   card_out, json_out) -> dict:
    from cxrflow.model_card import build_card, card_markdown

    card = build_card(json.loads(Path(metadata_path).read_text()), json.loads(Path(threshold_path).read_text()),
                      json.loads(Path(metrics_path).read_text()), pd.read_csv(flow_path),
                      pd.read_csv(manifest_path, dtype={"image_id": str, "patient_id": str}), config, pathology)
    write_json(card, json_out)
    write_text(card_markdown(card), card_out)
    return card


def run_collect(metric_files, manifest_files, prediction_files, pathologies, names, table_out, markdown_out, roc_out, *,
                clinical_out=None, clinical_markdown_out=None, subgroup_files=None, subgroups_out=None,
                subgroups_markdown_out=None, min_subgroup_patients: int = 10, card_files=None) -> None:
    from cxrflow.report import (clinical_markdown, clinical_table, metrics_table, plot_all_roc, subgroups_markdown,
                                subgroups_table, to_markdown)

    table = metrics_table(dict(zip(pathologies, metric_files)), dict(zip(pathologies, manifest_files)), names)
    write_csv(table.round(4), table_out)
    write_text(to_markdown(table), markdown_out)
    plot_all_roc(dict(zip(pathologies, prediction_files)), names, roc_out)
    log.info("metrics table:\n%s", table.to_string(index=False))
    if clinical_out:
        clinical = clinical_table(dict(zip(pathologies, metric_files)), names)
        write_csv(clinical.round(4), clinical_out)
        # Links relative to results/, where the tables are written.
        links = {p: str(Path(c).relative_to("results")) if Path(c).is_relative_to("results") else str(c)
                 for p, c in zip(pathologies, card_files or [])}
        write_text(clinical_markdown(clinical, links), clinical_markdown_out)
        log.info("clinical table:\n%s", clinical.to_string(index=False))
    if subgroups_out:
        groups = subgroups_table(dict(zip(pathologies, subgroup_files)), names)
        write_csv(groups, subgroups_out)
        write_text(subgroups_markdown(groups, min_subgroup_patients), subgroups_markdown_out)


def run_predict(image_dir, model_files, metadata_files, threshold_files, pathologies, quality: dict, probabilities_out,
                threads: int | None = None) -> pd.DataFrame:
    """The trained models on a folder of new images, from the model folders alone (per pathology: the network, its
    metadata.json, its threshold.json); on a GPU when one is visible, as in training and evaluation."""
    import torch

    from cxrflow.devices import acquire_slot, visible_devices
    from cxrflow.inference import use_threads
    from cxrflow.predict import predict_folder, read_model_folder

    use_threads(threads)
    models = [read_model_folder(*files) for files in zip(pathologies, model_files, metadata_files, threshold_files)]
    slot = acquire_slot(visible_devices(torch.cuda.device_count()))
    try:
        table = predict_folder(image_dir, models, quality, slot.device, log=log.info)
    finally:
        slot.release()
    write_csv(table, probabilities_out)
    return table


def run_external(name: str, catalog_path, private_catalog_path, keys_file, model_files, metadata_files,
                 threshold_files, internal_metric_files, pathologies, config: dict, metrics_out, predictions_out,
                 table_out, markdown_out, clinical_out, clinical_markdown_out, flow_out, quality_out,
                 threads: int | None = None) -> pd.DataFrame:
    """The trained models on an external source's cohorts (cxrflow.external): its catalog (the external_catalog rule)
    is decoded, QC'd and made into cohorts under the main run's rules; each model scores its cohort's images, and is
    evaluated at its own threshold. `config`: seed, cohorts, image, quality, evaluate, split.test_prevalence. Reads
    file paths (the private catalog) only to decode; writes pseudonyms and counts, and the QC table under
    results/private/. On a GPU when one is visible, as evaluation is."""
    import tempfile

    from cxrflow.cohorts import COHORT_COLUMNS, OPTIONAL_COLUMNS
    from cxrflow.errors import CxrflowError
    from cxrflow.external import (clinical_preamble, decode_images, evaluate_external, external_cohorts,
                                  external_markdown, external_table, external_test_set, flow_with_test_set,
                                  images_to_decode, prediction_frame, quality_of_catalog)
    from cxrflow_plan import load_keys  # cxrflow.labels' twin without the labelling libraries (train env)
    from cxrflow.predict import read_model_folder
    from cxrflow.quality import apply_rules
    from cxrflow.report import clinical_markdown, clinical_table

    keys, seed, cohorts_cfg = load_keys(keys_file), config["seed"], config["cohorts"]
    test_prevalence = config["split"]["test_prevalence"]
    models = [read_model_folder(*files) for files in zip(pathologies, model_files, metadata_files, threshold_files)]
    conventions = {(m.convention, m.metadata["input"]["zscore"]) for m in models}
    image = config["image"]
    if conventions != {((image["size"], tuple(image["clip_percentiles"]), image["clahe"]), image["zscore"])}:
        raise CxrflowError(f"{', '.join(map(str, metadata_files))}: the models' input conventions {sorted(conventions)} "
                           f"are not this config's image settings {image}; retrain them (snakemake --forcerun train) "
                           "or evaluate with the config they were trained with")
    present = set(_parquet_columns(catalog_path))
    wanted = COHORT_COLUMNS + keys + [c for c in [*OPTIONAL_COLUMNS, "manufacturer", "site"] if c in present]
    catalog = pd.read_parquet(catalog_path, columns=wanted)
    decode = images_to_decode(catalog, cohorts_cfg, pathologies, keys, seed)
    paths = pd.read_parquet(private_catalog_path, columns=["image_id", "path"])
    paths = paths[paths["image_id"].isin(decode)].reset_index(drop=True)
    log.info("external %s: %d catalog images, %d that some cohort can take are decoded", name, len(catalog), len(paths))
    internal = {p: json.loads(Path(f).read_text()) for p, f in zip(pathologies, internal_metric_files)}
    names = {p: cohorts_cfg["pathologies"][p].get("name", {}) for p in pathologies}
    flows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="tensors-", dir=Path(quality_out).parent) as folder:
        if len(paths):
            index_path, shard_files = decode_images(paths, image, Path(folder), threads or 1)
            judged = apply_rules(pd.read_parquet(index_path).drop(columns=["shard", "row"]), config["quality"])
        else:
            index_path, shard_files, judged = None, [], pd.DataFrame({"image_id": [], "status": [], "qc_pass": []})
        write_parquet(judged, quality_out)
        log.info("external %s: QC passed %d of %d decoded images; rejects by reason %s", name,
                 int(judged["qc_pass"].sum()), len(judged), judged.loc[~judged["qc_pass"].astype(bool), "qc_reason"]
                 .value_counts().to_dict() if len(judged) else {})
        cohorts = external_cohorts(catalog, quality_of_catalog(catalog, judged), cohorts_cfg, pathologies, keys, seed)
        # torch runs only now: decoding forks worker processes (cxrflow.external.decode_images).
        import torch

        from cxrflow.devices import acquire_slot, visible_devices
        from cxrflow.inference import amp_dtype_for, predict_cached, use_threads
        from cxrflow.multilabel import load_for_pathology
        from cxrflow.tensors import TensorCache

        use_threads(threads)
        cache = TensorCache.open(index_path, shard_files) if index_path else None
        decoded = cache.index.index if cache is not None else pd.Index([])
        slot = acquire_slot(visible_devices(torch.cuda.device_count()))
        try:
            device = torch.device(slot.device)
            for model, metrics_file, predictions_file in zip(models, metrics_out, predictions_out):
                p = model.pathology
                if isinstance(cohorts[p], str):  # the source cannot give this cohort: a row that says why
                    test, probs = pd.DataFrame({"image_id": [], "patient_id": [], "label": []}), np.zeros(0)
                    metrics = {"status": cohorts[p], "n_test": 0, "n_test_positive": 0, "n_test_patients": 0,
                               "test_prevalence": None, "threshold": model.threshold}
                else:
                    cohort, flow = cohorts[p]
                    test = external_test_set(cohort, test_prevalence, decoded)
                    flows.append(flow_with_test_set(flow, cohort, test, test_prevalence).assign(pathology=p))
                    network = load_for_pathology(model.model_path, model.metadata, p).to(device)
                    probs = predict_cached(network, cache, test["image_id"], device, model.metadata["input"]["zscore"],
                                           amp_dtype=amp_dtype_for(device), log=log.info) if len(test) else np.zeros(0)
                predictions = prediction_frame(test, probs, model.threshold)
                if not isinstance(cohorts[p], str):
                    metrics = evaluate_external(predictions, {"threshold": model.threshold,
                                                              "temperature": model.temperature},
                                                config["evaluate"], seed, catalog)
                metrics |= {"pathology": p, "external": name, "mode": model.metadata.get("mode", "binary"),
                            "model": model.metadata["architecture"], "best_epoch": model.metadata.get("best_epoch"),
                            "threshold_from": "the model folder's threshold.json (chosen on the main validation split)",
                            "test_set": "every selected image of the external cohort" if test_prevalence == "balanced"
                            else "every eligible image of the external cohort (split.test_prevalence: natural)"}
                write_csv(predictions, predictions_file)
                write_json(metrics, metrics_file)
                results[p] = metrics
                log.info("external %s, %s: %s", name, p, metrics["status"] if metrics["status"] != "ok"
                         else f"AUC {metrics['auc']:.3f} {metrics['auc_ci95']} on {metrics['n_test']} images "
                              f"(main test split {internal[p]['auc']:.3f})")
        finally:
            slot.release()
    flow = pd.concat(flows, ignore_index=True) if flows else pd.DataFrame(columns=["pathology"])
    write_csv(flow[["pathology", *[c for c in flow.columns if c != "pathology"]]], flow_out)
    table = external_table(results, internal, names)
    write_csv(table.round(4), table_out)
    write_text(external_markdown(table, name, test_prevalence), markdown_out)
    evaluated = {p: f for p, f in zip(pathologies, metrics_out) if results[p]["status"] == "ok"}
    clinical = clinical_table(evaluated, names)
    write_csv(clinical.round(4), clinical_out)
    write_text(clinical_preamble(name) + (clinical_markdown(clinical) if evaluated else "No pathology could be evaluated.\n"),
               clinical_markdown_out)
    log.info("external %s:\n%s", name, table[["pathology", "status", "n_test", "auc", "internal_auc"]].to_string(index=False))
    return table


def _scan_notes(catalog_path, vocabulary, keys_file):
    """Each distinct note and sentence of the catalog labelled once (cxrflow.label_audit.scan_archive)."""
    from cxrflow.errors import CxrflowError
    from cxrflow.label_audit import read_distinct_notes, scan_distinct_notes
    from cxrflow.labels import load_keys, load_vocabulary

    if not vocabulary:
        raise CxrflowError("source.vocabulary: label coverage and audit need free-text notes (source.format freetext, "
                           "or dicom with annotations); this source's labels come from its label map")
    keys = load_keys(keys_file)
    vocab = load_vocabulary(vocabulary, keys)
    return scan_distinct_notes(*read_distinct_notes(catalog_path), vocab, keys), vocab


def run_label_coverage(catalog_path, vocabulary, keys_file, settings: dict, coverage_out, unmatched_out,
                       near_misses_out) -> pd.DataFrame:
    """Reads identifiers: the notes of the private catalog. The coverage table holds counts only; the unmatched
    notes and sentences and the near-miss words hold note text and belong under results/private/."""
    import time

    from cxrflow.label_audit import coverage_table, near_miss_words, unmatched_text

    started = time.perf_counter()
    scan, _ = _scan_notes(catalog_path, vocabulary, keys_file)
    coverage = coverage_table(scan)
    write_csv(coverage, coverage_out)
    write_csv(unmatched_text(scan, settings["coverage_top"]), unmatched_out)
    near = near_miss_words(scan, settings["near_miss_distance"], settings["near_miss_min_length"],
                           settings["coverage_top"])
    write_csv(near, near_misses_out)
    summary = coverage[coverage["key"] == ""].set_index("measure")[["count", "distinct"]]
    log.info("label coverage in %.1f s (counts only; the text is in the private files):\n%s",
             time.perf_counter() - started, summary.to_string())
    return coverage


def run_label_audit_sheets(catalog_path, vocabulary, keys_file, per_state: dict, seed: int, sheet_files) -> None:
    """Reads identifiers: the notes of the private catalog. Each sheet holds note text (results/private/); it is
    UTF-8 with a byte-order mark, so that a spreadsheet opens the Cyrillic as it is."""
    from cxrflow.io import atomic_path
    from cxrflow.label_audit import audit_sheets

    scan, vocab = _scan_notes(catalog_path, vocabulary, keys_file)
    sheets = audit_sheets(scan, vocab, per_state, seed)
    for path in map(Path, sheet_files):
        with atomic_path(path) as tmp:
            sheets[path.stem].to_csv(tmp, index=False, encoding="utf-8-sig")
    log.info("audit sheets: rows per key and state (no text here):\n%s",
             pd.concat(sheets.values()).groupby(["key", "state"]).size().unstack(fill_value=0).to_string())


def run_label_audit_precision(folder, verdict_files, keys_file, precision_out) -> pd.DataFrame:
    """Reads the filled audit sheets (note text) in `folder`; writes each key's judged and correct counts, the
    proportion correct and its Wilson 95% interval (on the affirmed rows: the key's precision)."""
    from cxrflow.errors import CxrflowError
    from cxrflow.label_audit import precision_table, read_verdicts
    from cxrflow.labels import load_keys

    if not folder or not Path(folder).is_dir():
        raise CxrflowError(f"labels.audit_verdicts: no such folder: {folder!r}; put the filled audit sheets there")
    if not verdict_files:
        raise CxrflowError(f"labels.audit_verdicts: {folder} holds no .csv or .xlsx audit sheet")
    table = precision_table(read_verdicts(verdict_files, load_keys(keys_file)), load_keys(keys_file))
    write_csv(table, precision_out)
    log.info("audit precision:\n%s", table.to_string(index=False))
    return table


def run_duplicates(tables, near_bits: int | None, duplicates_out, catalog_path) -> pd.DataFrame:
    """Exact and near duplicate images across all shards (see cxrflow.duplicates); the split keeps groups together.
    The shards name images by pixel_id; the catalog gives their pseudonyms."""
    from cxrflow.duplicates import duplicate_summary, find_duplicates

    columns = ["image_id", "content_hash", "pixel_hash", "phash"]
    fingerprints = shard_tables(tables, catalog_path).reindex(columns=columns)
    duplicates = find_duplicates(fingerprints, near_bits)
    write_parquet(duplicates, duplicates_out)
    log.info("duplicates: %s", json.dumps(duplicate_summary(duplicates)))
    return duplicates
