"""Checks of the config that the JSON schema cannot express (they need the label keys or the file system)."""

from __future__ import annotations

from pathlib import Path

import yaml

from cxrflow.errors import CxrflowError
from cxrflow.io import YAML_LOADER
from cxrflow.labels import load_keys


def schema_errors(config: dict, schema_file: Path) -> None:
    """Validate against the JSON schema; the first error becomes one line naming the key (no 40-line dump)."""
    from jsonschema import Draft202012Validator

    schema = yaml.load(Path(schema_file).read_text(encoding="utf-8"), Loader=YAML_LOADER)
    errors = sorted(Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if not errors:
        return
    error = errors[0]
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        raise CxrflowError(f"config {key}: {error.message}; allowed keys: {allowed}")
    if error.validator == "enum":
        raise CxrflowError(f"config {key}: {error.instance!r} is not allowed; choose one of {error.validator_value}")
    raise CxrflowError(f"config {key}: {error.message}")


def check_config(config: dict, base: Path) -> None:
    keys_file = base / config["labels"]["keys"]
    if not keys_file.is_file():
        raise CxrflowError(f"labels.keys: no such file: {keys_file}")
    keys = set(load_keys(keys_file))
    cohorts = config["cohorts"]
    unknown = [k for k in cohorts.get("exclusions", []) if k not in keys]
    if unknown:
        raise CxrflowError(f"cohorts.exclusions: unknown label key(s) {unknown}; see {keys_file}")
    for name, entry in cohorts["pathologies"].items():
        for field in ("positive", "exclude_add", "exclude_remove"):
            unknown = [k for k in entry.get(field, []) if k not in keys]
            if unknown:
                raise CxrflowError(f"cohorts.pathologies.{name}.{field}: unknown label key(s) {unknown}; see {keys_file}")
    split = config["split"]
    if split["val"] + split["test"] >= 0.9:
        raise CxrflowError(f"split: val ({split['val']}) + test ({split['test']}) leaves too little for training")
    source = config["source"]
    if source["format"] == "freetext":
        for key in ("vocabulary", "columns"):
            if key not in source:
                raise CxrflowError(f"source.{key}: required for source.format freetext")
        for key in ("image_id", "text"):
            if key not in source["columns"]:
                raise CxrflowError(f"source.columns.{key}: required for source.format freetext")
    if source["format"] in {"nih", "padchest"} and "label_map" not in source:
        raise CxrflowError(f"source.label_map: required for source.format {source['format']}")
