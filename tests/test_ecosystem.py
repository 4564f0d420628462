"""cxrflow as a Snakemake user meets it: deployed as a module from another directory, its DAG built by Snakemake
alone (`--sdm conda`), each rule's conda environment listing what its code imports, and the HTML report opening
on the metrics table and the ROC figure in a real browser."""

import ast
import csv
import functools
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote_to_bytes

import pytest
import yaml

from conftest import ROOT, SNAKEMAKE, copy_repo, snakemake_tiny

RULES = ROOT / "workflow" / "rules"
SRC = ROOT / "src"
FIRST_PARTY = {"cxrflow", "cxrflow_plan"}

# Made unimportable for the workflow's own code (Snakefile, rules, and whatever they import): the DAG must build
# with Snakemake alone. Snakemake's plugins keep their own dependencies (the SLURM plugin imports pandas).
BLOCKER = '''
import builtins
import os
import sys

BLOCKED = {"numpy", "pandas", "torch", "cxrflow"}
ROOTS = tuple(filter(None, os.environ.get("BLOCK_IMPORTS_UNDER", "").split(os.pathsep)))
_import = builtins.__import__


def _from_workflow():
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(ROOTS):
            return True
        frame = frame.f_back
    return False


def _guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and name.partition(".")[0] in BLOCKED and _from_workflow():
        raise ModuleNotFoundError(f"No module named {name!r} (blocked: the DAG must build with Snakemake alone)")
    return _import(name, globals, locals, fromlist, level)


builtins.__import__ = _guarded_import
'''


def blocked_env(tmp_path: Path, *roots: Path) -> dict:
    """The environment for a Snakemake whose workflow code (files under roots) cannot import the blocked modules."""
    folder = tmp_path / "blocker"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCKER)
    return {**os.environ, "PYTHONPATH": str(folder), "BLOCK_IMPORTS_UNDER": os.pathsep.join(map(str, roots))}


def test_the_blocker_blocks(tmp_path):
    """The check below can fail: a Snakefile that imports numpy while the DAG is built is stopped."""
    (tmp_path / "Snakefile").write_text("import numpy\n\n\nrule all:\n    output:\n        'x'\n    shell:\n        'touch x'\n")
    result = subprocess.run([SNAKEMAKE, "-n", "--cores", "1"], cwd=tmp_path, capture_output=True, text=True,
                            env=blocked_env(tmp_path, tmp_path / "Snakefile"), timeout=300)
    assert result.returncode != 0
    assert "blocked: the DAG must build with Snakemake alone" in result.stdout + result.stderr


def test_dag_builds_with_snakemake_alone(tmp_path):
    """`snakemake -n` with numpy, pandas, torch and the cxrflow package unimportable by the workflow's code."""
    workdir = copy_repo(tmp_path / "workflow")
    env = blocked_env(tmp_path, workdir / "Snakefile", workdir / "workflow", workdir / "src")
    result = subprocess.run([SNAKEMAKE, "-n", "--cores", "2", "--configfile", "config/tiny.yaml"], cwd=workdir,
                            capture_output=True, text=True, env=env, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    total = re.search(r"^total\s+(\d+)$", output, flags=re.M)
    assert total and int(total.group(1)) > 9, output[-3000:]
    print(f"blocked-import dry run: {total.group(0)}")


# --- module deployment ------------------------------------------------------------------------------------------

MODULE_SNAKEFILE = """\
configfile: "config/config.yaml"


module cxrflow:
    snakefile:
        "{snakefile}"
    config:
        config


use rule * from cxrflow
"""


@pytest.mark.e2e
def test_runs_as_a_module_from_another_directory(tmp_path):
    """A user's project directory holding only its Snakefile and config: the bundled schema, label keys and
    vocabulary come from the workflow, the synthetic archive and the results go to the user's directory. The
    Snakemake host (not the jobs) runs with numpy, pandas, torch and cxrflow blocked."""
    workflow = copy_repo(tmp_path / "cxrflow")
    project = tmp_path / "project"
    (project / "config").mkdir(parents=True)
    (project / "Snakefile").write_text(MODULE_SNAKEFILE.format(snakefile=workflow / "Snakefile"))
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    for section, values in yaml.safe_load((ROOT / "config" / "tiny.yaml").read_text()).items():
        config[section] = {**config.get(section, {}), **values}
    # Two cohorts keep the added test time small; every rule of `rule all` still runs.
    config["cohorts"]["enabled"] = ["enlarged_heart", "scoliosis"]
    (project / "config" / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    assert not (project / config["source"]["vocabulary"]).exists()  # the bundled one must be found

    env = blocked_env(tmp_path, project / "Snakefile", workflow / "Snakefile", workflow / "workflow" / "rules")
    result = subprocess.run([SNAKEMAKE, "--cores", "2"], cwd=project, capture_output=True, text=True, env=env,
                            timeout=1200)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    table = (project / "results" / "metrics_table.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in table[1:]] == ["enlarged_heart", "scoliosis"]
    assert (project / "resources" / "synthetic" / "annotations.csv").is_file()
    assert not (workflow / "results").exists() and not (workflow / "resources" / "synthetic").exists()
    print(f"module run in {project}:\n" + "\n".join(table))


# --- conda environments ----------------------------------------------------------------------------------------

# Distributions a library loads by name at run time, which no import statement of ours shows.
RUNTIME_BACKENDS = {
    # pydicom's decoders for compressed transfer syntaxes; without them such files become `no_decoder` rows
    "pydicom": ["pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "pyjpegls"],
    "pymorphy3": ["pymorphy3-dicts-ru"],  # the Russian dictionary
}
# pandas reads and writes these formats through an engine it imports itself.
PANDAS_ENGINES = {r"\b(read_parquet|to_parquet)\b": "pyarrow", r"\b(read_excel|to_excel|ExcelWriter)\b": "openpyxl"}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s#]+)", line)
        if match:
            pins[normalized(match.group(1))] = match.group(2)
    return pins


def module_file(name: str) -> Path | None:
    path = SRC.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_names(nodes) -> set[str]:
    names = set()
    for node in nodes:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                names |= {alias.name for alias in sub.names}
            elif isinstance(sub, ast.ImportFrom) and sub.level == 0 and sub.module:
                names.add(sub.module)
                # `from cxrflow import errors` imports a module too
                names |= {f"{sub.module}.{alias.name}" for alias in sub.names if module_file(f"{sub.module}.{alias.name}")}
    return names


def pipeline_entry_points(tree: ast.Module) -> set[str]:
    return {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "cxrflow.pipeline"
            for alias in node.names}


def reached_code(script: Path) -> tuple[set[str], list[str]]:
    """Third-party import names and first-party sources reached from a rule's script: the script, the
    `cxrflow.pipeline` functions it calls (with the pipeline's module-level imports), then every cxrflow module
    those import, transitively (all of each module's imports, including those inside functions)."""
    tree = ast.parse(script.read_text())
    names = imported_names([tree])
    sources = [script.read_text()]
    pipeline = ast.parse((SRC / "cxrflow" / "pipeline.py").read_text())
    entry = pipeline_entry_points(tree)
    if entry:
        chosen = [node for node in pipeline.body if not isinstance(node, (ast.FunctionDef, ast.ClassDef))]
        chosen += [node for node in pipeline.body if isinstance(node, ast.FunctionDef) and node.name in entry]
        names |= imported_names(chosen)
        sources += [ast.unparse(node) for node in chosen]
    seen, third_party = {"cxrflow.pipeline"}, set()
    todo = sorted(names)
    while todo:
        name = todo.pop()
        if name.partition(".")[0] not in FIRST_PARTY:
            third_party.add(name.partition(".")[0])
            continue
        if name in seen or module_file(name) is None:
            continue
        seen.add(name)
        text = module_file(name).read_text()
        sources.append(text)
        todo += sorted(imported_names([ast.parse(text)]) - seen)
    return {n for n in third_party if n not in sys.stdlib_module_names}, sources


@functools.cache
def import_name_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distributions_needed(script: Path) -> set[str]:
    import_names, sources = reached_code(script)
    mapping = import_name_distributions()
    unknown = sorted(n for n in import_names if n not in mapping)
    assert not unknown, f"{script.name}: imports {unknown}, which no installed distribution provides"
    needed = {normalized(dist) for name in import_names for dist in mapping[name]}
    for name in import_names & set(RUNTIME_BACKENDS):
        needed |= {normalized(d) for d in RUNTIME_BACKENDS[name]}
    if "pandas" in import_names:
        needed |= {engine for pattern, engine in PANDAS_ENGINES.items() if any(re.search(pattern, s) for s in sources)}
    return needed


def rules_with_scripts() -> list[tuple[str, Path, Path]]:
    """(rule, conda env file, script) for every rule, read from workflow/rules/*.smk."""
    found = []
    for smk in sorted(RULES.glob("*.smk")):
        blocks = re.split(r"^(?:local)?rule (\w+):", smk.read_text(), flags=re.M)
        for name, body in zip(blocks[1::2], blocks[2::2]):
            conda = re.search(r"^\s+conda:\s*\n\s+\"([^\"]+)\"", body, flags=re.M)
            script = re.search(r"^\s+script:\s*\n\s+\"([^\"]+)\"", body, flags=re.M)
            assert conda and script, f"{smk.name}: rule {name} needs a conda: env and a script:"
            found.append((name, (RULES / conda.group(1)).resolve(), (RULES / script.group(1)).resolve()))
    return found


def env_pins(env_file: Path) -> dict[str, str]:
    env = yaml.safe_load(env_file.read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {normalized(spec.split("==")[0]): spec.split("==")[1] for spec in pip}


def test_reached_code_follows_the_package():
    """The derivation itself: training reaches torch through cxrflow.train, and predict reaches pydicom through
    cxrflow.predict -> cxrflow.preprocess -> cxrflow.decode, so it needs the DICOM decoders."""
    scripts = ROOT / "workflow" / "scripts"
    assert {"torch", "timm", "monai", "safetensors"} <= distributions_needed(scripts / "train.py")
    assert {"pydicom", "pylibjpeg-libjpeg", "pyjpegls"} <= distributions_needed(scripts / "predict.py")
    assert "torch" not in distributions_needed(scripts / "cohort.py")


def test_every_rule_env_lists_what_its_code_imports():
    pins = requirement_pins()
    rows, problems = [], []
    for rule, env_file, script in rules_with_scripts():
        needed = distributions_needed(script)
        listed = env_pins(env_file)
        rows.append((rule, env_file.name, ", ".join(sorted(needed))))
        for dist in sorted(needed):
            if dist not in pins:
                problems.append(f"{rule}: {dist} is imported but not pinned in requirements.txt")
            elif dist not in listed:
                problems.append(f"{rule}: envs/{env_file.name} lacks {dist}=={pins[dist]}")
            elif listed[dist] != pins[dist]:
                problems.append(f"{rule}: envs/{env_file.name} pins {dist}=={listed[dist]}, requirements.txt {pins[dist]}")
    width = max(len(r[0]) for r in rows)
    print("\n" + "\n".join(f"{rule:<{width}}  {env:<10}  {dists}" for rule, env, dists in rows))
    assert not problems, "\n".join(problems)


# --- the HTML report in a browser -------------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=15000", "--window-size=1400,2200"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no chromium on PATH: Debian's `chromium` package is installed by .ci/run (apt-get install chromium)")


def browse(browser: str, page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    profile.mkdir(parents=True, exist_ok=True)
    return subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=180)


class _Tables(HTMLParser):
    """The rows of each <table> (cell texts), and the src of each <img>."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self._cell = [], [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th") and self.tables and self.tables[-1]:
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs).get("src", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def rendered_report(browser: str, report: Path, profile: Path) -> _Tables:
    dom = browse(browser, report, profile, "--dump-dom")
    assert dom.returncode == 0 and "<html" in dom.stdout, dom.stderr[-3000:]
    page = _Tables()
    page.feed(dom.stdout)
    return page


def first_page_table(page: _Tables) -> list[list[str]]:
    tables = [t for t in page.tables if t and t[0][:1] == ["Pathology"] and "AUC (95% CI)" in t[0]]
    assert tables, f"no metrics table in the rendered page; tables: {[t[:1] for t in page.tables]}"
    return tables[0]


@pytest.mark.e2e
def test_report_opens_on_the_metrics_table_and_roc(tiny_run, tmp_path):
    """The report's first page (the workflow description, which the report's JavaScript renders) shows the
    metrics table, one row per cohort that ran, and the ROC figure of all cohorts."""
    browser = chromium()
    snakemake_tiny(tiny_run, "--report", "results/report.html")
    report = tiny_run / "results" / "report.html"
    with open(tiny_run / "results" / "metrics_table.csv", newline="", encoding="utf-8") as f:
        metrics = list(csv.DictReader(f))
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    tiny = yaml.safe_load((ROOT / "config" / "tiny.yaml").read_text())
    ran = tiny.get("cohorts", {}).get("enabled") or config["cohorts"]["pathologies"]
    assert sorted(row["pathology"] for row in metrics) == sorted(ran)
    names = sorted(config["cohorts"]["pathologies"][p]["name"]["en"] for p in ran)

    unrendered = _Tables()
    unrendered.feed(report.read_text(encoding="utf-8"))
    assert not unrendered.tables, "the check below must see what the report's JavaScript renders"
    page = rendered_report(browser, report, tmp_path / "profile-dom")
    table = first_page_table(page)
    rows = table[1:]
    assert sorted(row[0] for row in rows if row[0] != "Mean") == names
    assert [row[0] for row in rows].count("Mean") == 1 and len(rows) == len(names) + 1
    auc = table[0].index("AUC (95% CI)")
    for row in rows:
        assert 0.0 <= float(row[auc].split()[0]) <= 1.0, row
    png = (tiny_run / "results" / "roc_all.png").read_bytes()
    shown = [unquote_to_bytes(src.split(",", 1)[1]) for src in page.images if src.startswith("data:image/png,")]
    assert png in shown, "the ROC figure is not shown on the first page"

    screenshot = tiny_run / "results" / "report_screenshot.png"
    shot = browse(browser, report, tmp_path / "profile-shot", f"--screenshot={screenshot}")
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-3000:]
    from PIL import Image

    with Image.open(screenshot) as image:
        assert image.size == (1400, 2200)
        assert len(set(image.convert("L").getdata())) > 16, "a blank screenshot"
    print(f"report screenshot: {screenshot}")


# --- the rule logs -----------------------------------------------------------------------------------------------

JOB = """
import subprocess, sys, warnings
from types import SimpleNamespace
from cxrflow.cli import script

with script(SimpleNamespace(log=[sys.argv[1]], rule="demo")) as log:
    log.info("counted 3 rows")
    warnings.warn("a library warning")
    print("a library's message", file=sys.stderr)
    subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('a child process says so')"])
    {}["a library bug"]
"""


def test_a_script_sends_stderr_and_tracebacks_to_its_log(tmp_path):
    """What a job writes to stderr (cxrflow's logging, warnings, libraries, child processes, the traceback of a
    crash) lands in the rule's log, not only on the console."""
    log = tmp_path / "demo.log"
    result = subprocess.run([sys.executable, "-c", JOB, str(log)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    assert result.returncode == 1
    text = log.read_text()
    for expected in ("counted 3 rows", "a library warning", "a library's message", "a child process says so",
                     "KeyError: 'a library bug'", "Traceback"):
        assert expected in text, (expected, text)
    assert "KeyError" in result.stderr  # the console still shows the failure
