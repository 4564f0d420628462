"""The image archive: confinement (every path resolves inside source.images, judged without opening a file) and
the listing (a bad entry costs only its own row, with its own reason)."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrflow.archive import check_paths, found_fraction_check, image_folder, list_archive
from cxrflow.errors import CxrflowError


def build_archive(tmp_path: Path) -> Path:
    """An archive with one entry of every kind, and a secret file outside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"root:x:0:0:secret")
    root = tmp_path / "archive"
    (root / "sub").mkdir(parents=True)
    for name in ["a.png", "b.png", "sub/c.png"]:
        (root / name).write_bytes(b"\x89PNG fake")
    (root / "folder.png").mkdir()
    os.mkfifo(root / "pipe.png")
    os.symlink(root / "loop.png", root / "loop.png")
    os.symlink(root / "a.png", root / "inside_link.png")
    os.symlink("../outside/secret.png", root / "outside_link.png")
    os.symlink(outside, root / "outside_dir")
    os.symlink(root / "gone.png", root / "dangling.png")
    os.symlink("/dev/null", root / "device_link.png")
    return root


def verdicts(root: Path, paths: list) -> dict:
    checked = check_paths(pd.Series(paths, dtype="string"), root)
    return {p: (r, d) for p, r, d in zip(paths, checked.reason, checked.detail)}


ROWS = {
    "a.png": "",
    "sub/c.png": "",
    "sub/../b.png": "",
    "inside_link.png": "",
    "absent.png": "missing_file",
    "folder.png": "not_a_file",
    "pipe.png": "not_a_file",
    "loop.png": "symlink_loop",
    "dangling.png": "missing_file",
    "device_link.png": "outside_archive",
    "outside_link.png": "outside_archive",
    "outside_dir/secret.png": "outside_archive",
    "../outside/secret.png": "outside_archive",
    "sub/../../outside/secret.png": "outside_archive",
    "../../../../../../etc/passwd": "outside_archive",
    "/etc/hostname": "outside_archive",
    "/proc/self/environ": "outside_archive",
    "nowhere/x.png": "missing_file",
    "x" * 300 + "/a.png": "unreadable",  # a folder name longer than the system allows
    "a.png/x.png": "missing_file",
    "sub": "not_a_file",
    ".": "not_a_file",
    "sub/": "not_a_file",
    "a.png/": "missing_file",
    "..": "outside_archive",
}


def test_every_path_is_judged_inside_or_outside_without_a_bad_entry_hiding_its_neighbours(tmp_path):
    root = build_archive(tmp_path)
    got = verdicts(root, list(ROWS))
    assert {p: r for p, (r, _) in got.items()} == ROWS
    assert got["pipe.png"][1].endswith("fifo") and got["folder.png"][1].endswith("directory")
    # An absolute path inside the archive is as good as a relative one.
    assert verdicts(root, [str(root / "a.png")])[str(root / "a.png")][0] == ""
    # No detail quotes a file's bytes: the secret is named by its path only.
    assert not any("root:x" in d for _, d in got.values())


def test_confinement_never_opens_a_file(tmp_path):
    """Outside files are judged from their names alone: a FIFO outside the archive would block any open."""
    root = build_archive(tmp_path)
    os.mkfifo(tmp_path / "outside" / "trap.png")
    os.symlink(tmp_path / "outside" / "trap.png", root / "trap_link.png")
    got = verdicts(root, ["../outside/trap.png", "trap_link.png", str(tmp_path / "outside" / "trap.png")])
    assert {r for r, _ in got.values()} == {"outside_archive"}


def test_a_missing_path_and_a_nul_byte_are_rows_not_crashes(tmp_path):
    root = build_archive(tmp_path)
    checked = check_paths(pd.Series(["a.png", None, "bad\x00.png"], dtype="string"), root)
    assert list(checked.reason) == ["", "missing_file", "unreadable"]
    assert list(checked.ok) == [True, False, False]


def test_the_catalog_keeps_paths_as_the_folder_joined_to_the_table(tmp_path):
    root = build_archive(tmp_path)
    checked = check_paths(pd.Series(["a.png", str(root / "b.png")], dtype="string"), root)
    assert list(checked.path) == [(root / "a.png").as_posix(), (root / "b.png").as_posix()]


def test_a_relative_image_folder_is_resolved_from_the_working_directory(tmp_path, monkeypatch):
    root = build_archive(tmp_path)
    monkeypatch.chdir(tmp_path)
    got = verdicts(Path("archive"), ["a.png", "../outside/secret.png", "outside_link.png", "loop.png"])
    assert [r for r, _ in got.values()] == ["", "outside_archive", "outside_archive", "symlink_loop"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder: permissions cannot make one unreadable")
def test_an_unreadable_folder_costs_only_its_own_rows(tmp_path):
    root = build_archive(tmp_path)
    locked = root / "locked"
    locked.mkdir()
    (locked / "x.png").write_bytes(b"x")
    locked.chmod(0)
    try:
        got = verdicts(root, ["locked/x.png", "a.png", "sub/c.png"])
    finally:
        locked.chmod(0o755)
    assert [r for r, _ in got.values()] == ["unreadable", "", ""]


def test_a_folder_that_loops_costs_only_its_own_rows(tmp_path):
    root = build_archive(tmp_path)
    os.symlink(root / "spin", root / "spin")
    got = verdicts(root, ["spin/x.png", "a.png", "loop.png", "b.png"])
    assert [r for r, _ in got.values()] == ["symlink_loop", "", "symlink_loop", ""]


def test_the_image_folder_must_exist(tmp_path):
    with pytest.raises(CxrflowError, match=r"^source.images: no such folder: .*typo$"):
        image_folder({"images": "typo"}, tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CxrflowError, match=r"^source.images: is not a folder: .*file$"):
        image_folder({"images": "file"}, tmp_path)
    with pytest.raises(CxrflowError, match="source.images: the image folder is required"):
        image_folder({}, tmp_path)
    assert image_folder({"images": "."}, tmp_path) == tmp_path / "."


def test_almost_no_file_found_is_an_error_naming_the_folder(tmp_path):
    root = build_archive(tmp_path)
    paths = pd.Series(["a.png"] + [f"x{i}.png" for i in range(29)], dtype="string")
    checked = check_paths(paths, root)
    everyone = np.ones(len(paths), dtype=bool)
    with pytest.raises(CxrflowError, match=r"^source.images: only 1 of the 30 files .*archive.*missing_file: 29; "
                                           r"e.g. .*x0.png"):
        found_fraction_check(checked, everyone, root, 0.1)
    found_fraction_check(checked, everyone, root, 1 / 30)  # exactly the threshold passes
    found_fraction_check(checked, np.zeros(len(paths), dtype=bool), root, 0.1)  # nothing named: nothing to say
    nothing = check_paths(pd.Series(["y.png", "z.png"], dtype="string"), root)
    with pytest.raises(CxrflowError, match="none of the 2 files .*no image survived ingest"):
        found_fraction_check(nothing, np.ones(2, dtype=bool), root, 0.1)


def test_the_folder_listing_gives_every_entry_a_row(tmp_path):
    root = build_archive(tmp_path)
    (root / ".hidden").write_bytes(b"x")
    (root / "sub" / "deeper").mkdir()
    (root / "sub" / "deeper" / "d.dcm").write_bytes(b"x")
    listed = {name: reason for name, reason, _ in list_archive(root)}
    assert listed == {
        "a.png": "", "b.png": "", "sub/c.png": "", "sub/deeper/d.dcm": "", "inside_link.png": "",
        "pipe.png": "not_a_file", "loop.png": "symlink_loop", "dangling.png": "missing_file",
        "device_link.png": "outside_archive", "outside_link.png": "outside_archive", "outside_dir": "outside_archive",
    }


def test_a_dicom_folder_gives_every_entry_a_row_and_opens_nothing_outside(tmp_path, keys_file):
    from hostile import chest, dicom

    from cxrflow.ingest import build_catalog

    root = build_archive(tmp_path)
    pixels = (chest() * 4095).astype(np.uint16)
    dicom(root / "sub" / "good.dcm", pixels, BitsStored=12)
    dicom(tmp_path / "outside" / "stranger.dcm", pixels, BitsStored=12, PatientID="STRANGER")
    os.symlink(tmp_path / "outside" / "stranger.dcm", root / "stranger_link.dcm")
    result = build_catalog({"format": "dicom", "images": str(root)}, keys_file, base="/")
    reasons = dict(zip(result.ledger["item"], result.ledger["reason"]))
    assert list(result.catalog["path"]) == [(root / "sub" / "good.dcm").as_posix()]
    assert reasons == {
        "a.png": "not_dicom", "b.png": "not_dicom", "sub/c.png": "not_dicom", "inside_link.png": "not_dicom",
        "pipe.png": "not_a_file", "loop.png": "symlink_loop", "dangling.png": "missing_file",
        "device_link.png": "outside_archive", "outside_link.png": "outside_archive", "outside_dir": "outside_archive",
        "stranger_link.dcm": "outside_archive",
    }
    assert result.summary["rows_read"] == len(result.catalog) + len(result.ledger) == 12
