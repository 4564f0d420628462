"""Figures people look at instead of tables: QC histograms with thresholds, reject contact sheets, cohort flows."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

HISTOGRAM_METRICS = ["p50", "dynamic_range", "std", "clipped_white", "line_score", "entropy", "aspect", "clipped_black"]


def quality_histograms(metrics: pd.DataFrame, thresholds: dict, out_path) -> None:
    """One histogram per QC metric over the decodable images, with the configured threshold drawn in."""
    decoded = metrics[metrics["status"] == "ok"]
    fig, axes = plt.subplots(2, 4, figsize=(14, 6))
    for ax, metric in zip(axes.flat, HISTOGRAM_METRICS):
        values = decoded[metric].dropna()
        ax.hist(values, bins=40, color="0.6")
        if thresholds.get(metric) is not None:
            ax.axvline(thresholds[metric], color="crimson", lw=1.5, label="threshold")
            ax.legend(fontsize=7)
        ax.set_title(metric, fontsize=9)
    n_fail = int((~metrics["qc_pass"]).sum())
    fig.suptitle(f"QC metrics of {len(decoded)} decodable images; {n_fail} of {len(metrics)} rejected")
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)


def contact_sheets(metrics: pd.DataFrame, shard_files: dict[int, str], out_dir, per_sheet: int = 36) -> None:
    """A PNG grid of thumbnails of the rejected images, one sheet per reason (decode failures have no image)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rejected = metrics[~metrics["qc_pass"] & (metrics["status"] == "ok")]
    arrays = {s: np.load(f, mmap_mode="r") for s, f in shard_files.items()}
    for reason, group in rejected.groupby("qc_reason"):
        group = group.sort_values("image_id").head(per_sheet)
        cols = min(6, len(group))
        rows = int(np.ceil(len(group) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (_, r) in zip(axes.flat, group.iterrows()):
            ax.imshow(arrays[int(r["shard"])][int(r["row"])], cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{r['image_id'][:14]}", fontsize=6)
        fig.suptitle(f"rejected: {reason} ({int((rejected['qc_reason'] == reason).sum())} images)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / f"{reason}.png", dpi=90)
        plt.close(fig)


def flow_figure(flows: dict[str, pd.DataFrame], out_path) -> None:
    """CONSORT-style: images remaining after each filter, one panel per cohort, removals annotated."""
    n = len(flows)
    cols = min(3, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, flow) in zip(axes.flat, sorted(flows.items())):
        ax.axis("on")
        y = np.arange(len(flow))[::-1]
        ax.barh(y, flow["images"], color="steelblue")
        for yi, (_, r) in zip(y, flow.iterrows()):
            text = f"{int(r['images'])} img / {int(r['patients'])} pt"
            if r["removed_images"]:
                text += f"  (-{int(r['removed_images'])})"
            ax.text(0, yi, " " + text, va="center", fontsize=7, color="white" if r["images"] > flow["images"].max() * 0.5 else "black")
        ax.set_yticks(y, flow["step"], fontsize=7)
        final = flow.iloc[-1]
        ax.set_title(f"{name}: {int(final['positives'])} pos / {int(final['negatives'])} neg", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
