"""Figures people look at instead of tables: QC histograms with thresholds, reject contact sheets, cohort flows."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cxrflow.io import save_figure  # noqa: E402

HISTOGRAM_METRICS = ["p50", "dynamic_range", "std", "clipped_white", "line_score", "autocorrelation", "polarity",
                     "entropy", "aspect", "clipped_black"]


def quality_histograms(metrics: pd.DataFrame, thresholds: dict, out_path) -> None:
    """One histogram per QC metric over the decodable images, with the configured thresholds drawn in (a value or a
    list of values per metric: p50 has a lower and an upper one)."""
    decoded = metrics[metrics["status"] == "ok"]
    fig, axes = plt.subplots(2, 5, figsize=(17, 6))
    for ax, metric in zip(axes.flat, HISTOGRAM_METRICS):
        values = decoded[metric].dropna() if metric in decoded else pd.Series(dtype=float)
        ax.hist(values, bins=40, color="0.6")
        limits = thresholds.get(metric)
        limits = [v for v in (limits if isinstance(limits, list) else [limits]) if v is not None]
        for n, value in enumerate(limits):
            ax.axvline(value, color="crimson", lw=1.5, label="threshold" if n == 0 else None)
        if limits:
            ax.legend(fontsize=7)
        ax.set_title(metric, fontsize=9)
    n_fail = int((~metrics["qc_pass"]).sum())
    fig.suptitle(f"QC metrics of {len(decoded)} decodable images; {n_fail} of {len(metrics)} rejected")
    fig.tight_layout()
    save_figure(fig, out_path, dpi=90)
    plt.close(fig)


def contact_sheets(metrics: pd.DataFrame, shard_files: dict[int, str], out_dir, per_sheet: int = 36) -> None:
    """A PNG grid of thumbnails of the rejected images, one sheet per reason (decode failures have no image)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rejected = metrics[~metrics["qc_pass"] & (metrics["status"] == "ok")]
    arrays = {s: np.load(f, mmap_mode="r") for s, f in shard_files.items()}
    for reason, group in rejected.groupby("qc_reason"):
        group = group.sort_values("image_id").head(per_sheet)
        title = f"rejected: {reason} ({int((rejected['qc_reason'] == reason).sum())} images)"
        fig = contact_sheet_figure([arrays[int(r["shard"])][int(r["row"])] for _, r in group.iterrows()],
                                   [str(i)[:14] for i in group["image_id"]], title)
        save_figure(fig, out_dir / f"{reason}.png", dpi=90)
        plt.close(fig)


# The sheet is never narrower than this (inches), so that its title fits when it holds one or two thumbnails.
MIN_SHEET_WIDTH = 4.0


def contact_sheet_figure(images: list[np.ndarray], labels: list[str], title: str):
    """Thumbnails in up to 6 columns under a title; the title wraps and the figure widens so that it is never
    clipped (a one-image sheet of 1.6 inches used to cut it on both sides)."""
    cols = max(1, min(6, len(images)))
    rows = max(1, int(np.ceil(len(images) / cols)))
    width = max(1.6 * cols, MIN_SHEET_WIDTH)
    fig, axes = plt.subplots(rows, cols, figsize=(width, 1.7 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label in zip(axes.flat, images, labels):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(label, fontsize=6)
    fig.suptitle("\n".join(textwrap.wrap(title, width=int(width * 11))), fontsize=9)
    fig.tight_layout()
    return fig


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
    save_figure(fig, out_path, dpi=90)
    plt.close(fig)


FLOW_STEP_TITLES = {
    "catalog": "Catalog", "view": "View", "sex": "Sex", "age": "Age", "quality": "Quality control",
    "exclusions": "Exclusion findings", "class": "Class definition", "balance": "Class balancing", "cap": "Cap per class",
}


def consort_figure(flow: pd.DataFrame, title: str, out_path) -> None:
    """One cohort's flow as a CONSORT diagram: a box per filter, top to bottom, with the images and patients that
    remain, and beside each arrow a box with what that filter removed and why."""
    n = len(flow)
    fig, ax = plt.subplots(figsize=(8.5, 1.05 * n + 0.9))
    ax.set_xlim(0, 1)
    ax.set_ylim(-(n - 1) - 0.6, 0.75)
    ax.axis("off")
    main_x, side_x = 0.27, 0.56
    for i, (_, r) in enumerate(flow.iterrows()):
        y = -i
        step = FLOW_STEP_TITLES.get(r["step"], r["step"])
        last = i == n - 1
        lines = [step if i == 0 else f"cohort, after: {step}" if last else f"after: {step}",
                 f"{int(r['images']):,} images, {int(r['patients']):,} patients"]
        if pd.notna(r["positives"]):
            lines.append(f"{int(r['positives']):,} positive / {int(r['negatives']):,} negative")
        ax.text(main_x, y, "\n".join(lines), ha="center", va="center", fontsize=8, fontweight="bold" if last else "normal",
                bbox=dict(boxstyle="round,pad=0.45", fc="#dbe8f5" if last else "white", ec="steelblue", lw=1.2))
        if i == 0:
            continue
        ax.annotate("", xy=(main_x, y + 0.3), xytext=(main_x, y + 0.7), arrowprops=dict(arrowstyle="-|>", color="0.3", lw=1))
        removed_images, removed_patients = int(r["removed_images"]), int(r["removed_patients"])
        y_mid = y + 0.5
        ax.annotate("", xy=(side_x - 0.01, y_mid), xytext=(main_x, y_mid), arrowprops=dict(arrowstyle="-|>", color="0.5", lw=0.8))
        text = (f"removed {removed_images:,} images ({removed_patients:,} patients)\n{r['reason']}" if removed_images
                else f"none removed\n{r['reason']}")
        ax.text(side_x, y_mid, text, ha="left", va="center", fontsize=7, color="black" if removed_images else "0.5",
                bbox=dict(boxstyle="square,pad=0.4", fc="#fbeaea" if removed_images else "0.96", ec="0.6", lw=0.8))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, out_path, dpi=100)
    plt.close(fig)
