"""What Snakemake needs to plan a run, with the standard library, PyYAML and jsonschema only (all three come with
Snakemake): the config checks, the enabled cohorts, the label keys, and whether the source may use the demo key.

`workflow/rules/common.smk` imports this module while Snakemake builds the DAG; the `cxrflow` package, which
needs numpy, pandas and torch, is imported only inside the jobs. So the Snakemake host needs nothing but
Snakemake (`--sdm conda`), and the package imports these decisions from here, so that each is made in one place.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import yaml

YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

DEMO_KEY = b"cxrflow-public-demo-key-not-secret"
KEY_VARIABLES = ("CXRFLOW_PSEUDONYM_KEY", "CXRFLOW_PSEUDONYM_KEY_FILE")
# Where the synthesize rule writes the built-in archive; the only source the demo key may pseudonymize.
SYNTHETIC_ANNOTATIONS = Path("resources/synthetic/annotations.csv")
SYNTHETIC_TRUTH = Path("resources/synthetic/truth.csv")


class CxrflowError(Exception):
    """A user-facing error. Its message names the file, row or key at fault; the CLI prints it without a traceback."""


def load_keys(path) -> list[str]:
    """Return the canonical label keys of ``keys.yaml``, in file order."""
    try:
        data = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=YAML_LOADER)
    except FileNotFoundError:
        raise CxrflowError(f"{path}: no such file") from None
    except yaml.YAMLError as err:
        raise CxrflowError(f"{path}: not valid YAML ({err})") from None
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, dict) or not keys:
        raise CxrflowError(f"{path}: expected a non-empty mapping under 'keys:'")
    return [str(key) for key in keys]


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
    """Checks of the config that the JSON schema cannot express (they need the label keys or the file system)."""
    keys_file = Path(base) / config["labels"]["keys"]
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


def enabled_pathologies(cohorts_cfg: dict) -> list[str]:
    """The cohorts that run: `cohorts.enabled` when given (an overlay config cannot delete a pathology that the
    base config defines, but it can leave it out), else every configured pathology; sorted."""
    configured = cohorts_cfg["pathologies"]
    enabled = cohorts_cfg.get("enabled")
    if enabled is None:
        return sorted(configured)
    unknown = [p for p in enabled if p not in configured]
    if unknown:
        raise CxrflowError(f"cohorts.enabled: {unknown} not in cohorts.pathologies; configured: {sorted(configured)}")
    if not enabled:
        raise CxrflowError("cohorts.enabled: the list is empty; name at least one pathology, or remove the key to run all")
    return sorted(set(enabled))


def is_builtin_synthetic(source: dict, base=".", written: bool = True) -> bool:
    """Whether the source is the archive the synthesize rule writes: its annotations, and once ``written``, the
    truth table that only the generator writes beside them. Planning the workflow (``written=False``) looks at the
    path alone, since the archive is not there yet."""
    base = Path(base)
    annotations = source.get("annotations")
    if source.get("format") != "freetext" or not annotations:
        return False
    try:
        same = (base / annotations).resolve() == (base / SYNTHETIC_ANNOTATIONS).resolve()
    except OSError:
        return False
    return same and (not written or (base / SYNTHETIC_TRUTH).is_file())


def pseudonym_key(allow_demo_key: bool) -> bytes:
    """The secret key for pseudonyms, from the environment; the demo key only for the built-in synthetic archive."""
    if os.environ.get("CXRFLOW_PSEUDONYM_KEY"):
        return os.environ["CXRFLOW_PSEUDONYM_KEY"].encode()
    key_file = os.environ.get("CXRFLOW_PSEUDONYM_KEY_FILE")
    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise CxrflowError(f"CXRFLOW_PSEUDONYM_KEY_FILE: no such file: {path}")
        key = path.read_bytes().strip()
        if not key:
            raise CxrflowError(f"CXRFLOW_PSEUDONYM_KEY_FILE: {path} is empty")
        return key
    if allow_demo_key:
        return DEMO_KEY
    raise CxrflowError(
        "privacy: no pseudonym key for a real archive. Set CXRFLOW_PSEUDONYM_KEY, or CXRFLOW_PSEUDONYM_KEY_FILE "
        "naming a file outside the repository (the public demo key serves only the built-in synthetic archive)")


def mac_key(key: bytes) -> bytes:
    """The key as BLAKE2b's MAC mode takes it (at most 64 bytes)."""
    return key if len(key) <= 64 else hashlib.sha256(key).digest()


def key_fingerprint(key: bytes) -> str:
    """A keyed hash of a fixed text: it changes with the key and tells no more about it than any pseudonym does.
    The ingest rule takes it as a parameter, so that Snakemake reruns the label branch (and no decode) when the
    key changes."""
    return hashlib.blake2b(b"key-fingerprint\x00", key=mac_key(key), digest_size=8).hexdigest()


def source_key(source: dict, base=".", written: bool = True) -> bytes:
    """The key for this source: from the environment, or the demo key for the built-in synthetic archive only."""
    return pseudonym_key(allow_demo_key=is_builtin_synthetic(source, base, written))
