"""File edges shared by every stage: atomic writes, so that no half-written file is ever consumed.

Every output goes through `atomic_path`, which gives three promises wherever it is used:
- a full disk (or quota) is one `CxrflowError` naming the file, and nothing partial is left behind;
- the output's mode follows the umask, like a file `open()` would create (mkstemp alone makes 0600, which hides a
  group-shared `results/` from colleagues);
- temporary files that a killed writer left behind are removed by the next writer of the same output.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import yaml

from cxrflow.errors import CxrflowError

# libyaml's C loader when present (10x faster on the label files), the same safe semantics either way.
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Temporary files are named ".<output>.<host>.<pid>.<random>.cxrflow-tmp", so that the next writer can tell its
# own kind's orphans from anything else, and whether their writer is gone (same host, dead pid).
TEMP_SUFFIX = ".cxrflow-tmp"
# A temporary file written from another host (a cluster node) cannot be checked by pid; after this long, no
# writer of ours is still at work on it (the longest job, a training run, rewrites its files every epoch).
STALE_AFTER_S = 24 * 3600
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def current_umask() -> int:
    """The process umask, read without changing it (os.umask can only be read by setting it, which races threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_disk_full(err: BaseException, folder: str | Path | None = None) -> bool:
    """True for ENOSPC/EDQUOT/EFBIG, also when a library (pyarrow) rewrapped it with only the message; or, given
    the folder written to, when it has no space left (torch.save says only "file write failed")."""
    if folder is not None:
        try:
            stats = os.statvfs(folder)
            if stats.f_bavail * stats.f_frsize < 64 * 1024:
                return True
        except OSError:
            pass
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            return True
        if any(text in str(err) for text in ("No space left on device", "Disk quota exceeded", "File too large")):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full_error(path, err: BaseException, what: str = "") -> CxrflowError:
    return CxrflowError(f"disk full while writing {path}{what}: {type(err).__name__}: {str(err)[:160]}. "
                        "Free space and rerun the same command; nothing partial was kept.")


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporary files of earlier writers of `path` whose writer is gone; return what was removed.

    Gone means: written on this host by a process that no longer exists, or, from another host, untouched for
    STALE_AFTER_S. A live writer's file (a concurrent job on the same output should not exist, but a second
    snakemake is refused only later) is never touched.
    """
    removed = []
    pattern = re.compile(re.escape(f".{path.name}.") + r"(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\..*" + re.escape(TEMP_SUFFIX) + "$")
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = pattern.match(entry.name)
        if not match:
            continue
        try:
            if match["host"] == _HOST:
                stale = not _pid_alive(int(match["pid"]))
            else:
                stale = now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
            if stale:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue  # another writer removed it first, or it is not ours to remove
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


@contextmanager
def atomic_path(path: str | Path, what: str = ""):
    """Yield a temporary path beside `path`; on success rename it over `path`, on failure remove it.

    The file gets the mode a plain `open(path, "w")` would give (0666 minus the umask). A full disk, wherever in
    the block it strikes, becomes a CxrflowError naming `path` (`what` adds e.g. the size that was being written).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_error(path, err, what) from None
        raise
    try:
        yield Path(tmp)
        if Path(tmp).exists():  # a writer may have replaced the file (np.save adds nothing; torch writes in place)
            os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, Exception) and not isinstance(err, CxrflowError) and is_disk_full(err, path.parent):
            raise disk_full_error(path, err, what) from None
        raise


def save_figure(fig, path: str | Path, **kwargs) -> None:
    """matplotlib's savefig through `atomic_path` (the format comes from the final name, not the temporary one)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs)


def write_parquet(df: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def write_json(obj, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _json_default(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
