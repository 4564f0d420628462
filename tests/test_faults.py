"""Faults: a SIGKILL in the middle of the preprocessing shards, two snakemake runs at once, a full disk."""

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import copy_repo

from conftest import SNAKEMAKE
TARGET = "results/tensors/index.parquet"


def start(workdir, *args):
    (workdir / "one_shard.yaml").write_text("preprocess: {shards: 1}\n")
    return subprocess.Popen([SNAKEMAKE, *args, "--cores", "2", "--configfile", "config/tiny.yaml", "one_shard.yaml"],
                            cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(workdir, *args):
    process = start(workdir, *args)
    out, err = process.communicate(timeout=900)
    assert process.returncode == 0, err[-4000:]
    return out + err


def wait_for(path: Path, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_sigkill_during_the_tensor_shard_then_rerun_gives_identical_outputs(tmp_path):
    reference = copy_repo(tmp_path / "reference")
    finish(reference, TARGET)

    killed = copy_repo(tmp_path / "killed")
    finish(killed, "results/catalog.parquet")
    process = start(killed, TARGET)
    wait_for(killed / "results/logs/preprocess/0000.log", process)
    time.sleep(1.0)  # well inside the shard: it decodes a few hundred images
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)
    assert not (killed / TARGET).exists()
    # What the README says to do after a killed run: unlock once, then the same command (rerun-incomplete is on).
    finish(killed, "--unlock")
    finish(killed, TARGET)

    for relative in ["results/tensors/shard_0000.npy"]:
        assert (reference / relative).read_bytes() == (killed / relative).read_bytes(), relative
    a = pd.read_parquet(reference / "results/preprocess/shards/0000.parquet")
    b = pd.read_parquet(killed / "results/preprocess/shards/0000.parquet")
    pd.testing.assert_frame_equal(a, b)


def test_a_second_snakemake_in_the_same_directory_is_refused(tmp_path):
    workdir = copy_repo(tmp_path / "repo")
    first = start(workdir, TARGET)
    try:
        wait_for(workdir / ".snakemake" / "locks", first)
        deadline = time.monotonic() + 60
        while not list((workdir / ".snakemake" / "locks").iterdir()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = subprocess.run([SNAKEMAKE, TARGET, "--cores", "1", "--configfile", "config/tiny.yaml"], cwd=workdir,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode != 0
        assert "cannot be locked" in (second.stdout + second.stderr)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)


@pytest.fixture
def tiny_disk(tmp_path):
    mount_point = tmp_path / "full"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to simulate a full disk: {done.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_a_full_disk_while_writing_tensors_is_a_clear_error_and_leaves_nothing(tiny_disk, tmp_path):
    from PIL import Image

    from cxrflow.errors import CxrflowError
    from cxrflow.tensors import preprocess_shard

    rng = np.random.default_rng(0)
    paths = []
    for i in range(80):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (80, 80), dtype=np.uint8)).save(path)
        paths.append(str(path))
    catalog = pd.DataFrame({"image_id": [Path(p).stem for p in paths], "path": paths})
    with pytest.raises(CxrflowError, match="disk full|No space"):
        preprocess_shard(catalog, 0, 1, 64, {}, tiny_disk / "shard_0000.npy", tiny_disk / "shard.parquet")
    assert not (tiny_disk / "shard_0000.npy").exists() and not (tiny_disk / "shard.parquet").exists()
    assert not list(tiny_disk.iterdir()), "no temporary file left behind"
