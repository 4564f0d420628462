"""The ingest benchmark's quick mode runs end to end, so that the script keeps working. No timing is asserted."""

from conftest import ROOT, run_benchmark


def test_ingest_benchmark_quick_mode(tmp_path):
    out = run_benchmark("ingest", "--quick", "--workdir", str(tmp_path), cwd=ROOT).stdout
    assert "archive: 20,000 rows" in out
    assert "rows/s; peak RSS" in out and "naive per-row regex loop" in out
    assert "kept 19,994, left out 6" in out  # the dirt the archive carries is caught by the ledger
    assert (tmp_path / "results" / "catalog.parquet").is_file() and (tmp_path / "results" / "ingest" / "ledger.csv").is_file()
    assert "DICOM folder: 600 files. 1 process" in out and "worker processes" in out
    assert "json: " in out
