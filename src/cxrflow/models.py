"""Model construction by name (timm or MONAI), one input channel, one logit; optional local pretrained weights.

Nothing is ever downloaded: `pretrained` is a local file path or nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cxrflow.errors import CxrflowError

MONAI_MODELS = {"EfficientNetBN", "DenseNet121"}


def build_model(spec: dict) -> torch.nn.Module:
    """spec: {library: timm|monai, name: ..., pretrained: path|null, dropout: float}."""
    library, name = spec.get("library", "timm"), spec["name"]
    if library == "timm":
        import timm

        if not timm.is_model(name):
            raise CxrflowError(f"model.name: {name!r} is not a timm model (see timm.list_models())")
        model = timm.create_model(name, pretrained=False, in_chans=1, num_classes=1, drop_rate=spec.get("dropout", 0.0))
    elif library == "monai":
        from monai.networks import nets

        if name == "EfficientNetBN":
            model = nets.EfficientNetBN(spec.get("variant", "efficientnet-b4"), pretrained=False, spatial_dims=2,
                                        in_channels=1, num_classes=1)
        elif name == "DenseNet121":
            model = nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=1, dropout_prob=spec.get("dropout", 0.0))
        else:
            raise CxrflowError(f"model.name: {name!r} is not one of the MONAI models {sorted(MONAI_MODELS)}")
    else:
        raise CxrflowError(f"model.library: {library!r}; choose timm or monai")
    if spec.get("pretrained"):
        load_pretrained(model, spec["pretrained"])
    return model


def load_trained(model_path: str | Path, spec: dict) -> torch.nn.Module:
    """A trained model.pt (a plain state dict, read without unpickling) in the architecture `spec` names, on the
    CPU, in eval mode."""
    model = build_model({**spec, "pretrained": None})
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as err:  # noqa: BLE001 - wrong architecture, a truncated, foreign or pickled file
        raise CxrflowError(f"{model_path}: not a {spec['name']} model from this pipeline: {str(err)[:300]}") from None
    return model.eval()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CxrflowError(f"model.pretrained: no such file: {path} (weights are never downloaded; give a local path)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CxrflowError(f"model.pretrained: cannot read {path}: {err}") from None
    for wrapper in ("state_dict", "model"):  # common checkpoint layouts
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CxrflowError(f"model.pretrained: {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained(model: torch.nn.Module, path: str | Path) -> None:
    """Load weights by name. RGB first convolutions are summed to one channel (as timm's adapt_input_conv does);
    the classifier, whose shape differs, is left as initialised. Anything else that does not fit is an error."""
    state = read_state_dict(path)
    own = model.state_dict()
    adapted, skipped = {}, []
    for key, value in state.items():
        if key not in own:
            continue
        target = own[key]
        if value.shape != target.shape and value.ndim == 4 and value.shape[1] == 3 and target.shape[1] == 1:
            value = value.sum(dim=1, keepdim=True)
        if value.shape != target.shape:
            skipped.append(f"{key} {tuple(value.shape)} vs {tuple(target.shape)}")
            continue
        adapted[key] = value
    missing = [k for k in own if k not in adapted]
    non_head = [k for k in missing if not any(h in k for h in ("classifier", "fc.", "head", "class_layers", "_fc"))]
    if non_head:
        raise CxrflowError(
            f"model.pretrained: {path} does not match the model: {len(non_head)} tensors missing or mismatched, "
            f"e.g. {non_head[:3]}; mismatched shapes: {skipped[:3]}"
        )
    model.load_state_dict(adapted, strict=False)
