"""Privacy: pseudonyms for patients and images, and the line between private and shareable outputs.

Pseudonyms are a keyed hash (keyed BLAKE2b, a MAC), so that nothing shareable holds a real id. The key never
lives in the repository: it comes from the environment (CXRFLOW_PSEUDONYM_KEY, or a file named by
CXRFLOW_PSEUDONYM_KEY_FILE). Only the built-in synthetic archive may fall back to the fixed, public demo key,
whatever the config says: the check looks at the source, not at a switch an overlay could inherit.

Outputs come in two kinds (README, "Privacy"):
- ``results/private/``: what holds notes, source paths, original ids or exact dates. Never to leave the hospital.
- everything else under ``results/``: shareable. The shareable catalog keeps an allow-list of columns (fail closed:
  a column an adapter adds is private until it is listed here), image ids are keyed pseudonyms, dates are reduced
  to the year or shifted per patient by a keyed offset, and ages above 89 are pooled at 90 (as HIPAA's Safe
  Harbor asks).
"""

from __future__ import annotations

import hashlib

import pandas as pd

# Whether a source may use the demo key is decided while planning the workflow too: it lives in cxrflow_plan.
from cxrflow_plan import DEMO_KEY, KEY_VARIABLES, is_builtin_synthetic, mac_key, pseudonym_key, source_key  # noqa: F401

# Catalog columns that carry no identifier, besides the label keys. Everything else stays private.
# `pixel_id` is a row number (the image's position among the rows ingest keeps, results/private/images.parquet),
# not an identifier: it names no patient, file or date, and only the holder of the private source table can tie it
# to one, as only the key holder can a pseudonym. It keys the pixel branch (shards, tensors), so that neither a
# label edit nor a new pseudonym key re-decodes an image.
SHAREABLE_COLUMNS = ("image_id", "pixel_id", "patient_id", "sex", "age", "view", "study_year", "study_date_shifted",
                     "quality_tag", "follow_up", "manufacturer", "site")
MAX_AGE = 90
# Domain separation: an image id and a patient id that happen to be the same string get unrelated pseudonyms.
_IMAGE_DOMAIN = "image\x00"


def pseudonymize(ids: pd.Series, key: bytes) -> pd.Series:
    """Keyed BLAKE2b of each id (BLAKE2's built-in MAC mode), 16 hex digits. Each distinct id is hashed once;
    missing stays missing. One C call per id: a 2M-row archive's patients take well under a second."""
    codes, uniques = pd.factorize(ids.astype("string"), use_na_sentinel=True)
    mac, blake2b = mac_key(key), hashlib.blake2b
    # tolist(): iterating an Arrow-backed Index costs about 1 us per item, more than the hash itself.
    hashed = [blake2b(u.encode(), key=mac, digest_size=8).hexdigest() for u in map(str, uniques.tolist())]
    out = pd.array(hashed, dtype="string").take(codes, allow_fill=True)
    return pd.Series(out, index=ids.index, name=ids.name)


def pseudonymize_images(ids: pd.Series, key: bytes) -> pd.Series:
    """Image pseudonyms: ``img-`` and a keyed hash of the original id, in their own domain (see _IMAGE_DOMAIN)."""
    hashed = pseudonymize(_IMAGE_DOMAIN + ids.astype("string"), key)
    return ("img-" + hashed).rename(ids.name)


def pseudonym_of(patient_id: str, key: bytes) -> str:
    """The pseudonym of one patient id, e.g. to find a patient's rows in the results."""
    return pseudonymize(pd.Series([patient_id]), key).iloc[0]


def image_pseudonym_of(image_id: str, key: bytes) -> str:
    """The pseudonym of one original image id, as it appears in splits, predictions and the shareable ledger."""
    return pseudonymize_images(pd.Series([image_id]), key).iloc[0]


def date_offsets(patient_ids: pd.Series, key: bytes, max_days: int) -> pd.Series:
    """A keyed offset per patient, uniform in [-max_days, max_days] days: intervals within a patient survive."""
    digests = pseudonymize("date\x00" + patient_ids.astype("string"), key)
    values = digests.map(lambda h: int(h, 16) if isinstance(h, str) else None, na_action="ignore")
    days = values.astype("Float64") % (2 * max_days + 1) - max_days
    return pd.to_timedelta(days.astype("float64"), unit="D")


def private_catalog(catalog: pd.DataFrame, key: bytes) -> pd.DataFrame:
    """The full catalog with image ids replaced by their pseudonyms and the original kept as ``source_id``."""
    out = catalog.copy()
    out.insert(1, "source_id", catalog["image_id"].astype("string"))
    out["image_id"] = pseudonymize_images(catalog["image_id"], key)
    return out


def shareable_catalog(private: pd.DataFrame, keys: list[str], key: bytes, settings: dict) -> pd.DataFrame:
    """The catalog without notes, paths, original ids or exact dates (``privacy.dates``: ``year`` or ``shift``)."""
    out = private.copy()
    if "study_date" in out:
        dates = pd.to_datetime(out["study_date"])
        if settings["dates"] == "shift":
            out["study_date_shifted"] = (dates + date_offsets(out["patient_id"], key, settings["date_shift_days"])
                                         ).dt.normalize().astype("datetime64[s]")
        else:
            out["study_year"] = dates.dt.year.astype("Int16")
    if "age" in out:
        out["age"] = out["age"].clip(upper=MAX_AGE).astype(out["age"].dtype)
    columns = [c for c in SHAREABLE_COLUMNS if c in out.columns] + [k for k in keys if k in out.columns]
    return out[columns].reset_index(drop=True)


def split_ledger(ledger: pd.DataFrame, key: bytes) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(shareable, private): the shareable ledger names each item by its image pseudonym and keeps the reason;
    the private one adds the original item and the detail (file paths, row numbers, values)."""
    pseudonym = pseudonymize_images(ledger["item"].astype("string"), key)
    shareable = pd.DataFrame({"stage": ledger["stage"], "item": pseudonym, "reason": ledger["reason"]})
    private = pd.DataFrame({"stage": ledger["stage"], "source": ledger["source"], "item": pseudonym,
                            "source_item": ledger["item"], "reason": ledger["reason"], "detail": ledger["detail"]})
    return shareable.reset_index(drop=True), private.reset_index(drop=True)
