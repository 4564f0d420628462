"""The tiny workflow on a real SLURM cluster, and checks of the cluster profiles.

The cluster test needs the one-node CI cluster of `.ci/slurm/start.sh` and runs
only when CXRFLOW_SLURM=1:

    .ci/slurm/start.sh
    CXRFLOW_SLURM=1 python -m pytest -s tests/slurm_check.py
    .ci/slurm/stop.sh

It runs the tiny config with `--profile profiles/slurm --profile profiles/ci-slurm`
in a copy of the repository and asserts that every job ran as a SLURM job, that
the training jobs got a GPU from SLURM and that the metrics table was written.
It prints SLURM's own records of the run (squeue, scontrol, jobcomp lines).

The profile checks need no cluster and always run.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "profiles"
TINY_CONFIG = ["config/tiny.yaml", "config/tiny-slurm.yaml"]  # two cohorts: the same checks, a third of the time
METRICS_TABLE = "results/metrics_table.csv"
TRAIN_RULE = "train"
# Jobs that Snakemake runs on the submit host: `all` only collects targets, and the rules marked `localrule: True`
# take seconds (their own cluster job would cost more than the work).
LOCAL_RULES = {"all"} | set(re.findall(r"^rule (\w+):\n(?:    .*\n|\n)*?    localrule: True",
                                       "\n".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk")),
                                       re.MULTILINE))
# The fake GPUs of .ci/slurm/gres.conf.in.
FAKE_GPU_IDS = {"0", "1"}
CLUSTER_KEYS = {"cores", "resources", "executor", "jobs", "default-resources", "set-resources", "set-threads"}

SNAKEMAKE = [sys.executable, "-m", "snakemake"]
SLURM_PROFILES = ["--profile", "profiles/slurm", "--profile", "profiles/ci-slurm"]


def load_profile(name):
    return yaml.safe_load((PROFILES / name / "config.yaml").read_text())


def run(args, cwd=None, timeout=60):
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stderr[-4000:]}"
    return result.stdout


def copy_workflow(destination):
    """Copy the working tree without .git and without what .gitignore leaves out (results, data, caches)."""
    gitignore = REPO / ".gitignore"
    lines = gitignore.read_text().splitlines() if gitignore.exists() else []
    patterns = [line.strip().strip("/") for line in lines if line.strip() and not line.startswith("#")]

    def ignored(folder, names):
        skip = set()
        for name in names:
            relative = (Path(folder) / name).relative_to(REPO).as_posix()
            for pattern in patterns:
                if relative == pattern or ("/" not in pattern and fnmatch(name, pattern)):
                    skip.add(name)
        return skip | ({".git"} if Path(folder) == REPO else set())

    shutil.copytree(REPO, destination, ignore=ignored, symlinks=True)


# --- profiles, no cluster needed ------------------------------------------------


def test_default_profile_leaves_cluster_runs_alone():
    # profiles/default is read on every run and wins key by key over --profile.
    assert CLUSTER_KEYS.isdisjoint(load_profile("default"))


def test_ci_overlay_repeats_slurm_defaults():
    # A later --profile replaces whole top-level keys, so the overlay repeats
    # default-resources; it may only add the partition.
    slurm = load_profile("slurm")["default-resources"]
    ci = dict(load_profile("ci-slurm")["default-resources"])
    assert ci.pop("slurm_partition") == "ci"
    assert ci == slurm


def test_profiles_use_rules_that_exist():
    if not (REPO / "Snakefile").exists():
        pytest.skip("no Snakefile yet")
    rules = set(run(SNAKEMAKE + ["--list-rules", "--configfile", *TINY_CONFIG], cwd=REPO).split())
    slurm = load_profile("slurm")
    named = set(slurm.get("set-resources", {})) | set(slurm.get("set-threads", {}))
    assert named <= rules, f"profiles/slurm names rules the workflow lacks: {sorted(named - rules)}"


def test_cluster_profiles_parse(tmp_path):
    if not (REPO / "Snakefile").exists():
        pytest.skip("no Snakefile yet")
    pytest.importorskip("snakemake_executor_plugin_slurm")
    copy_workflow(tmp_path / "cxrflow")
    run(SNAKEMAKE + SLURM_PROFILES + ["--dry-run", "--quiet", "--configfile", *TINY_CONFIG], cwd=tmp_path / "cxrflow")


# --- the tiny workflow on SLURM ---------------------------------------------------


def read_snakemake_log(text):
    """Snakemake job id -> rule, and Snakemake job id -> SLURM job id."""
    finished = {int(j): rule for j, rule in re.findall(r"Finished jobid: (\d+) \(Rule: (\S+)\)", text)}
    submitted = {
        int(j): slurm_id for j, slurm_id in re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", text)
    }
    return finished, submitted


def slurm_setting(name):
    config = run(["scontrol", "show", "config"])
    return re.search(rf"^{name}\s*=\s*(\S+)", config, re.MULTILINE).group(1)


def read_job_lines(path, job_ids, containing=""):
    """Lines of a `JobId=<id> key=value ...` file for the given jobs: id -> line."""
    lines = {}
    for line in Path(path).read_text().splitlines():
        job_id = re.match(r"JobId=(\d+) ", line)
        if job_id and job_id.group(1) in job_ids and containing in line:
            lines[job_id.group(1)] = line
    return lines


def job_gpus(line):
    return re.search(r"JobGpus=(\S*)", line).group(1)


@pytest.mark.slurm
@pytest.mark.skipif(
    os.environ.get("CXRFLOW_SLURM") != "1",
    reason="needs the CI SLURM cluster: run .ci/slurm/start.sh, then set CXRFLOW_SLURM=1",
)
def test_tiny_workflow_runs_on_slurm(tmp_path, capsys):
    workdir = tmp_path / "cxrflow"
    copy_workflow(workdir)
    result = subprocess.run(
        SNAKEMAKE + SLURM_PROFILES + ["--configfile", *TINY_CONFIG],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    log = result.stdout + result.stderr
    if result.returncode != 0:
        with capsys.disabled():
            for slurm_log in sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log")):
                print(f"----- {slurm_log} -----\n{slurm_log.read_text()[-3000:]}")
    assert result.returncode == 0, log[-8000:]

    run_id = re.search(r"SLURM run ID: (\S+)", log).group(1)
    finished, submitted = read_snakemake_log(log)
    slurm_ids = set(submitted.values())
    train_ids = {submitted[j] for j, rule in finished.items() if rule == TRAIN_RULE and j in submitted}
    # SLURM's own records: jobcomp/filetxt, and the GPU lines of .ci/slurm/epilog.sh.
    jobcomp = read_job_lines(slurm_setting("JobCompLoc"), slurm_ids, containing=f" Name={run_id} ")
    gpus = read_job_lines(Path(slurm_setting("Epilog")).parent.parent / "log" / "gpus.txt", slurm_ids)
    columns = "JobID:8,Comment:40,Partition:10,NodeList:10,tres-per-job:14,State:10"
    table = run(["squeue", "--states=all", f"--name={run_id}", f"--Format={columns}"])
    details = {i: run(["scontrol", "show", "job", "--details", i]) for i in sorted(train_ids, key=int)}
    with capsys.disabled():  # the evidence belongs in the CI log, whatever pytest's -q/-s
        print(f"\nSLURM run {run_id}: squeue --states=all\n{table}")
        print("jobcomp/filetxt:\n" + "\n".join(jobcomp[i] for i in sorted(jobcomp, key=int)))
        print("epilog (log/gpus.txt):\n" + "\n".join(gpus[i] for i in sorted(gpus, key=int)))
        for slurm_id, text in details.items():
            fields = re.findall(r"(?:JobId|Comment|TresPerJob|JOB_GRES)=\S+", text)
            print(f"scontrol show job -d {slurm_id}: " + " ".join(fields))

    # 1. Every job ran as a SLURM job, and SLURM recorded it as completed.
    local = {rule for j, rule in finished.items() if j not in submitted}
    assert local <= LOCAL_RULES, f"jobs ran outside SLURM: {sorted(local - LOCAL_RULES)}"
    assert set(submitted) <= set(finished)
    assert set(jobcomp) == slurm_ids, "SLURM's job records differ from Snakemake's submissions"
    for line in jobcomp.values():
        assert "JobState=COMPLETED" in line and f"WorkDir={workdir}" in line, line

    # 2. The training jobs asked SLURM for a GPU (--gpus) and SLURM gave them one.
    assert train_ids, f"no '{TRAIN_RULE}' job was submitted"
    for slurm_id, text in details.items():
        assert "TresPerJob=gres:gpu:1" in text, text
        assert re.search(r"JOB_GRES=gpu:1\b", text), text
        assert job_gpus(gpus[slurm_id]) in FAKE_GPU_IDS, gpus[slurm_id]
    # Inside the job, training used the device SLURM granted, not one of its own choosing.
    metadata_files = sorted(workdir.glob("results/models/*/metadata.json"))
    assert len(metadata_files) == len(train_ids), metadata_files
    for metadata in metadata_files:
        runtime = json.loads(metadata.read_text())["runtime"]
        slurm_id = str(runtime["slurm_job_id"])
        assert slurm_id in train_ids, metadata
        assert str(runtime["cuda_visible_devices"]) == job_gpus(gpus[slurm_id]), (metadata, gpus[slurm_id])

    # 3. The metrics table was written.
    metrics = workdir / METRICS_TABLE
    assert metrics.is_file() and metrics.stat().st_size > 0, f"{METRICS_TABLE} missing or empty"
