"""Pseudonymization of patient identifiers: a keyed hash, so that nothing under results/ holds a real id.

The key never lives in the repository. It comes from the environment (CXRFLOW_PSEUDONYM_KEY, or a file named
by CXRFLOW_PSEUDONYM_KEY_FILE). Only the synthetic demo may fall back to a fixed, public demo key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import pandas as pd

from cxrflow.errors import CxrflowError

DEMO_KEY = b"cxrflow-public-demo-key-not-secret"


def pseudonym_key(allow_demo_key: bool) -> bytes:
    """The secret key for patient pseudonyms, from the environment; the demo key only when the config allows it."""
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
        "privacy: no pseudonym key. Set CXRFLOW_PSEUDONYM_KEY or CXRFLOW_PSEUDONYM_KEY_FILE "
        "(a file outside the repository), or set privacy.demo_key: true for synthetic data only."
    )


def pseudonymize(ids: pd.Series, key: bytes) -> pd.Series:
    """HMAC-SHA256 of each id, 16 hex digits. Each distinct id is hashed once; missing stays missing."""
    codes, uniques = pd.factorize(ids.astype("string"), use_na_sentinel=True)
    keyed = hmac.new(key, digestmod=hashlib.sha256)  # the key's inner and outer state, computed once

    def digest(value: str) -> str:
        mac = keyed.copy()
        mac.update(value.encode())
        return mac.hexdigest()[:16]

    # tolist(): iterating an Arrow-backed Index costs about 1 us per item, more than the hash itself.
    hashed = [digest(str(u)) for u in uniques.tolist()]
    out = pd.array(hashed, dtype="string").take(codes, allow_fill=True)
    return pd.Series(out, index=ids.index, name=ids.name)
