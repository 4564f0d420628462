"""Duplicate images under different ids: exact copies by content, near copies (resized, re-encoded) by a
perceptual hash of the cached tensor.

The preprocessing shards record three fingerprints per image (`preprocess.process_image`): `content_hash` (the file's
bytes), `pixel_hash` (the decoded grey levels: the same picture as RGB and RGBA PNG) and `phash` (a 255-bit DCT
hash of the normalized tensor). Images that share either of the first two are exact duplicates; images whose
pHashes differ in at most `near_duplicate_bits` bits are near duplicates. Duplicates are linked transitively into
groups (union-find), and the split stage keeps each group on one side.

The near threshold, measured at 64 px (tests/test_duplicates.py): re-encoded or resized copies of NIH1000 images
lie within 12 bits (JPEG quality 75 and 95, 0.5x and 0.75x resizes, 2x upscale + JPEG 80, a linear intensity
change); harsher copies reach further (JPEG 50: 95% within 14, at most 18; a gamma change: at most 22). The
closest pair of distinct NIH1000 images is 34 bits apart (follow-up films of one patient). The built-in synthetic
archive renders every image from one template, and its distinct images come closer: of 372 (tests' tiny archive),
one pair within 12 bits at 32 px and one within 14 at 64 px; none within 12 at 64 px. 12 bits catches the common
copies; harsher ones (JPEG 50, gamma) are found only in part.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

NEAR_BITS = 12  # the measured threshold of the docstring; the config default (quality.near_duplicate_bits)
HASH_BITS = 255
DUPLICATE_COLUMNS = ["image_id", "group", "kind"]
BLOCK = 64
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit differences between every row of a and every row of b (uint8 arrays of packed bits)."""
    return _POPCOUNT[a[:, None, :] ^ b[None, :, :]].sum(axis=-1, dtype=np.int32)


def near_pairs(hashes: np.ndarray, max_bits: int) -> np.ndarray:
    """All pairs (i < j) of packed hashes within max_bits of each other, as an (n, 2) array.

    Pigeonhole banding: split the hash into max_bits + 1 bands; two hashes within max_bits bits agree exactly on
    at least one band, so only images that share a band value are compared. Exact for any threshold; the cost
    grows with how many images share band values: on NIH1000, 2.7% of all pairs are compared (13,585 of 499,500),
    which for 2 million images would be ~5e10 comparisons, minutes to an hour on one core.
    """
    n, n_bytes = hashes.shape
    if n < 2:
        return np.empty((0, 2), dtype=np.int64)
    bits = np.unpackbits(hashes, axis=1)[:, :HASH_BITS]
    edges = np.linspace(0, HASH_BITS, max_bits + 2).astype(int)
    found = set()
    for start, stop in zip(edges[:-1], edges[1:]):
        if stop <= start:
            continue
        keys = np.packbits(bits[:, start:stop], axis=1)
        _, bucket = np.unique(keys, axis=0, return_inverse=True)
        bucket = bucket.ravel()
        order = np.argsort(bucket, kind="stable")
        bounds = np.flatnonzero(np.diff(bucket[order])) + 1
        for members in np.split(order, bounds):
            # Blocks of rows against the rest of the bucket: memory stays ~BLOCK x bucket x 32 bytes, however many
            # images share a band value.
            for start in range(0, len(members) - 1, BLOCK):
                rows, rest = members[start : start + BLOCK], members[start + 1 :]
                distances = hamming_matrix(hashes[rows], hashes[rest])
                i, j = np.nonzero(distances <= max_bits)
                keep = j >= i  # rest[j] comes after rows[i] in the bucket: each pair once
                found.update(zip(rows[i[keep]].tolist(), rest[j[keep]].tolist()))
    pairs = np.array(sorted((min(p), max(p)) for p in found), dtype=np.int64)
    return pairs.reshape(-1, 2)


def find_duplicates(table: pd.DataFrame, near_bits: int | None) -> pd.DataFrame:
    """Group duplicate images of a shard table (image_id, content_hash, pixel_hash, phash).

    Returns image_id, group (the group's first image id, shared by its members) and kind: `exact` when the image
    has a byte- or pixel-identical twin in its group, else `near`. Only images with at least one duplicate appear.
    Images without fingerprints (undecodable files) are never duplicates.
    """
    ids = table["image_id"].astype(str).to_numpy()
    parent = np.arange(len(ids))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def link(i, j):
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)

    exact = np.zeros(len(ids), dtype=bool)
    for column in ("content_hash", "pixel_hash"):
        if column not in table:
            continue
        values = table[column].reset_index(drop=True)
        for _, members in values[values.notna()].groupby(values[values.notna()]).groups.items():
            members = list(members)
            if len(members) > 1:
                exact[members] = True
                for other in members[1:]:
                    link(members[0], other)
    if near_bits is not None and "phash" in table:
        has = table["phash"].reset_index(drop=True).notna().to_numpy()
        positions = np.flatnonzero(has)
        if len(positions) > 1:
            packed = b"".join(bytes.fromhex(h) for h in table["phash"].to_numpy()[positions])
            packed = np.frombuffer(packed, dtype=np.uint8).reshape(len(positions), -1)
            for i, j in near_pairs(packed, near_bits):
                link(positions[i], positions[j])
    roots = np.array([root(i) for i in range(len(ids))])
    sizes = pd.Series(roots).value_counts()
    keep = np.flatnonzero(sizes.reindex(roots).to_numpy() > 1)
    out = pd.DataFrame({"image_id": ids[keep], "root": roots[keep], "kind": np.where(exact[keep], "exact", "near")})
    first = out.assign(order=out["image_id"]).groupby("root")["order"].transform("min")
    out = out.assign(group=first.astype(str)).sort_values(["group", "image_id"])
    return out[DUPLICATE_COLUMNS].reset_index(drop=True).astype({"image_id": "string", "group": "string", "kind": "string"})


def duplicate_summary(duplicates: pd.DataFrame) -> dict:
    """Groups and images, overall and by kind of group (a group is exact when all its members are exact twins)."""
    kinds = duplicates.groupby("group")["kind"].agg(lambda k: "exact" if (k == "exact").all() else "near")
    return {"groups": int(len(kinds)), "images": int(len(duplicates)),
            "exact_groups": int((kinds == "exact").sum()), "near_groups": int((kinds == "near").sum())}
