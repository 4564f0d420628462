"""The ingest benchmark's quick mode runs end to end, so that the script keeps working. No timing is asserted."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ingest_benchmark_quick_mode(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ingest.py"), "--quick", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "archive: 20,000 rows" in out
    assert "rows/s; peak RSS" in out and "naive per-row regex loop" in out
    assert "kept 19,994, left out 6" in out  # the dirt the archive carries is caught by the ledger
    assert (tmp_path / "results" / "catalog.parquet").is_file() and (tmp_path / "results" / "ingest" / "ledger.csv").is_file()
    assert "json: " in out
