# Everything the rules look up: config validation, constants derived from config, input functions.
import os
import sys
from pathlib import Path

from snakemake.utils import validate

# The workflow's own folder, also when it runs as a module from another directory (workflow.basedir is then the
# user's). Bundled files (schema, label keys, vocabularies, label maps) are found here; the user's files (config,
# archive, resources/, results/) relative to the working directory (README, "Use as a module").
WORKFLOW_DIR = Path(workflow.current_basedir).parents[1]  # this file is in workflow/rules/
# The jobs' scripts import the cxrflow package from src/ (also inside conda envs and cluster jobs, which inherit
# this environment). Planning the DAG imports only cxrflow_plan (stdlib, PyYAML, jsonschema: Snakemake's own).
SRC = str(WORKFLOW_DIR / "src")
sys.path.insert(0, SRC)
os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")])))

from cxrflow_plan import (
    CxrflowError,
    check_config,
    enabled_pathologies,
    is_builtin_synthetic,
    key_fingerprint,
    load_keys,
    schema_errors,
    source_key,
)

BUNDLED = (("labels", "keys"), ("source", "vocabulary"), ("source", "label_map"))


def bundled_file(path):
    """A config path to a file the workflow ships: as written when it exists relative to the working directory
    (the user's own file, or the repository itself), else the workflow's copy."""
    if Path(path).is_absolute() or Path(path).exists() or not (WORKFLOW_DIR / path).exists():
        return path
    return str(WORKFLOW_DIR / path)


try:
    # A config mistake is the user's: one line naming the key, no traceback.
    schema_errors(config, WORKFLOW_DIR / "workflow/schemas/config.schema.yaml")
    validate(config, schema="../schemas/config.schema.yaml")  # also fills in the defaults
    for section, key in BUNDLED:
        if config[section].get(key):
            config[section][key] = bundled_file(config[section][key])
    check_config(config, Path("."))
    PATHOLOGIES = enabled_pathologies(config["cohorts"])
    # A real archive without a pseudonym key stops before any job.
    KEY_FINGERPRINT = key_fingerprint(source_key(config["source"], written=False))
except CxrflowError as err:
    sys.exit(f"cxrflow config error: {err}")

SHARDS = [f"{i:04d}" for i in range(config["preprocess"]["shards"])]

# Images of patients go into shareable figures and the report only for the built-in synthetic archive, or when
# the user says so (report.show_images: true); otherwise such figures are written under results/private/.
SHOW_IMAGES = config["report"]["show_images"]
if SHOW_IMAGES is None:
    SHOW_IMAGES = is_builtin_synthetic(config["source"], written=False)


wildcard_constraints:
    pathology="|".join(PATHOLOGIES),
    shard=r"\d{4}",


# --- the pixel branch: image index -> candidates -> shards (workflow/rules/ingest.smk, tensors.smk) ---------------

# Source settings that shape the labels alone: the pixel branch neither reads them nor reruns when they change.
LABEL_ONLY_SOURCE_SETTINGS = ("vocabulary", "label_map", "uncertain", "unmentioned", "combine")


def image_index_inputs(wildcards):
    """The source's tables that build_catalog reads for pixels only (cxrflow.ingest): those that decide which images
    exist and where. VinDr's image-level label table names images of its own; MIMIC's label table does not. Not
    the vocabulary, the label map or the label keys."""
    source = config["source"]
    tables = ["annotations", "patients"] + (["labels"] if source["format"] == "vindr" else [])
    return {key: source[key] for key in tables if source.get(key)}


def pixel_source_settings():
    """The source settings without those of the labels (and without the notes' column, which pixels never read)."""
    settings = {k: v for k, v in config["source"].items() if k not in LABEL_ONLY_SOURCE_SETTINGS}
    if "columns" in settings:
        settings["columns"] = {k: v for k, v in settings["columns"].items() if k != "text"}
    return settings


def candidate_filters():
    """The pre-filter before any decode: the metadata filters (view, sex, age) of every consumer of the pixels, as a
    union. The cohorts share cohorts.filters; multi-label training with train.auxiliary_images: catalog also takes
    every QC-passed image in the views (men and any age included)."""
    filters = {key: config["cohorts"]["filters"].get(key) for key in ("views", "sex", "age")}
    train = config["train"]
    if MULTILABEL and train["auxiliary_keys"] and train["auxiliary_images"] == "catalog":
        filters |= {"sex": None, "age": None}
    return filters


def preprocess_shards(wildcards):
    return {
        "tables": expand("results/preprocess/shards/{shard}.parquet", shard=SHARDS),
        "tensors": expand("results/tensors/shard_{shard}.npy", shard=SHARDS),
    }


def shard_tables(wildcards):
    return expand("results/preprocess/shards/{shard}.parquet", shard=SHARDS)


def quality_rules():
    """The QC thresholds; the duplicate threshold is the duplicates rule's alone, so editing it reruns only that."""
    return {k: v for k, v in config["quality"].items() if k != "near_duplicate_bits"}


def tensor_shards(wildcards):
    return expand("results/tensors/shard_{shard}.npy", shard=SHARDS)


def cohort_inputs(wildcards):
    """The quality table only when the cohorts require QC (metadata-only runs have no images to check); the
    duplicate table with split.duplicates: drop (the cohort drops the copies)."""
    inputs = {"catalog": "results/catalog.parquet", "label_keys": config["labels"]["keys"]}
    if config["cohorts"]["filters"].get("require_qc_pass", True):
        inputs["quality"] = "results/quality/metrics.parquet"
    return inputs | duplicates_input("drop")


def split_inputs(wildcards):
    """The cohort, and the duplicate table with split.duplicates: group (the split merges their patients)."""
    return {"cohort": f"results/cohorts/{wildcards.pathology}.parquet"} | duplicates_input("group")


DUPLICATES_TABLE = "results/quality/duplicates.parquet"


def duplicates_input(mode):
    """The duplicate-image table (image_id, group; cxrflow.duplicates) for the rule that uses it under
    split.duplicates == mode. Only where images are read (source.check_files) and a rule of this workflow
    writes the table: a metadata-only run has no images to compare."""
    if config["split"]["duplicates"] != mode or not config["source"].get("check_files", True):
        return {}
    if not any(DUPLICATES_TABLE in map(str, each.output) for each in workflow.rules):
        return {}
    return {"duplicates": DUPLICATES_TABLE}


def cohort_settings(wildcards):
    """Only what one cohort depends on: editing another cohort's entry (or cohorts.enabled) must not rerun it."""
    shared = {k: v for k, v in config["cohorts"].items() if k not in ("pathologies", "enabled")}
    entry = config["cohorts"]["pathologies"][wildcards.pathology]
    return shared | {"pathologies": {wildcards.pathology: entry}}


def pathology_names():
    return {p: config["cohorts"]["pathologies"][p].get("name", {}) for p in PATHOLOGIES}


def training_settings(wildcards):
    """Only what a model depends on: changing e.g. the bootstrap count must not retrain."""
    return {key: config[key] for key in ("seed", "image", "model", "train")} | {
        "cohorts": {
            "pathologies": {
                wildcards.pathology: config["cohorts"]["pathologies"][wildcards.pathology]
            }
        }
    }


def shard_image_settings():
    """What a cached tensor depends on; z-score is applied at training time and must not re-run the shards."""
    return {key: config["image"][key] for key in ("size", "clip_percentiles", "clahe")}


def ingest_inputs(wildcards):
    """The source's tables and label files, so that editing one reruns ingest (a dicom source may have no table),
    and the image index, whose pixel_id the catalog takes."""
    source = config["source"]
    inputs = {"label_keys": config["labels"]["keys"], "images": "results/private/images.parquet"}
    for key in ("annotations", "labels", "patients", "label_map", "vocabulary"):
        if source.get(key):
            inputs[key] = source[key]
    return inputs


def evaluation_settings(wildcards):
    """What an evaluation depends on: the model's settings, the evaluation's own, and the cohort's definition, which
    it writes into the model folder (label.json)."""
    return training_settings(wildcards) | {
        "evaluate": config["evaluate"],
        "cohorts": cohort_settings(wildcards),
    }


# --- free-text label coverage and audit (workflow/rules/labels.smk) ---------------------------------------------


def free_text_vocabulary():
    """The vocabulary that labels the notes, or None for a source labelled by a native label map (its
    `vocabulary:` may be inherited from config.yaml and is then unused)."""
    source = config["source"]
    if source["format"] == "freetext" or (
        source["format"] == "dicom" and source.get("annotations")
    ):
        return source.get("vocabulary")
    return None


LABEL_KEYS = load_keys(config["labels"]["keys"])


def label_text_inputs(wildcards):
    """The private catalog (it holds the notes), the label keys and the vocabulary that labelled the notes."""
    inputs = {"catalog": "results/private/catalog.parquet", "label_keys": config["labels"]["keys"]}
    if free_text_vocabulary():
        inputs["vocabulary"] = free_text_vocabulary()
    return inputs


def coverage_settings():
    return {
        key: config["labels"][key]
        for key in ("coverage_top", "near_miss_distance", "near_miss_min_length")
    }


def audit_verdict_files(wildcards):
    """The filled audit sheets in labels.audit_verdicts (CSV or Excel); a missing folder is the script's error."""
    folder = config["labels"]["audit_verdicts"]
    if not folder or not Path(folder).is_dir():
        return []
    return sorted(
        str(path)
        for path in Path(folder).iterdir()
        if path.suffix.lower() in (".csv", ".xlsx") and not path.name.startswith((".", "~$"))
    )


def label_targets():
    """Coverage and audit sheets for a free-text source; a source with native labels has no wording to cover.
    The precision table once a doctor's sheets are named (labels.audit_verdicts)."""
    if not free_text_vocabulary():
        return []
    targets = ["results/labels/coverage.csv"]
    targets += expand("results/private/labels/audit/{key}.csv", key=LABEL_KEYS)
    if config["labels"]["audit_verdicts"]:
        targets.append("results/labels/audit_precision.csv")
    return targets


def model_card_settings(wildcards):
    """What a model card states: the model's and the evaluation's settings, its cohort's definition, the split."""
    return evaluation_settings(wildcards) | {
        "cohorts": cohort_settings(wildcards),
        "split": config["split"],
        "source": {"format": config["source"]["format"]},
    }


# --- multi-label mode (workflow/rules/multilabel.smk) ------------------------------------------------------------

MULTILABEL = config["train"]["mode"] == "multilabel"
SHARED_SPLIT = MULTILABEL or config["split"]["shared"]


def shared_split_inputs(wildcards):
    """Every enabled cohort, and the duplicate table with split.duplicates: group."""
    cohorts = expand("results/cohorts/{pathology}.parquet", pathology=PATHOLOGIES)
    return {"cohorts": cohorts} | duplicates_input("group")


def multilabel_training_inputs(wildcards):
    """The shared split's manifests and the tensors; the catalog for auxiliary outputs, and with
    train.auxiliary_images: catalog the QC table (only QC-passed images train) and the duplicate table.
    """
    inputs = {
        "manifests": expand("results/splits/{pathology}.csv", pathology=PATHOLOGIES),
        "index": "results/tensors/index.parquet",
        "tensors": tensor_shards(wildcards),
    }
    if config["train"]["auxiliary_keys"]:
        inputs["catalog"] = "results/catalog.parquet"
        if config["train"]["auxiliary_images"] == "catalog":
            inputs["quality"] = "results/quality/metrics.parquet"
            inputs |= duplicates_input("group")
    return inputs


def multilabel_training_settings():
    """What the multi-label model depends on: the training settings, every enabled cohort's label definition, and
    the views its auxiliary images are drawn from."""
    return {key: config[key] for key in ("seed", "image", "model", "train")} | {
        "cohorts": {
            "pathologies": {p: config["cohorts"]["pathologies"][p] for p in PATHOLOGIES},
            "filters": {"views": config["cohorts"]["filters"].get("views")},
        }
    }


def trained_model(wildcards):
    """The checkpoint a pathology is evaluated with: its own binary model, or the one multi-label model."""
    if MULTILABEL:
        return {
            "model": "results/models/multilabel/model.pt",
            "metadata": "results/models/multilabel/metadata.json",
            "history": "results/models/multilabel/history.csv",
        }
    return {
        "model": f"results/models/{wildcards.pathology}/model.pt",
        "metadata": f"results/models/{wildcards.pathology}/metadata.json",
        "history": f"results/models/{wildcards.pathology}/history.csv",
    }


def model_metadata(wildcards):
    """The metadata.json of the model a pathology is evaluated with: its own, or the multi-label model's."""
    return trained_model(wildcards)["metadata"]


def prediction_models(wildcards):
    """Prediction reads model folders only; per pathology, the network it is scored with (its own, or the
    multi-label one), that network's metadata.json (input convention) and the pathology's threshold.json.
    """
    from types import SimpleNamespace

    chosen = [trained_model(SimpleNamespace(pathology=p)) for p in PATHOLOGIES]
    return {
        "models": [files["model"] for files in chosen],
        "metadata": [files["metadata"] for files in chosen],
        "thresholds": expand("results/models/{pathology}/threshold.json", pathology=PATHOLOGIES),
    }


# --- external evaluation: trained here, tested there (workflow/rules/external.smk) ----------------------------


def external_source(name):
    """The external source `name`, as the main source is checked: the same schema (and its defaults), the same
    checks, bundled vocabularies and label maps found as for source:. An entry is a source: section, or the path of
    a YAML file holding one."""
    import copy

    import yaml

    entry = config["external"][name]
    where = f"external.{name}"
    try:
        if isinstance(entry, str):
            where = f"external.{name} ({entry})"
            if not Path(entry).is_file():
                raise CxrflowError(f"no such file: {entry}")
            entry = yaml.safe_load(Path(entry).read_text(encoding="utf-8"))
            if not isinstance(entry, dict) or not isinstance(entry.get("source"), dict):
                raise CxrflowError("expected a YAML file with a `source:` section")
        checked = copy.deepcopy({**config, "source": entry["source"], "external": {}})
        schema_errors(checked, WORKFLOW_DIR / "workflow/schemas/config.schema.yaml")
        validate(checked, schema="../schemas/config.schema.yaml")  # fills in the source's defaults
        for key in ("vocabulary", "label_map"):
            if checked["source"].get(key):
                checked["source"][key] = bundled_file(checked["source"][key])
        check_config(checked, Path("."))
        if not checked["source"]["check_files"]:
            raise CxrflowError(
                "source.check_files: false (metadata only), but the models score images: point "
                "source.images at them and set check_files: true"
            )
    except CxrflowError as err:
        sys.exit(f"cxrflow config error: {where}: {err}")
    return checked["source"]


EXTERNAL = {name: external_source(name) for name in config["external"]}


def external_targets():
    """Each external source's metrics table, a target of `all`; none when `external:` is empty (the default)."""
    return expand("results/external/{name}/metrics_table.md", name=list(EXTERNAL))


def external_catalog_inputs(wildcards):
    """The external source's tables and label files (as ingest_inputs for the main source), and the label keys."""
    source = EXTERNAL[wildcards.name]
    inputs = {"label_keys": config["labels"]["keys"]}
    for key in ("annotations", "labels", "patients", "label_map", "vocabulary"):
        if source.get(key):
            inputs[key] = source[key]
    return inputs


def external_source_settings(wildcards):
    return EXTERNAL[wildcards.name]


def external_inputs(wildcards):
    """The external catalogs, and the model folders (as the predict rule reads them) with each model's figures on
    the main test split, shown beside the external ones."""
    return prediction_models(wildcards) | {
        "catalog": f"results/external/{wildcards.name}/catalog.parquet",
        "private_catalog": f"results/private/external/{wildcards.name}/catalog.parquet",
        "label_keys": config["labels"]["keys"],
        "internal_metrics": expand("results/metrics/{pathology}.json", pathology=PATHOLOGIES),
    }


def external_settings():
    """What an external evaluation depends on besides its inputs: the main run's cohort rules, image settings, QC
    rules and evaluation settings, and how the test set is drawn (split.test_prevalence)."""
    return {key: config[key] for key in ("seed", "cohorts", "image", "quality", "evaluate")} | {
        "cohorts": config["cohorts"] | {"enabled": PATHOLOGIES},
        "split": {"test_prevalence": config["split"]["test_prevalence"]},
    }
