"""Grad-CAM (Selvaraju et al. 2017) for the one-logit classifiers, and the overlay figure of the report.

The heat map is the ReLU of the last convolutional feature map weighted by the spatially averaged gradient of
the logit. "Last convolutional feature map" is found by watching one forward pass: the last module without
children whose output is a 4-D tensor, pooling layers aside. That is the final activation of timm's ResNets and
EfficientNets and of MONAI's DenseNet121 and EfficientNetBN, so no architecture needs a layer name in config.
(monai.visualize.GradCAM does the same computation but needs that layer name.)
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

POOLING = (torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveMaxPool2d, torch.nn.AvgPool2d, torch.nn.MaxPool2d)


def _is_pooling(module: torch.nn.Module) -> bool:
    return isinstance(module, POOLING) or "pool" in type(module).__name__.lower()


def last_feature_module(model: torch.nn.Module, example: torch.Tensor) -> str:
    """The name of the module whose output Grad-CAM uses (see the module docstring)."""
    seen: list[str] = []
    hooks = [
        module.register_forward_hook(lambda _m, _i, out, name=name: seen.append(name) if torch.is_tensor(out) and out.ndim == 4 else None)
        for name, module in model.named_modules()
        if not list(module.children()) and not _is_pooling(module)
    ]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for hook in hooks:
            hook.remove()
    if not seen:
        raise ValueError(f"{type(model).__name__} has no module with a 4-D output to explain")
    return seen[-1]


def grad_cam(model: torch.nn.Module, x: torch.Tensor, layer: str | None = None) -> tuple[np.ndarray, np.ndarray, tuple]:
    """For a batch x (N, 1, H, W): heat maps in [0, 1] at the input's resolution (N, H, W), P(finding) (N,), and the
    (h, w) of the feature map, which bounds how finely the map can localise (1 x 1 cannot localise at all)."""
    model.eval()
    layer = layer or last_feature_module(model, x[:1])
    captured = {}

    def keep(_module, _inputs, output):
        captured["features"] = output

    hook = dict(model.named_modules())[layer].register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(x).float().squeeze(1)
            features = captured["features"]
            gradients = torch.autograd.grad(logits.sum(), features)[0]
    finally:
        hook.remove()
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * features).sum(dim=1, keepdim=True)).detach()
    cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    return (cam / peak).cpu().numpy(), torch.sigmoid(logits.detach()).cpu().numpy(), tuple(features.shape[-2:])


def pick_examples(test: pd.DataFrame, threshold: float, per_kind: int) -> pd.DataFrame:
    """The most confident true positives and false positives, and the most confidently missed positives (FN)."""
    predicted = test["prob"] >= threshold
    kinds = {
        "true positive": test[predicted & (test["label"] == 1)].sort_values("prob", ascending=False),
        "false positive": test[predicted & (test["label"] == 0)].sort_values("prob", ascending=False),
        "false negative": test[~predicted & (test["label"] == 1)].sort_values("prob", ascending=True),
    }
    return pd.concat([group.head(per_kind).assign(kind=kind) for kind, group in kinds.items()], ignore_index=True)


def plot_gradcam(images: np.ndarray, heat: np.ndarray, examples: pd.DataFrame, threshold: float, title: str, out_path,
                 per_kind: int, grid: tuple | None = None) -> None:
    """A grid: one row per kind (TP, FP, FN), the radiograph with its heat map laid over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ["true positive", "false positive", "false negative"]
    fig, axes = plt.subplots(len(kinds), per_kind, figsize=(2.2 * per_kind, 2.4 * len(kinds)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, kind in enumerate(kinds):
        chosen = np.flatnonzero(examples["kind"].to_numpy() == kind)
        axes[row, 0].text(-0.08, 0.5, kind, transform=axes[row, 0].transAxes, rotation=90, va="center", ha="right", fontsize=9)
        if not len(chosen):
            axes[row, 0].text(0.5, 0.5, "none on the test split", ha="center", va="center", fontsize=8,
                              transform=axes[row, 0].transAxes)
        for col, i in enumerate(chosen):
            ax = axes[row, col]
            ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
            ax.imshow(heat[i], cmap="jet", alpha=0.35, vmin=0, vmax=1)
            ax.set_title(f"p = {examples['prob'].iloc[i]:.2f}", fontsize=8)
    resolution = f"; {grid[0]} x {grid[1]} feature map" if grid else ""
    fig.suptitle(f"{title}: Grad-CAM on the test split (threshold {threshold:.2f}{resolution})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
