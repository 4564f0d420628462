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


def kill_inside_the_shard(workdir, sig):
    """Kill the run while the shard writes: its temporary file exists from the shard's first image to its rename."""
    pattern = ".shard_0000.npy.*.cxrflow-tmp"
    earlier = set((workdir / "results/tensors").glob(pattern))  # an earlier kill's orphan is not this shard's
    process = start(workdir, TARGET)
    deadline = time.monotonic() + 300
    while not set((workdir / "results/tensors").glob(pattern)) - earlier:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)
    os.killpg(process.pid, sig)
    process.communicate(timeout=60)
    assert not (workdir / TARGET).exists()


def stale_locks(workdir):
    locks = workdir / ".snakemake" / "locks"
    return list(locks.iterdir()) if locks.exists() else []


def test_killed_runs_resume_with_the_same_command_after_unlock_only_when_snakemake_was_sigkilled(tmp_path):
    """What the README promises, signal by signal. Ctrl-C (SIGINT) or `kill` (SIGTERM): Snakemake removes its
    lock, and the same command resumes. SIGKILL (or the OOM killer, or a power cut): the lock stays, the same
    command is refused, and `snakemake --unlock` once makes it resume. Either way the outputs equal an
    uninterrupted run's, and the temporary files the killed writers orphaned are gone."""
    reference = copy_repo(tmp_path / "reference")
    finish(reference, TARGET)

    killed = copy_repo(tmp_path / "killed")
    finish(killed, "results/catalog.parquet")
    kill_inside_the_shard(killed, signal.SIGTERM)
    assert not stale_locks(killed), "SIGTERM: snakemake removed its lock"
    kill_inside_the_shard(killed, signal.SIGKILL)
    assert stale_locks(killed), "SIGKILL: the lock stays"
    orphans = list((killed / "results").rglob("*.cxrflow-tmp"))
    assert orphans, "the killed shard writer left its temporary file"
    refused = start(killed, TARGET)
    _, err = refused.communicate(timeout=300)
    assert refused.returncode != 0 and "cannot be locked" in err
    finish(killed, "--unlock")
    finish(killed, TARGET)

    assert not list((killed / "results").rglob("*.cxrflow-tmp")), f"orphans left (were {orphans})"
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
    from cxrflow.preprocess import preprocess_shard

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


# ---------------------------------------------------------------------------------------------
# The atomic writers (cxrflow.io): full disk, umask, temporary files orphaned by a kill


def test_a_full_disk_in_any_atomic_writer_is_one_error_naming_the_file(tiny_disk):
    from cxrflow.errors import CxrflowError
    from cxrflow.io import write_csv, write_json, write_parquet

    rng = np.random.default_rng(0)
    big = pd.DataFrame({"text": [rng.bytes(500).hex() for _ in range(1000)]})  # 1 MB incompressible, on 256 kB
    for writer, name in ((write_csv, "table.csv"), (write_parquet, "table.parquet"), (write_json, "table.json")):
        target = tiny_disk / name
        with pytest.raises(CxrflowError, match=f"disk full while writing {target}") as caught:
            writer(big if writer is not write_json else {"rows": big["text"].tolist()}, target)
        assert "\n" not in str(caught.value)
        assert not list(tiny_disk.iterdir()), f"{name}: nothing partial left"
    # torch.save (training's checkpoints) says only "unexpected pos": the folder's free space tells.
    import torch

    from cxrflow.io import atomic_path

    with pytest.raises(CxrflowError, match="disk full while writing .*model.pt"):
        with atomic_path(tiny_disk / "model.pt") as tmp:
            torch.save({"weights": torch.randn(200_000)}, tmp)
    assert not list(tiny_disk.iterdir())


def test_atomic_outputs_honour_the_umask(tmp_path):
    from cxrflow.io import write_csv, write_text

    old = os.umask(0o002)
    try:
        write_text("shared", tmp_path / "group.txt")
        os.umask(0o077)
        write_csv(pd.DataFrame({"a": [1]}), tmp_path / "private.csv")
    finally:
        os.umask(old)
    assert (tmp_path / "group.txt").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "private.csv").stat().st_mode & 0o777 == 0o600


def test_temporary_files_of_dead_writers_are_removed_by_the_next_writer(tmp_path):
    from cxrflow.io import TEMP_SUFFIX, _HOST, write_text

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that existed and is gone
    orphan = tmp_path / f".out.txt.{_HOST}.{dead.pid}.abc{TEMP_SUFFIX}"
    live = tmp_path / f".out.txt.{_HOST}.{os.getppid()}.def{TEMP_SUFFIX}"  # a live process's file stays
    other_host_old = tmp_path / f".out.txt.elsewhere.1.ghi{TEMP_SUFFIX}"
    other_host_new = tmp_path / f".out.txt.elsewhere.2.jkl{TEMP_SUFFIX}"
    not_ours = tmp_path / ".out.txt.something.tmp"
    for path in (orphan, live, other_host_old, other_host_new, not_ours):
        path.write_text("half")
    two_days_ago = time.time() - 2 * 86400
    os.utime(other_host_old, (two_days_ago, two_days_ago))
    write_text("done", tmp_path / "out.txt")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"out.txt", live.name, other_host_new.name, not_ours.name}, left


def test_sigkill_mid_write_leaves_an_orphan_that_the_rerun_removes(tmp_path):
    """A writer killed between creating its temporary file and renaming it: the next run's writer cleans up."""
    import sys

    code = ("import time; from cxrflow.io import atomic_path\n"
            f"with atomic_path({str(tmp_path / 'out.bin')!r}) as tmp:\n"
            "    tmp.write_bytes(b'x' * 1000); print('ready', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert child.stdout.readline().strip() == "ready"
    child.kill()
    child.wait(10)
    assert len(list(tmp_path.glob(".out.bin.*"))) == 1, "the kill orphaned the temporary file"
    from cxrflow.io import write_text

    write_text("again", tmp_path / "out.bin")
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
