"""SD1.5/SDXL: the attn2 patch (ComfyUI's calling convention -> explicit core arguments)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_patcher
import torch

from ...ip_adapter_core.attention import IPApplication
from ...ip_adapter_core.layout import BlockKey
from .gating import COMFY_COND, ScheduleGate
from .weights import InnerPatchHooks, LoadedAdapter


def _attention_takes_transformer_options() -> bool:
    try:
        params = inspect.signature(comfy_attention.optimized_attention).parameters
    except (TypeError, ValueError):
        return True
    return "transformer_options" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def text_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """ComfyUI's own attention kernel, exactly as an unpatched layer would call it."""
    kwargs = {"attn_precision": extra_options.get("attn_precision")}
    if _TAKES_TRANSFORMER_OPTIONS:
        kwargs["transformer_options"] = extra_options
    return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"], **kwargs)


_TAKES_TRANSFORMER_OPTIONS = _attention_takes_transformer_options()


class Attn2Patch(InnerPatchHooks):
    """ComfyUI's attn2 replacement for one layer: the inner attention plus one adapter's term.

    `inner` is what computed this layer's attention before: ComfyUI's kernel, another of our
    applications, or another pack's patch; it is called exactly once and its output kept.
    """

    def __init__(self, layer_index: int, application: IPApplication, gate: ScheduleGate,
                 adapter: LoadedAdapter, inner: Callable):
        self.layer_index = layer_index
        self.application = application
        self.gate = gate
        self.adapter = adapter
        self.inner = inner

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        out = self.inner(q, k, v, extra_options)
        if not self.gate.is_open(extra_options):
            return out
        codes = extra_options.get("cond_or_uncond") or [COMFY_COND]
        shape = extra_options.get("original_shape")
        term = self.application.image_term(
            self.layer_index, q, extra_options["n_heads"], [c == COMFY_COND for c in codes],
            latent_hw=None if shape is None else (shape[-2], shape[-1]),
        )
        return out if term is None else out + term.to(out.dtype)

    def applications(self) -> list[IPApplication]:
        """Every adapter application stacked on this layer, innermost first."""
        inner = self.inner.applications() if isinstance(self.inner, Attn2Patch) else []
        return inner + [self.application]


def cross_attention_at(model: comfy.model_patcher.ModelPatcher, key: BlockKey) -> torch.nn.Module | None:
    """The attn2 module of ComfyUI block `key`, or None if the UNet has no such layer."""
    unet = model.model.diffusion_model
    name, block_id, index = key
    if name == "middle":
        block = getattr(unet, "middle_block", None)
    else:
        seq = getattr(unet, f"{name}_blocks", None)
        block = seq[block_id] if seq is not None and block_id < len(seq) else None
    if block is None:
        return None
    for module in block:
        layers = getattr(module, "transformer_blocks", None)
        if layers is not None and index < len(layers):
            return getattr(layers[index], "attn2", None)
    return None
