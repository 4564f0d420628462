"""Privacy: no patient identifier, and no DICOM identifying attribute, in anything the workflow writes."""

import hashlib
import re

import pandas as pd
import pydicom
import pytest

from conftest import snakemake_tiny as snakemake
from cxrflow.privacy import pseudonymize

pytestmark = pytest.mark.e2e


def test_html_report_and_no_identifiers_in_any_output(tiny_run):
    snakemake(tiny_run, "--report", "results/report.html")
    assert (tiny_run / "results" / "report.html").stat().st_size > 50_000
    planted = set()
    for dicom in (tiny_run / "resources" / "synthetic" / "images").glob("*.dcm"):
        ds = pydicom.dcmread(dicom, stop_before_pixels=True)
        for tag in ["PatientName", "PatientBirthDate", "InstitutionName", "ReferringPhysicianName", "AccessionNumber", "PatientID"]:
            value = str(ds.get(tag, "") or "")
            if len(value) >= 6:
                planted.add(value)
    planted |= {str(p) for p in pd.read_csv(tiny_run / "resources" / "synthetic" / "annotations.csv")["patient_id"].unique() if len(str(p)) >= 6}
    assert len(planted) > 20
    pattern = re.compile("|".join(re.escape(p) for p in sorted(planted, key=len, reverse=True)))
    for path in (tiny_run / "results").rglob("*"):
        if not path.is_file():
            continue
        text = pd.read_parquet(path).to_csv() if path.suffix == ".parquet" else path.read_bytes().decode("utf-8", "replace")
        match = pattern.search(text)
        assert match is None, f"{path.relative_to(tiny_run)} contains the identifier {match.group(0)!r}"


def test_pseudonyms_are_a_keyed_hash_of_the_real_id():
    ids = pd.Series(["P1", "P1", "P2", None])
    out = pseudonymize(ids, b"secret")
    assert out[0] == out[1] == hashlib.blake2b(b"P1", key=b"secret", digest_size=8).hexdigest()
    assert out[2] != out[0] and pd.isna(out[3])
    assert (pseudonymize(ids, b"other")[:3] != out[:3]).all(), "another key gives other pseudonyms"


def test_a_real_archive_needs_a_key_from_the_environment(monkeypatch):
    from cxrflow.errors import CxrflowError
    from cxrflow.privacy import DEMO_KEY, pseudonym_key

    monkeypatch.delenv("CXRFLOW_PSEUDONYM_KEY", raising=False)
    monkeypatch.delenv("CXRFLOW_PSEUDONYM_KEY_FILE", raising=False)
    with pytest.raises(CxrflowError, match="CXRFLOW_PSEUDONYM_KEY"):
        pseudonym_key(allow_demo_key=False)
    assert pseudonym_key(allow_demo_key=True) == DEMO_KEY


def test_wildcards_cannot_escape_results(tiny_run):
    # A pathology name from outside the config (here a path) matches no rule: wildcard_constraints come from config.
    result = snakemake(tiny_run, "-n", "results/metrics/../../escape.json", check=False)
    assert result.returncode != 0
    assert not (tiny_run.parent / "escape.json").exists()
