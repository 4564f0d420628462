"""Batches of cached images, read as slices of the memory-mapped tensor cache when they are needed.

Training and prediction never hold a split in memory: a batch's rows are read when the batch comes (by loader worker
processes ahead of time, on a GPU), and the pages of the memory map that the read brought in are handed back at once
(`release_pages`). Without that, every page an epoch touched would stay mapped and count in the process's resident
memory, so that peak RSS would grow with the cohort (50k images at 380 px: 7 GB) although the kernel could drop them.
"""

from __future__ import annotations

import ctypes
import mmap
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import torch

if TYPE_CHECKING:
    from cxrflow.tensors import TensorCache

# Worker processes that read the next batches while the card computes: reading is I/O (page faults on the shards),
# not arithmetic, so two keep a GPU fed from a local disk. On the CPU the reading runs in the training process:
# workers would take cores from the arithmetic.
GPU_LOADER_WORKERS = 2


def loader_workers(device: torch.device) -> int:
    return GPU_LOADER_WORKERS if device.type == "cuda" else 0


class CachedRows(torch.utils.data.Dataset):
    """The images of `image_ids`, by row number; `dataset[rows]` is one batch (uint8 tensor (N, S, S))."""

    def __init__(self, cache: "TensorCache", image_ids):
        self.cache = cache
        self.image_ids = np.asarray(image_ids, dtype=object)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, rows) -> torch.Tensor:
        images = self.cache.load(self.image_ids[np.asarray(rows)])
        for number in self.cache.shard_files:
            release_pages(self.cache.shard(number))
        return torch.from_numpy(images)


def read_batches(cache: "TensorCache", image_ids, batches: Iterable[np.ndarray], workers: int = 0,
                 pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """The images of each batch of row numbers (into `image_ids`), in the order of `batches`, whatever the workers:
    the caller's random draws (order, augmentation) stay the same with or without them."""
    missing = ~in_cache(cache, image_ids)
    if missing.any():
        shown = np.asarray(image_ids, dtype=object)[missing][:5].tolist()
        raise KeyError(f"not in the tensor cache (undecodable, excluded or never preprocessed): {shown}")
    batches = list(batches)
    if not batches:
        return iter(())
    loader = torch.utils.data.DataLoader(CachedRows(cache, image_ids), batch_size=None, sampler=batches,
                                         num_workers=workers, pin_memory=pin_memory)
    return iter(loader)


def in_cache(cache: "TensorCache", image_ids) -> np.ndarray:
    """Which ids the cache holds, from its index alone (no pixels): a missing image fails before the first epoch."""
    return cache.index.index.get_indexer(np.asarray(image_ids, dtype=object)) >= 0


def consecutive(n: int, batch: int) -> list[np.ndarray]:
    """Rows 0..n-1 in batches of `batch` (the last one smaller): prediction's order."""
    return [np.arange(start, min(n, start + batch)) for start in range(0, n, batch)]


_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)
try:
    _madvise = ctypes.CDLL(None, use_errno=True).madvise
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):  # no madvise (not a POSIX system): pages stay mapped until the kernel needs them
    _madvise = None


def release_pages(array: np.ndarray) -> None:
    """Unmap the pages of a read-only memory-mapped array from this process (madvise MADV_DONTNEED). The data stays
    in the kernel's page cache, so a later read costs no disk access; it only stops counting in this process's
    resident memory. A no-op for arrays that are not memory maps, and where madvise is missing."""
    if _madvise is None or _MADV_DONTNEED is None or not isinstance(array, np.memmap) or array.nbytes == 0:
        return
    start = array.ctypes.data
    begin = start - start % mmap.PAGESIZE  # numpy maps from a page boundary at or before the data
    _madvise(begin, start + array.nbytes - begin, _MADV_DONTNEED)
