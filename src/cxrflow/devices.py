"""Which accelerator a training job uses.

Snakemake's `--resources gpu=2` only limits how many training jobs run at once; it does not say which card
each gets. Each job therefore takes an exclusive file lock on one visible device and keeps it until it exits.
Under SLURM the scheduler has already granted the job its devices (CUDA_VISIBLE_DEVICES), so the job simply
uses the first of them.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cxrflow.errors import CxrflowError


@dataclass
class DeviceSlot:
    device: str  # "cpu" or "cuda:N" (N indexes the visible devices)
    visible_id: str | None  # the CUDA_VISIBLE_DEVICES entry, or the index when unset
    lock_file: object | None = None  # the open, flock-ed file; the lock lasts as long as it stays open

    def release(self) -> None:
        if self.lock_file is not None:
            self.lock_file.close()
            self.lock_file = None


def visible_devices(cuda_count: int) -> list[str]:
    """The device ids this process may use: CUDA_VISIBLE_DEVICES when set (SLURM sets it), else 0..count-1."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()][:cuda_count] if cuda_count else []
    return [str(i) for i in range(cuda_count)]


def default_lock_dir() -> Path:
    return Path(os.environ.get("CXRFLOW_GPU_LOCK_DIR", Path(tempfile.gettempdir()) / f"cxrflow-gpu-locks-{os.getuid()}"))


def acquire_slot(devices: list[str], lock_dir: Path | None = None, timeout_s: float = 3600.0, poll_s: float = 0.5) -> DeviceSlot:
    """Lock one of `devices` exclusively; wait (up to timeout_s) while all are taken. Empty list -> the CPU."""
    if not devices:
        return DeviceSlot("cpu", None)
    if os.environ.get("SLURM_JOB_ID"):
        # SLURM granted these devices to this job alone; locks keyed by index would wrongly collide across jobs
        # that each see their own card as index 0.
        return DeviceSlot("cuda:0", devices[0])
    lock_dir = Path(lock_dir or default_lock_dir())
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    while True:
        for index, device in enumerate(devices):
            handle = open(lock_dir / f"device-{device}.lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            return DeviceSlot(f"cuda:{index}", device, handle)
        if time.monotonic() > deadline:
            raise CxrflowError(f"no free GPU among {devices} after {timeout_s:.0f} s (locks in {lock_dir})")
        time.sleep(poll_s)
