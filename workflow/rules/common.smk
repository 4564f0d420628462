# Everything the rules look up: config validation, constants derived from config, input functions.
import os
import sys
from pathlib import Path

from snakemake.utils import validate

# The rules' scripts import the cxrflow package from src/ (also inside conda envs and cluster jobs,
# which inherit this environment).
SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)
os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")])))

from cxrflow.cohorts import enabled_pathologies
from cxrflow.config_checks import check_config, schema_errors
from cxrflow.errors import CxrflowError

try:
    # A config mistake is the user's: one line naming the key, no traceback.
    schema_errors(config, Path(workflow.basedir) / "workflow/schemas/config.schema.yaml")
    validate(config, schema="../schemas/config.schema.yaml")  # also fills in the defaults
    check_config(config, Path(workflow.basedir))
    PATHOLOGIES = enabled_pathologies(config["cohorts"])
except CxrflowError as err:
    sys.exit(f"cxrflow config error: {err}")

SHARDS = [f"{i:04d}" for i in range(config["preprocess"]["shards"])]


wildcard_constraints:
    pathology="|".join(PATHOLOGIES),
    shard=r"\d{4}",


def preprocess_shards(wildcards):
    return {
        "tables": expand("results/preprocess/shards/{shard}.parquet", shard=SHARDS),
        "tensors": expand("results/tensors/shard_{shard}.npy", shard=SHARDS),
    }


def tensor_shards(wildcards):
    return expand("results/tensors/shard_{shard}.npy", shard=SHARDS)


def cohort_inputs(wildcards):
    """The quality table only when the cohorts require QC (metadata-only runs have no images to check)."""
    inputs = {"catalog": "results/catalog.parquet", "label_keys": config["labels"]["keys"]}
    if config["cohorts"]["filters"].get("require_qc_pass", True):
        inputs["quality"] = "results/quality/metrics.parquet"
    return inputs


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
    """The source's tables and label files, so that editing one reruns ingest. A dicom source may have no table."""
    source = config["source"]
    inputs = {"label_keys": config["labels"]["keys"]}
    for key in ("annotations", "labels", "patients", "label_map", "vocabulary"):
        if source.get(key):
            inputs[key] = source[key]
    return inputs


def evaluation_settings(wildcards):
    """What an evaluation depends on: the model's settings plus the evaluation's own."""
    return training_settings(wildcards) | {"evaluate": config["evaluate"]}
