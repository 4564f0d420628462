"""The image archive (`source.images`) as ingest sees it: which listed path is a readable image file inside it.

Every path a table names is resolved, symbolic links included, and judged inside or outside the archive from
the names alone (lstat and readlink, never open): a path that leaves the archive (`../../etc/passwd`, an absolute
path elsewhere, a link pointing out) is `outside_archive`, and its file is never opened by any later stage.

Existence comes from one directory listing per folder, as before, but a bad entry costs only its own row, with
its own reason: `missing_file`, `not_a_file` (a folder, FIFO, socket or device, named in the detail),
`symlink_loop`, `unreadable` (a listing or a link target the process may not read). No detail ever quotes a
file's bytes.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrflow.errors import CxrflowError

OK = ""
OUTSIDE = "outside_archive"
MISSING = "missing_file"
NOT_A_FILE = "not_a_file"
LOOP = "symlink_loop"
UNREADABLE = "unreadable"
# For callers of the API that pass a source without the schema's defaults (source.min_found_fraction).
MIN_FOUND_FRACTION = 0.1


@dataclass
class Checked:
    """Per row: the path as the catalog keeps it (the image folder joined to the table's value), and why the row
    cannot be used ('' when it can) with a detail that names the path, never the file's content."""

    path: pd.Series
    reason: np.ndarray
    detail: np.ndarray

    @property
    def ok(self) -> np.ndarray:
        return self.reason == OK


def image_folder(source: dict, base: Path) -> Path:
    """`source.images` under `base`, which must be an existing folder: a typo is an error, not a ledger of misses."""
    if not source.get("images"):
        raise CxrflowError("source.images: the image folder is required unless source.check_files is false")
    root = base / source["images"]
    try:
        is_dir = root.is_dir()
    except OSError as err:  # a loop or a name too long: is_dir() lets these through
        raise CxrflowError(f"source.images: cannot read the folder {root}: {err.strerror}") from None
    if not is_dir:
        what = "is not a folder" if root.exists() or root.is_symlink() else "no such folder"
        raise CxrflowError(f"source.images: {what}: {root}")
    return root


def check_paths(paths: pd.Series, root: Path) -> Checked:
    """Judge each path of `paths` (relative to `root`, or absolute; missing = no file named) against `root`."""
    root_text = root.as_posix().rstrip("/") or "/"
    values = paths.astype("string")
    absolute = values.where(values.str.startswith("/").fillna(False), root_text.rstrip("/") + "/" + values)
    codes, uniques = pd.factorize(absolute, use_na_sentinel=True)
    uniques = uniques.to_numpy(dtype=object).tolist()  # Python strings: indexing an Arrow array costs microseconds
    reason = np.full(len(uniques) + 1, OK, dtype=object)
    detail = np.full(len(uniques) + 1, "", dtype=object)
    reason[-1], detail[-1] = MISSING, "no file named in the table"  # the slot of a missing value

    def judge(slot, why, what=""):
        reason[slot], detail[slot] = why, f"{uniques[slot]}: {what}" if what else uniques[slot]

    by_head: dict[str, list[tuple[int, str]]] = {}
    for slot, value in enumerate(uniques):
        head, _, name = value.rpartition("/")
        by_head.setdefault(head, []).append((slot, name))
    # Each distinct folder text is resolved once; texts that lead to one real folder share its listing.
    resolver = _Resolver(os.path.realpath(root))
    by_folder: dict[str, list[tuple[int, str]]] = {}
    for head, wanted in by_head.items():
        if "\x00" in head:
            for slot, _ in wanted:
                judge(slot, UNREADABLE, "the path holds a NUL character")
            continue
        folder = resolver.resolve(head or "/")
        if not resolver.inside(folder):
            for slot, name in wanted:
                judge(slot, OUTSIDE, f"resolves to {_join(folder, name)}, outside {root}")
            continue
        for slot, name in wanted:
            if "\x00" in name:
                judge(slot, UNREADABLE, "the path holds a NUL character")
            elif name in ("", ".", ".."):  # the path names a folder
                real = resolver.resolve(uniques[slot])
                if not resolver.inside(real):
                    judge(slot, OUTSIDE, f"resolves to {real}, outside {root}")
                elif os.path.isdir(real):
                    judge(slot, NOT_A_FILE, "directory")
                else:
                    judge(slot, MISSING, "no folder of that name")
            else:
                by_folder.setdefault(folder, []).append((slot, name))
    for folder, wanted in by_folder.items():
        for slot, (why, what) in _judge_folder(folder, wanted, resolver, root):
            judge(slot, why, what)
    return Checked(absolute, reason[codes], detail[codes])


def found_fraction_check(checked: Checked, considered: np.ndarray, root: Path, minimum: float) -> None:
    """Stop when almost none of the files the table lists exist: the image folder (or the file column) is wrong,
    and a ledger of thousands of misses would hide it."""
    named = int(considered.sum())
    if not named:
        return
    found = int((checked.ok & considered).sum())
    if found >= minimum * named:
        return
    reasons = pd.Series(checked.reason[considered & ~checked.ok]).value_counts()
    example = checked.detail[np.flatnonzero(considered & ~checked.ok)[0]]
    if found == 0:
        lead = f"none of the {named} files the table lists exist under {root} (no image survived ingest"
    else:
        lead = (f"only {found} of the {named} files the table lists exist under {root} (fewer than "
                "source.min_found_fraction")
    raise CxrflowError(
        f"source.images: {lead} = {minimum:g}; {', '.join(f'{k}: {v}' for k, v in reasons.items())}; e.g. {example}); "
        f"check source.images and the table's file column")


def list_archive(root: Path) -> list[tuple[str, str, str]]:
    """Every entry under `root`, recursively, as (path relative to root, reason, detail): reason '' for a regular
    file (a link to one inside the archive included). Hidden files are skipped; folders are entered, links to
    folders are not (those inside are reached through their real folder). One bad entry costs only itself."""
    real_root = os.path.realpath(root)
    resolver = _Resolver(real_root)
    entries = []
    pending = [""]
    while pending:
        relative = pending.pop()
        folder = os.path.join(root, relative) if relative else os.fspath(root)
        try:
            with os.scandir(folder) as listing:
                found = sorted(listing, key=lambda e: e.name)
        except OSError as err:
            if relative:  # the root itself was checked by the caller
                entries.append((relative, *_failure(err, "cannot list the folder")))
            continue
        for entry in found:
            name = f"{relative}/{entry.name}" if relative else entry.name
            try:
                if entry.name.startswith(".") and not entry.is_dir(follow_symlinks=False):
                    continue  # hidden files are not part of the archive, as ever
                if entry.is_symlink():
                    why, what = _judge_link(entry.path, resolver, root)
                    if why == NOT_A_FILE and what == "directory":
                        what = "a symbolic link to a folder (not followed)"
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(name)
                    continue
                elif entry.is_file(follow_symlinks=False):
                    why, what = OK, ""
                else:
                    why, what = NOT_A_FILE, _kind(entry.stat(follow_symlinks=False).st_mode)
            except OSError as err:
                why, what = _failure(err)
            entries.append((name, why, what))
    return sorted(entries)


# --- the pieces ----------------------------------------------------------------------------------------------

class _Resolver:
    """Real paths of folders, each prefix resolved once: a table of two million rows in a hundred thousand folders
    costs one lstat per distinct folder, not one realpath per row."""

    def __init__(self, real_root: str):
        self.real_root = real_root
        self.cwd = os.getcwd()
        self.cache = {"/": "/"}

    def inside(self, real: str) -> bool:
        return real == self.real_root or real.startswith(self.real_root.rstrip("/") + "/")

    def resolve(self, path: str) -> str:
        if not path.startswith("/"):
            path = f"{self.cwd}/{path}"  # not os.path.abspath: that folds 'link/..' before the link is read
        path = path.rstrip("/") or "/"
        known = self.cache.get(path)
        if known is not None:
            return known
        parent, _, name = path.rpartition("/")
        real_parent = self.resolve(parent or "/")
        if name in ("", "."):
            real = real_parent
        elif name == "..":
            real = os.path.dirname(real_parent)
        else:
            candidate = _join(real_parent, name)
            try:
                is_link = stat.S_ISLNK(os.lstat(candidate).st_mode)
            except OSError:
                is_link = False  # absent (or unreadable): kept as written; the listing says what it is
            real = os.path.realpath(candidate) if is_link else candidate
        self.cache[path] = real
        return real


def _join(folder: str, name: str | None) -> str:
    if name is None:
        return folder
    return folder.rstrip("/") + "/" + name


def _judge_folder(folder: str, wanted: list[tuple[int, str]], resolver: _Resolver, root: Path) -> list:
    """One listing of `folder` answers for every wanted name in it; only links and odd entries cost more. Returns
    (slot, (reason, detail)) for the wanted names that are not regular files."""
    names = {name for _, name in wanted}
    regular, odd = set(), {}
    try:
        with os.scandir(folder) as listing:
            for entry in listing:
                if entry.name not in names:
                    continue
                try:
                    if entry.is_symlink():
                        verdict = _judge_link(entry.path, resolver, root)
                    elif entry.is_file(follow_symlinks=False):  # from the directory entry: no stat
                        regular.add(entry.name)
                        continue
                    elif entry.is_dir(follow_symlinks=False):
                        verdict = (NOT_A_FILE, "directory")
                    else:
                        verdict = (NOT_A_FILE, _kind(entry.stat(follow_symlinks=False).st_mode))
                except OSError as err:
                    verdict = _failure(err)
                if verdict[0] == OK:
                    regular.add(entry.name)
                else:
                    odd[entry.name] = verdict
    except OSError as err:
        whole = (MISSING, "no such folder") if err.errno in (errno.ENOENT, errno.ENOTDIR) else \
            _failure(err, "cannot list the folder")
        return [(slot, whole) for slot, _ in wanted]
    return [(slot, odd.get(name, (MISSING, ""))) for slot, name in wanted if name not in regular]


def _judge_link(path: str, resolver: _Resolver, root: Path) -> tuple[str, str]:
    """A symbolic link: where it leads (from readlink alone), then what is there (one stat, no open)."""
    target = os.path.realpath(path)  # a loop is returned unresolved; the stat below names it
    if not resolver.inside(target):
        return OUTSIDE, f"a symbolic link to {target}, outside {root}"
    try:
        mode = os.stat(target).st_mode
    except OSError as err:
        if err.errno == errno.ENOENT:
            return MISSING, f"a symbolic link to {target}, which does not exist"
        return _failure(err)
    if stat.S_ISREG(mode):
        return OK, ""
    return NOT_A_FILE, _kind(mode)


def _failure(err: OSError, what: str = "") -> tuple[str, str]:
    reason = {errno.ELOOP: LOOP, errno.ENOENT: MISSING}.get(err.errno, UNREADABLE)
    text = err.strerror or type(err).__name__
    return reason, f"{what}: {text}" if what else text


def _kind(mode: int) -> str:
    from cxrflow.decode import file_kind  # the words the decoder and predict use for the same entries

    return file_kind(mode)
