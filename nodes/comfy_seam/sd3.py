"""SD3.5 joint blocks (InstantX): the patch that adds the image term before post_attention."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from contextvars import ContextVar

import comfy.ldm.modules.diffusionmodules.mmdit as comfy_mmdit
import comfy.model_base
import comfy.model_patcher
import torch

from ...ip_adapter_core.sd3 import SD3Application
from .gating import COMFY_COND, ScheduleGate
from .model_info import _model_name
from .unet import _TAKES_TRANSFORMER_OPTIONS
from .weights import InnerPatchHooks, LoadedAdapter

log = logging.getLogger("ComfyUI-IPAdapter-Exact")


def is_sd3_model(model: comfy.model_patcher.ModelPatcher) -> bool:
    """Whether the MODEL is ComfyUI's SD3 model class (an MMDiT with joint blocks)."""
    return isinstance(model.model, comfy.model_base.SD3) and hasattr(model.model.diffusion_model, "joint_blocks")


def check_fits_sd3(model: comfy.model_patcher.ModelPatcher, adapter: LoadedAdapter) -> None:
    """Refuse an SD3 adapter on a model that is not SD3 (and the reverse), or one of another depth or width."""
    spec, name = adapter.spec, _model_name(model)
    if spec.is_sd3 and not is_sd3_model(model):
        raise ValueError(
            f"{adapter.name} is an InstantX {spec.base_model} IP-Adapter ({spec.depth} joint blocks, "
            f"{spec.context_dim} wide) but the model is {name}, not an SD3 model: use it with SD3.5 Large, or load an "
            f"IP-Adapter made for {name}"
        )
    if not spec.is_sd3:
        raise ValueError(
            f"{adapter.name} is an {spec.base_model} IP-Adapter but the model is {name}, an SD3 model (MMDiT joint "
            "blocks): use the InstantX SD3.5-Large IP-Adapter with it"
        )
    blocks = model.model.diffusion_model.joint_blocks
    x_block = blocks[0].x_block
    width = x_block.attn.qkv.weight.shape[1]
    head_dim = adapter.model.block(0).norm_q.weight.shape[0]
    if len(blocks) != spec.depth or width != spec.context_dim:
        raise ValueError(
            f"{adapter.name} covers {spec.depth} joint blocks {spec.context_dim} wide ({spec.base_model}) but {name} "
            f"has {len(blocks)} joint blocks {width} wide: this adapter was made for an SD3 model of another size"
        )
    if x_block.attn.head_dim != head_dim:
        raise ValueError(f"{adapter.name} normalises {head_dim}-wide heads but {name}'s heads are "
                         f"{x_block.attn.head_dim} wide: this adapter was made for another SD3 model")
    if any(b.x_block.x_block_self_attn or b.x_block.scale_mod_only for b in blocks):
        raise ValueError(f"{name} has MMDiT-X blocks (a second picture self-attention, as SD3.5 Medium): the InstantX "
                         "adapter is for SD3.5 Large's joint blocks")


# ComfyUI releases before mid-2025 call a joint-block replacement without transformer_options (no sigmas, no
# cond/uncond codes): an APPLY_MODEL wrapper on the patched clone keeps the model call's own options here.
_SD3_CALL_OPTIONS: ContextVar[dict | None] = ContextVar("ipadapter_exact_sd3_call_options", default=None)


SD3_WRAPPER_KEY = "ipadapter_exact_sd3"


def _hold_call_options(executor: Callable, x, t, c_concat=None, c_crossattn=None, control=None,
                       transformer_options: dict | None = None, **kwargs):
    """APPLY_MODEL wrapper: the call's transformer_options readable by the SD3 patches while it runs."""
    token = _SD3_CALL_OPTIONS.set(transformer_options)
    try:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    finally:
        _SD3_CALL_OPTIONS.reset(token)


def _hold_call_options_on(patched: comfy.model_patcher.ModelPatcher) -> None:
    import comfy.patcher_extension

    kind = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    held = patched.model_options["transformer_options"].get("wrappers", {}).get(kind, {}).get(SD3_WRAPPER_KEY)
    if not held:
        patched.add_wrapper_with_key(kind, SD3_WRAPPER_KEY, _hold_call_options)


def sd3_timesteps(base_model: torch.nn.Module, sigmas: torch.Tensor, rows: int) -> torch.Tensor:
    """The diffusion model's timestep for each of `rows` batch rows, from the sampler's sigmas with the
    sampling object the model runs with on this call (1000 * sigma for SD3): what the resampler and every
    norm_ip take. ComfyUI's sigmas hold one value per latent: the cond/uncond chunks repeat them."""
    timesteps = base_model.model_sampling.timestep(sigmas).float().flatten()
    if rows % timesteps.shape[0]:
        raise RuntimeError(f"{timesteps.shape[0]} sigmas for a batch of {rows}: cannot tell each row's timestep")
    return timesteps.repeat(rows // timesteps.shape[0])


def sd3_picture_projections(x_block: torch.nn.Module, x: torch.Tensor, c: torch.Tensor) -> tuple:
    """The picture side of a joint block's pre_attention, recomputed from the block's own modules.

    Returns (q_raw, k_raw, v) [B, N, heads, head_dim], the raw projections (the block's ln_q / ln_k are not
    in q_raw / k_raw: the adapter brings its own norms), and the intermediates post_attention takes.
    """
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = x_block.adaLN_modulation(c).chunk(6, dim=1)
    qkv = x_block.attn.qkv(comfy_mmdit.modulate(x_block.norm1(x), shift_msa, scale_msa))
    q_raw, k_raw, v = comfy_mmdit.split_qkv(qkv, x_block.attn.head_dim)
    return (q_raw, k_raw, v), (x, gate_msa, shift_mlp, scale_mlp, gate_mlp)


# term(q_raw, k_raw, v [B, N, hidden], heads, transformer_options) -> [B, N, hidden] or None
SD3Term = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, dict], "torch.Tensor | None"]


def sd3_joint_block(block: torch.nn.Module, args: dict, terms: Sequence[SD3Term]) -> dict:
    """A ComfyUI MMDiT JointBlock as its `_block_mixing` runs it, with `terms` added to the picture's
    joint-attention output before the picture's post_attention (output projection, gate, MLP).

    args: ComfyUI's patches_replace["dit"] arguments ({"img", "txt", "vec", "transformer_options"}).
    """
    x, context, c = args["img"], args["txt"], args["vec"]
    options = args.get("transformer_options") or _SD3_CALL_OPTIONS.get() or {}
    context_block, x_block = block.context_block, block.x_block
    context_qkv, context_intermediates = context_block.pre_attention(context, c)
    (q_raw, k_raw, v), x_intermediates = sd3_picture_projections(x_block, x, c)
    attn_x = x_block.attn
    flat = (q_raw.shape[0], q_raw.shape[1], -1)
    x_qkv = (attn_x.ln_q(q_raw).reshape(flat), attn_x.ln_k(k_raw).reshape(flat), v)
    qkv = [torch.cat((context_qkv[i], x_qkv[i]), dim=1) for i in range(3)]
    kwargs = {"transformer_options": options} if _TAKES_TRANSFORMER_OPTIONS else {}
    attn = comfy_mmdit.optimized_attention(*qkv, heads=attn_x.num_heads, **kwargs)
    split = context_qkv[0].shape[1]
    context_attn, x_attn = attn[:, :split], attn[:, split:]
    context = None if context_block.pre_only else context_block.post_attention(context_attn, *context_intermediates)
    for term in terms:
        out = term(q_raw.reshape(flat), k_raw.reshape(flat), v.reshape(flat), attn_x.num_heads, options)
        if out is not None:
            x_attn = x_attn + out.to(x_attn.dtype)
    return {"txt": context, "img": x_block.post_attention(x_attn, *x_intermediates)}


class SD3JointBlockPatch(InnerPatchHooks):
    """ComfyUI's `patches_replace["dit"][("double_block", i)]` for one adapter on one MMDiT joint block.

    The term has to join the picture's attention output before the block's output projection, so the
    block is computed here (`sd3_joint_block`), not run as a whole. Stacking: a patch of ours already on
    the block hands its term over, and the block runs once with every term. Another pack's replacement
    that was there first is called with our computation as its `original_block`: where it runs the
    original block, both apply; where it replaces the block outright, our term is lost on that block and
    the log says so (once per patch).
    """

    def __init__(self, block_index: int, application: SD3Application, gate: ScheduleGate,
                 adapter: LoadedAdapter, base_model: torch.nn.Module, inner: Callable | None):
        self.block_index = block_index
        self.application = application
        self.gate = gate
        self.adapter = adapter
        self._base_model = weakref.ref(base_model)
        self.inner = inner
        self._warned = False

    def _model(self) -> torch.nn.Module:
        base_model = self._base_model()
        if base_model is None:
            raise RuntimeError("the SD3 model this adapter was applied to is gone")
        return base_model

    def term(self, q_raw: torch.Tensor, k_raw: torch.Tensor, v: torch.Tensor, heads: int,
             options: dict) -> torch.Tensor | None:
        if not self.gate.is_open(options):
            return None
        sigmas = options.get("sigmas")
        if sigmas is None:
            raise RuntimeError("the SD3.5 IP-Adapter needs the sampler's sigmas in transformer_options (its image "
                               "tokens depend on the timestep); this model call came without them")
        codes = options.get("cond_or_uncond") or [COMFY_COND]
        timesteps = sd3_timesteps(self._model(), sigmas.to(q_raw.device), q_raw.shape[0])
        return self.application.block_term(self.block_index, q_raw, k_raw, v, heads, timesteps,
                                           [c == COMFY_COND for c in codes], call_key=sigmas)

    def __call__(self, args: dict, extra: dict) -> dict:
        return self._run(args, extra, [])

    def _run(self, args: dict, extra: dict, outer: list[SD3Term]) -> dict:
        terms = [self.term, *outer]
        if isinstance(self.inner, SD3JointBlockPatch):
            return self.inner._run(args, extra, terms)
        block = self._model().diffusion_model.joint_blocks[self.block_index]
        return self._under_inner(args, extra, lambda block_args: sd3_joint_block(block, block_args, terms),
                                 f"SD3 joint block {self.block_index}")

    def applications(self) -> list[SD3Application]:
        """Every adapter application stacked on this block, innermost first."""
        inner = self.inner.applications() if isinstance(self.inner, SD3JointBlockPatch) else []
        return inner + [self.application]


def _patch_sd3_joint_blocks(patched: comfy.model_patcher.ModelPatcher, adapter: LoadedAdapter,
                            application: SD3Application, gate: ScheduleGate) -> None:
    _hold_call_options_on(patched)
    table = patched.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    for i in range(adapter.spec.depth):
        patch = SD3JointBlockPatch(i, application, gate, adapter, patched.model, table.get(("double_block", i)))
        patched.set_model_patch_replace(patch, "dit", "double_block", i)
