"""benchmarks/gpu_train.py keeps working: its --quick mode runs on the CPU and prints every figure it promises.

Timings are printed, never asserted: this machine is not the GPU the goals are about.
"""

import json
import subprocess
import sys

from conftest import ROOT


def test_gpu_train_benchmark_quick_mode_runs_and_reports_ratios(tmp_path):
    # Run as a script, then report whether MONAI was imported: the GPU machine has no MONAI.
    runner = (f"import runpy, sys; sys.argv = ['gpu_train.py', '--quick', '--json', {str(tmp_path / 'r.json')!r}]; "
              f"runpy.run_path({str(ROOT / 'benchmarks' / 'gpu_train.py')!r}, run_name='__main__'); "
              "print('monai imported:', 'monai' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", runner], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    out = result.stdout
    for batch in (2, 4):
        assert f"train  batch    {batch}  fp32 NCHW" in out and f"train  batch    {batch}  AMP + channels_last" in out
        assert f"ratio  batch    {batch}  AMP + channels_last / fp32 NCHW = " in out
    assert "loader cache_read" in out and "loader batch_pipeline" in out and "loader loader" in out
    figures = json.loads((tmp_path / "r.json").read_text())
    assert figures["model"] == "efficientnet_b0" and figures["size"] == 32
    rates = [r for mode in figures["train_images_per_s"].values() for r in mode.values()]
    assert len(rates) == 4 and all(r > 0 for r in rates)
    assert all(r > 0 for r in figures["loader_images_per_s"].values())
    assert "smoke  cxrflow.train.train: 2 epochs" in out and "on cpu (cpu), AMP float32" in out
    assert figures["smoke_train"]["epochs_run"] == 2 and figures["smoke_train"]["effective_batch"] == 4
    assert "monai imported: False" in out
