"""Checks of the config that the JSON schema cannot express (they need the label keys or the file system)."""

from __future__ import annotations

from pathlib import Path

import yaml

from cxrflow.errors import CxrflowError


def check_config(config: dict, base: Path) -> None:
    keys_file = base / config["labels"]["keys"]
    if not keys_file.is_file():
        raise CxrflowError(f"labels.keys: no such file: {keys_file}")
    keys = set(yaml.safe_load(keys_file.read_text(encoding="utf-8"))["keys"])
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
