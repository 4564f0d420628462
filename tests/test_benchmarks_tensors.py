"""The tensors benchmark keeps working: its --quick mode runs end to end on real DICOM files (no timing asserts)."""

import json

from conftest import run_benchmark


def test_tensors_benchmark_quick_mode_runs(tmp_path):
    result = run_benchmark("tensors", "--quick", "--json", str(tmp_path / "figures.json"), cwd=tmp_path)
    assert "cxrflow / monai, uncompressed:" in result.stdout and "epoch from the cache vs monai" in result.stdout
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert {"uncompressed", "jpeg2000_lossless", "jpegls_lossless"} <= set(figures["formats"])
    for name, row in figures["formats"].items():
        assert row["qc_ok"] == row["images"] > 0, name  # every benchmark image decodes and passes through QC
        for what in ("decode", "cxrflow", "monai"):
            assert row[f"{what}_ms"] > 0, (name, what)
        assert 0.2 < row["qc_p50_median"] < 0.8, "rendered radiographs have mid-grey medians, as real ones do"
    assert figures["epoch"]["images"] == figures["formats"]["uncompressed"]["images"]
    assert figures["epoch"]["read"]["us_per_image"] > 0 and figures["epoch_vs_monai"] > 0
