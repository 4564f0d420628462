"""The scale benchmark keeps working: --quick runs the real workflow at two tiny sizes and prints, per rule with a
`benchmark:` file, times and peak RSS with finite growth exponents, the paper-scale extrapolation and a dry-run time.
No timing goal is asserted: the figures depend on the machine and on what else runs on it."""

import importlib.util
import json
import math
import re
import subprocess
import sys

import pytest
from conftest import ROOT

# Two real workflow runs (about 40 CPU-seconds each): the suite's slowest kind of test, marked as such.
pytestmark = pytest.mark.e2e


def load_scale():
    spec = importlib.util.spec_from_file_location("scale_benchmark", ROOT / "benchmarks" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scale_benchmark_quick_mode_runs(tmp_path):
    scale = load_scale()
    with_benchmark = set(scale.benchmark_patterns(scale.rule_blocks(ROOT)))
    assert {"train", "evaluate"} <= with_benchmark

    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--quick", "--json", str(tmp_path / "scale.json"),
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=1200, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(result.stdout)
    figures = json.loads((tmp_path / "scale.json").read_text())
    entry = figures["checkouts"]["code"]
    runs = entry["runs"]
    # Every rule that writes a benchmark file and ran (Snakemake's job stats), the tensor shards among them.
    expected = with_benchmark & set(runs[0]["planned"])
    assert {"train", "evaluate"} <= expected and any("shard" in name for name in expected), expected
    assert [run["images"] for run in runs] == sorted(run["images"] for run in runs) and len(runs) == 2
    assert runs[0]["images"] < runs[1]["images"]
    for run in runs:
        assert run["cache_bytes"] > 0 and run["cached_images"] > 0
        for name in expected:
            row = run["rules"].get(name)
            assert row is not None and row["source"] == "benchmark", (run["images"], name)
            assert row["s"] > 0 and row["max_rss"] > 0 and row["jobs"] >= 1, (run["images"], name, row)
    for name in expected:
        for key in ("s", "max_rss"):
            exponent = entry["exponents"][name][key]
            assert exponent is not None and math.isfinite(exponent), (name, key)
        # The printed table: the rule's line holds "time / RSS" for both sizes and its exponents.
        line = re.search(rf"^{name}\s+\S+\s+(.*)$", result.stdout, re.M)
        assert line, name
        cells = re.findall(r"(\d+\.\d) / (\d+)", line.group(1))
        assert len(cells) == 2 and all(float(s) > 0 and int(rss) > 0 for s, rss in cells), line.group(0)

    paper = entry["paper"]
    assert 0.2 < figures["share"] < 0.5  # PadChest's women's frontal share, or the 1/3 fallback
    assert paper["cache_gb"] > 0 and paper["decode_cpu_hours"] > 0
    assert expected <= set(paper["rules"])
    assert "the paper's archive on paper" in result.stdout

    plan = figures["plan"]
    assert plan["seconds"] > 0 and plan["shard_jobs"] == plan["shards"] == 16
    assert re.search(r"== dry run: snakemake -n on 20,000 annotation rows, 16 shards: \d+\.\d s", result.stdout)
