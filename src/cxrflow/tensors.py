"""The tensor cache, read side: the preprocessed uint8 images of the shards, by image id.

Training, evaluation and prediction read the cache through this module alone, so they import numpy and pandas but
not the writer's decoders and filters (Pillow, scikit-image, SciPy, pydicom: `cxrflow.preprocess`), e.g. on a bare
GPU node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

# How the uint8 cache maps to model input; recorded in each model's metadata.json.
INTENSITY_CONVENTION = "uint8 cache, MONOCHROME2 (bone bright); model input = value / 255, then per-image z-score if normalize.zscore"


@dataclass
class TensorCache:
    """Read access to the preprocessed images of a set of shards, by image id."""

    index: pd.DataFrame  # image_id, shard, row
    shard_files: dict[int, str]
    _arrays: dict[int, np.ndarray] = field(default_factory=dict, init=False, repr=False)
    _located: np.ndarray | None = field(default=None, init=False, repr=False)  # (shard, row) per index row

    @classmethod
    def open(cls, index_path: str | Path, shard_files: list[str | Path]) -> "TensorCache":
        index = pd.read_parquet(index_path, columns=["image_id", "shard", "row", "status"])
        index = index[index["status"] == "ok"]
        files = {int(Path(f).stem.split("_")[-1]): str(f) for f in shard_files}
        return cls(index.set_index("image_id"), files)

    def shard(self, number: int) -> np.ndarray:
        """One shard's memory-mapped array, opened on first use and kept: batch reads skip the header parsing."""
        if number not in self._arrays:
            self._arrays[number] = np.load(self.shard_files[number], mmap_mode="r")
        return self._arrays[number]

    def load(self, image_ids) -> np.ndarray:
        """The uint8 images (N, S, S) for these ids, read as slices of the memory-mapped shards."""
        ids = np.asarray(list(image_ids), dtype=object)
        # get_indexer on the unique id index costs ~1 us per id where .loc with a list costs ~20: it matters
        # when training reads an epoch as many small batches.
        positions = self.index.index.get_indexer(ids)
        if (positions < 0).any():
            missing = ids[positions < 0][:5].tolist()
            raise KeyError(f"not in the tensor cache (undecodable, excluded or never preprocessed): {missing}")
        if self._located is None:
            self._located = self.index[["shard", "row"]].to_numpy(dtype=np.int64)
        located = self._located[positions]
        shards = np.unique(located[:, 0])
        first = self.shard(int(shards[0]) if len(shards) else next(iter(self.shard_files)))
        out = np.empty((len(located), *first.shape[1:]), dtype=np.uint8)
        for s in shards:
            mask = located[:, 0] == s
            rows = located[mask, 1]
            order = np.argsort(rows)  # ascending reads are sequential on disk
            out[np.flatnonzero(mask)[order]] = self.shard(int(s))[rows[order]]
        return out
