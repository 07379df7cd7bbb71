"""FLUX.1 double blocks (XLabs): the patch that adds the image term after the block."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import comfy.ldm.flux.layers as comfy_flux_layers
import comfy.model_base
import comfy.model_patcher
import torch

from ...ip_adapter_core.attention import IPApplication
from ...ip_adapter_core.flux import double_block_term, pre_rope_image_query
from .gating import COMFY_COND, ScheduleGate
from .model_info import _model_name
from .weights import InnerPatchHooks, LoadedAdapter


def is_flux_model(model: comfy.model_patcher.ModelPatcher) -> bool:
    """Whether the MODEL is ComfyUI's Flux model class (FLUX.1 and its relatives) with double blocks."""
    return isinstance(model.model, comfy.model_base.Flux) and hasattr(model.model.diffusion_model, "double_blocks")


def check_fits_flux(model: comfy.model_patcher.ModelPatcher, adapter: LoadedAdapter) -> None:
    """Refuse a Flux adapter on a model that is not Flux (and the reverse), or one of another depth or width."""
    spec, name = adapter.spec, _model_name(model)
    if spec.is_flux and not is_flux_model(model):
        raise ValueError(
            f"{adapter.name} is an XLabs {spec.base_model} IP-Adapter ({spec.depth} double blocks) but the model is "
            f"{name}, not a Flux model: use it with a FLUX.1 model, or load an IP-Adapter made for {name}"
        )
    if not spec.is_flux:
        raise ValueError(
            f"{adapter.name} is an {spec.base_model} IP-Adapter (UNet cross-attention layers) but the model is {name}, "
            "a Flux model (double blocks): use an XLabs FLUX.1 IP-Adapter with it"
        )
    blocks = model.model.diffusion_model.double_blocks
    if len(blocks) != spec.depth:
        raise ValueError(
            f"{adapter.name} covers {spec.depth} double blocks but {name} has {len(blocks)}: this adapter was made "
            "for a Flux model of another depth"
        )
    rows = adapter.model.key_value(0).to_k_ip.weight.shape[0]
    hidden = blocks[0].hidden_size
    if rows != hidden:
        raise ValueError(
            f"{adapter.name} gives {rows}-wide image keys but {name}'s double blocks are {hidden} wide: this adapter "
            "was made for another Flux model"
        )


def _q_projection(qkv: torch.nn.Module, width: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> the q third of the block's qkv projection.

    Plain weights (no cast, no weight patch, no quantised tensor): one linear with the first `width`
    rows, a third of the work. Anything else goes through the module itself, so ComfyUI casts,
    offloads, dequantises and LoRA-patches the weights its own way, and the q third is kept.
    """

    def project(x: torch.Tensor) -> torch.Tensor:
        weight, bias = qkv.weight, getattr(qkv, "bias", None)
        plain = (type(weight) in (torch.Tensor, torch.nn.Parameter) and weight.dtype == x.dtype
                 and weight.device == x.device and not getattr(qkv, "comfy_cast_weights", False)
                 and not getattr(qkv, "weight_function", None) and not getattr(qkv, "bias_function", None))
        if plain:
            return torch.nn.functional.linear(x, weight[:width], None if bias is None else bias[:width])
        return qkv(x)[..., :width]

    return project


def _modulate(x: torch.Tensor, mult: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    # The block's own modulation op where this release has one (addcmul since 2025), else the formula.
    apply_mod = getattr(comfy_flux_layers, "apply_mod", None)
    return apply_mod(x, mult, add) if apply_mod is not None else x * mult + add


def flux_image_query(block: torch.nn.Module, img: torch.Tensor, vec) -> torch.Tensor:
    """The pre-RoPE, q-normed image query of a ComfyUI DoubleStreamBlock, from its own modules."""
    if getattr(block, "modulation", True):
        img_mod1 = block.img_mod(vec)[0]
    else:  # global modulation (Flux 2): vec is ((img_mod1, img_mod2), (txt_mod1, txt_mod2))
        img_mod1 = vec[0][0]
    norm = block.img_attn.norm
    return pre_rope_image_query(
        img, img_mod1.shift, img_mod1.scale, _modulate, block.img_norm1,
        _q_projection(block.img_attn.qkv, block.hidden_size),
        lambda q: norm.query_norm(q).to(q.dtype),  # QKNorm hands q on in the qkv output's dtype
        block.num_heads,
    )


class FluxDoubleBlockPatch(InnerPatchHooks):
    """ComfyUI's `patches_replace["dit"][("double_block", i)]` for one adapter on one double block.

    Runs the block (or `inner`, the replacement that was there before: ours or another pack's,
    which gets the same arguments and the original block) and adds the adapter's image term to
    its image output. The query is computed from the block's input before the block runs: the
    block adds to `img` in place.
    """

    def __init__(self, block_index: int, application: IPApplication, gate: ScheduleGate,
                 adapter: LoadedAdapter, base_model: torch.nn.Module, inner: Callable | None):
        self.block_index = block_index
        self.application = application
        self.gate = gate
        self.adapter = adapter
        self._base_model = weakref.ref(base_model)
        self.inner = inner

    def _block(self) -> torch.nn.Module:
        base_model = self._base_model()
        if base_model is None:
            raise RuntimeError("the Flux model this adapter was applied to is gone")
        return base_model.diffusion_model.double_blocks[self.block_index]

    def __call__(self, args: dict, extra: dict) -> dict:
        options = args.get("transformer_options") or {}
        term = None
        if self.gate.is_open(options):
            q = flux_image_query(self._block(), args["img"], args["vec"])
            codes = options.get("cond_or_uncond") or [COMFY_COND]
            term = double_block_term(self.application, self.block_index, q, [c == COMFY_COND for c in codes])
        out = self.inner(args, extra) if self.inner is not None else extra["original_block"](args)
        if term is None:
            return out
        out = dict(out)
        out["img"] = out["img"] + term.to(out["img"].dtype)
        return out

    def applications(self) -> list[IPApplication]:
        """Every adapter application stacked on this block, innermost first."""
        inner = self.inner.applications() if isinstance(self.inner, FluxDoubleBlockPatch) else []
        return inner + [self.application]


def _patch_flux_double_blocks(patched: comfy.model_patcher.ModelPatcher, adapter: LoadedAdapter,
                              application: IPApplication, gate: ScheduleGate) -> None:
    table = patched.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    for i in range(adapter.spec.depth):
        patch = FluxDoubleBlockPatch(i, application, gate, adapter, patched.model, table.get(("double_block", i)))
        patched.set_model_patch_replace(patch, "dit", "double_block", i)
