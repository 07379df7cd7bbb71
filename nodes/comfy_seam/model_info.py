"""What a MODEL is: its name, its base family as the presets name it, its cross-attention widths."""

from __future__ import annotations

import comfy.model_patcher

from ...ip_adapter_core.layout import BASE_MODELS
from .unet import cross_attention_at


def base_model_of(model: comfy.model_patcher.ModelPatcher) -> str:
    """The base family of a MODEL as the presets name it ("SD1.5", "SDXL"), or its config's class name."""
    config = getattr(model.model, "model_config", None)
    context = None if config is None else config.unet_config.get("context_dim")
    bases = {768: "SD1.5", 2048: "SDXL"}
    if context in bases and hasattr(model.model, "diffusion_model") and hasattr(
            model.model.diffusion_model, "input_blocks"):
        return bases[context]
    return type(config).__name__ if config is not None else type(model.model).__name__


def cross_attention_rows(model: comfy.model_patcher.ModelPatcher, base_model: str) -> tuple[int, ...] | None:
    """The widths of the model's cross-attention layers in an adapter's layer order (None: not a known UNet)."""
    layers = BASE_MODELS.get(base_model, ((), 0))[0]
    rows = []
    for key in layers:
        attn2 = cross_attention_at(model, key)
        if attn2 is None:
            return None
        rows.append(attn2.to_k.weight.shape[0])
    return tuple(rows) or None


def _model_name(model: comfy.model_patcher.ModelPatcher) -> str:
    config = getattr(model.model, "model_config", None)
    return type(config).__name__ if config is not None else type(model.model).__name__
