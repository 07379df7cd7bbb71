"""Putting a file's tensors into a module built on the meta device: what every adapter model does the same way."""

from __future__ import annotations

import torch
from torch import nn

from ..ip_adapter_core.layout import AdapterFormatError, AdapterSpec


def checked_flat(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`{"image_proj": {...}, "ip_adapter": {...}}` as one flat `head.key` dict, refusing any tensor that is not
    floating point or holds NaN/inf (a damaged file, or not an IP-Adapter)."""
    flat = {f"{head}.{k}": v for head, sd in parts.items() for k, v in sd.items()}
    for name, tensor in flat.items():
        if not tensor.is_floating_point():
            raise AdapterFormatError(f"{name} holds {tensor.dtype} values; adapter weights are floating point "
                                     "(fp32, fp16 or bf16): the file is damaged or not an IP-Adapter")
        if not torch.isfinite(tensor).all():
            raise AdapterFormatError(f"{name} holds NaN or infinite values: the file is damaged")
    return flat


def assign_weights(model: nn.Module, flat: dict[str, torch.Tensor], spec: AdapterSpec) -> nn.Module:
    """The file's tensors assigned to `model` (every key, nothing missing or left over), frozen for inference."""
    try:
        model.load_state_dict(flat, strict=True, assign=True)
    except RuntimeError as e:
        raise AdapterFormatError(f"weights do not fit a {spec.describe()}: {e}") from e
    return model.eval().requires_grad_(False)
