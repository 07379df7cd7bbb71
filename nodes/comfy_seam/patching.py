"""Checking a model against an adapter and patching a clone, for every family."""

from __future__ import annotations

import comfy.model_patcher

from ...ip_adapter_core.attention import IPApplication
from ...ip_adapter_core.schedule import ScheduleWindow
from ...ip_adapter_core.sd3 import SD3Application
from .flux import _patch_flux_double_blocks, check_fits_flux, is_flux_model
from .gating import ScheduleGate
from .sd3 import _patch_sd3_joint_blocks, check_fits_sd3, is_sd3_model
from .unet import Attn2Patch, cross_attention_at, text_attention
from .weights import ADDITIONAL_MODELS_KEY, LoadedAdapter


def check_fits(model: comfy.model_patcher.ModelPatcher, adapter: LoadedAdapter) -> None:
    """Refuse, before anything is patched, an adapter whose layers the model does not have."""
    if adapter.spec.is_flux_instantx:
        from .flux_instantx import check_fits_flux_instantx  # imports this module

        check_fits_flux_instantx(model, adapter)
        return
    if adapter.spec.is_sd3 or is_sd3_model(model):
        check_fits_sd3(model, adapter)
        return
    if adapter.spec.is_flux or is_flux_model(model):
        check_fits_flux(model, adapter)
        return
    spec = adapter.spec
    config = getattr(model.model, "model_config", None)
    model_name = type(config).__name__ if config is not None else type(model.model).__name__
    context = None if config is None else config.unet_config.get("context_dim")
    if context is not None and context != spec.context_dim:
        raise ValueError(
            f"{adapter.name} is an {spec.base_model} adapter (text context {spec.context_dim}) but the model is "
            f"{model_name} (context {context}): load an IP-Adapter made for {model_name}"
        )
    for i, key in enumerate(spec.layers):
        attn2 = cross_attention_at(model, key)
        rows = adapter.model.key_value(i).to_k_ip.weight.shape[0]
        if attn2 is None:
            raise ValueError(
                f"{adapter.name} ({spec.base_model}) patches cross-attention {key}, which {model_name} does not have: "
                f"use an IP-Adapter made for this model's architecture"
            )
        if attn2.to_k.weight.shape[0] != rows:
            raise ValueError(
                f"{adapter.name} gives {rows}-wide image keys at {key} but the model's layer is "
                f"{attn2.to_k.weight.shape[0]} wide: this adapter was made for another UNet"
            )


def patch_model(model: comfy.model_patcher.ModelPatcher, adapter: LoadedAdapter,
                application: IPApplication | SD3Application,
                window: ScheduleWindow) -> comfy.model_patcher.ModelPatcher:
    """A clone of `model` with the image path on every cross-attention layer the adapter covers.

    A patch already on a layer (another adapter, or another pack's) becomes the inner attention
    of ours, so applications stack. The input model is not changed.
    """
    check_fits(model, adapter)
    patched = model.clone()
    if not hasattr(patched, "model_patches_models"):
        # Releases before 2025 do not load what a patch's models() lists: hand the adapter's weights
        # to model management as an additional model instead, so they load and offload with the UNet.
        known = patched.get_additional_models_with_key(ADDITIONAL_MODELS_KEY)
        patched.set_additional_models(ADDITIONAL_MODELS_KEY, known + [adapter.patcher])
    gate = ScheduleGate(window, patched.model)
    if adapter.spec.is_flux_instantx:
        from .flux_instantx import patch_flux_instantx  # imports this module

        patch_flux_instantx(patched, adapter, application, gate)
        return patched
    if adapter.spec.is_flux:
        _patch_flux_double_blocks(patched, adapter, application, gate)
        return patched
    if adapter.spec.is_sd3:
        _patch_sd3_joint_blocks(patched, adapter, application, gate)
        return patched
    table = patched.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    for i, key in enumerate(adapter.spec.layers):
        inner = table.get(key) or table.get(key[:2]) or text_attention
        patched.set_model_attn2_replace(Attn2Patch(i, application, gate, adapter, inner), *key)
    return patched
