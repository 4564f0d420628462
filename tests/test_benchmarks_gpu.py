"""benchmarks/gpu_train.py keeps working: its --quick mode runs on the CPU and prints every figure it promises, in both
modes, and it imports nothing that a bare GPU node lacks.

Timings are printed, never asserted: this machine is not the GPU the goals are about.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

# What a bare GPU node has (issue 17, item 3); their own dependencies come with them.
GPU_NODE = ["torch", "timm", "numpy", "pandas", "pyarrow", "scikit-learn", "scikit-image", "scipy", "pillow", "pyyaml",
            "matplotlib"]

# Run in the benchmark's process after it finished. (1) The module-level imports of the code that ran (the benchmark
# and every cxrflow module it loaded; a function's import of another cxrflow module shows up as that module) are
# only the node's packages and what they require (non-extra requirements, recursively). (2) None of the packages a
# bare node lacks and the pipeline uses elsewhere was imported at all. The packages' own optional imports (numpy.f2py
# tries charset_normalizer) are theirs, not ours.
PROVENANCE = """
import ast, importlib.metadata as md, json, re, sys
def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()
allowed, todo = set(), [norm(n) for n in {GPU_NODE!r}]
while todo:
    name = todo.pop()
    if name in allowed:
        continue
    allowed.add(name)
    try:
        requires = md.requires(name) or []
    except md.PackageNotFoundError:
        continue
    todo += [norm(re.match(r"[A-Za-z0-9_.-]+", r).group()) for r in requires if "extra ==" not in r]
owners = md.packages_distributions()
files = [{BENCHMARK!r}] + [m.__file__ for n, m in list(sys.modules.items()) if n.split(".")[0] == "cxrflow"]
def module_level(nodes):
    for node in nodes:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        yield node
        yield from module_level(ast.iter_child_nodes(node))
imported = set()
for path in files:
    for node in module_level(ast.parse(open(path).read()).body):
        if isinstance(node, ast.Import):
            imported |= {{a.name.split(".")[0] for a in node.names}}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            imported.add(node.module.split(".")[0])
foreign = sorted(f"{{m}} ({{d}})" for m in imported for d in owners.get(m, []) if m != "cxrflow" and norm(d) not in allowed)
print("cxrflow modules loaded:", len(files) - 1, "; foreign imports:", json.dumps(foreign))
absent_on_node = ["monai", "pydicom", "pylibjpeg", "snakemake", "openpyxl", "jsonschema"]
print("imported that a bare node lacks:", sorted(m for m in absent_on_node if m in sys.modules))
"""


@pytest.mark.parametrize("mode", ["binary", "multilabel"])
def test_gpu_train_benchmark_quick_mode_runs_and_reports_ratios(tmp_path, mode):
    benchmark = str(ROOT / "benchmarks" / "gpu_train.py")
    runner = (f"import runpy, sys; sys.argv = ['gpu_train.py', '--quick', '--mode', {mode!r}, '--json', "
              f"{str(tmp_path / 'r.json')!r}]; runpy.run_path({benchmark!r}, run_name='__main__')"
              + PROVENANCE.format(GPU_NODE=GPU_NODE, BENCHMARK=benchmark))
    # One thread: on a shared CPU, torch's default thread pool spins against the other processes (0.1 images/s).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", runner], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    out = result.stdout
    for batch in (2, 4):
        assert f"train  batch    {batch}  fp32 NCHW" in out and f"train  batch    {batch}  AMP + channels_last" in out
        assert f"ratio  batch    {batch}  AMP + channels_last / fp32 NCHW = " in out
    assert "loader cache_read" in out and "loader batch_pipeline" in out and "loader loader" in out
    figures = json.loads((tmp_path / "r.json").read_text())
    assert figures["model"] == "efficientnet_b0" and figures["size"] == 32 and figures["mode"] == mode
    rates = [r for m in figures["train_images_per_s"].values() for r in m.values()]
    assert len(rates) == 4 and all(r > 0 for r in rates)
    assert all(r > 0 for r in figures["loader_images_per_s"].values())
    trained = "cxrflow.train.train" if mode == "binary" else "cxrflow.multilabel.train_multilabel (9 outputs)"
    assert f"smoke  {trained}: 2 epochs" in out and "on cpu (cpu), AMP float32" in out
    assert figures["smoke_train"]["epochs_run"] == 2 and figures["smoke_train"]["effective_batch"] == 4
    assert figures["outputs"] == (1 if mode == "binary" else 9)
    # Its code imports nothing but the GPU node's packages: no MONAI, no DICOM readers, no Snakemake.
    assert "; foreign imports: []" in out and "imported that a bare node lacks: []" in out
