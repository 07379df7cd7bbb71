"""The seam for the InstantX FLUX.1-dev IP-Adapter: ComfyUI's Flux blocks <-> ip_adapter_core/flux_instantx.py.

Part of the seam package (it imports ComfyUI; nothing outside the seam does). The adapter has one processor per
Flux block, the model's double blocks first, then its single blocks, and each adds its term inside the
block's attention output:

* double block (`patches_replace["dit"][("double_block", i)]`): the term joins the image rows' attention
  output before img_attn.proj, so the MLP sees it; the block is computed here from its own modules, as
  ComfyUI's DoubleStreamBlock.forward computes it (its attention function with RoPE, its modulation op,
  its attn1 patches where the release has them), with the terms of every stacked application inside.
* single block (`("single_block", i)`): the block itself (or the replacement that was there) runs
  untouched and gate * linear2_attn(term) is added to its output, which is exact since linear2 is linear.

The query of both is the block's own q (q third of its qkv / linear1, through its q RMSNorm) before RoPE.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable, Sequence

import comfy.ldm.flux.layers as comfy_flux_layers
import comfy.ldm.flux.math as comfy_flux_math
import comfy.model_patcher
import comfy.utils
import torch
from einops import rearrange

from ...ip_adapter_core.flux_instantx import FluxInstantXApplication, block_term, pre_rope_query
from .. import comfy_seam as seam

log = logging.getLogger("ComfyUI-IPAdapter-Exact")

# term(img_q [B, N, hidden] normed, not rotated; transformer_options) -> [B, N, hidden] or None
DoubleTerm = Callable[[torch.Tensor, dict], "torch.Tensor | None"]


def _takes(function: Callable, name: str) -> bool:
    try:
        params = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


_ATTENTION_TAKES_OPTIONS = _takes(comfy_flux_math.attention, "transformer_options")


def _apply_mod(x: torch.Tensor, mult: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    # The block's own modulation op where this release has one (addcmul since 2025), else the formula.
    apply_mod = getattr(comfy_flux_layers, "apply_mod", None)
    if apply_mod is not None:
        return apply_mod(x, mult, add)
    return x * mult if add is None else x * mult + add


def check_fits_flux_instantx(model: comfy.model_patcher.ModelPatcher, adapter: seam.LoadedAdapter) -> None:
    """Refuse the adapter on a model that is not Flux, or one whose blocks it does not cover one for one."""
    spec, name = adapter.spec, seam._model_name(model)
    if not seam.is_flux_model(model):
        raise ValueError(
            f"{adapter.name} is an InstantX {spec.base_model} IP-Adapter ({spec.depth} Flux blocks) but the model is "
            f"{name}, not a Flux model: use it with FLUX.1 dev, or load an IP-Adapter made for {name}"
        )
    diffusion = model.model.diffusion_model
    double, single = len(diffusion.double_blocks), len(diffusion.single_blocks)
    if spec.depth != double + single:
        raise ValueError(
            f"{adapter.name} has {spec.depth} block processors but {name} has {double} double + {single} single "
            f"blocks = {double + single}: this adapter was made for a Flux model of another depth (FLUX.1: 19 + 38)"
        )
    rows = adapter.model.key_value(0).to_k_ip.weight.shape[0]
    hidden = diffusion.double_blocks[0].hidden_size
    if rows != hidden:
        raise ValueError(f"{adapter.name} gives {rows}-wide image keys but {name}'s blocks are {hidden} wide: this "
                         "adapter was made for another Flux model")


def _check_one_modulation_per_row(args: dict) -> None:
    """Refuse per-token modulation (ComfyUI 2025+: reference latents at timestep zero, `modulation_dims`): the
    replacement arguments do not carry those dims, so the block could not be computed as ComfyUI computes it."""
    vec, img = args["vec"], args["img"]
    if isinstance(vec, torch.Tensor) and vec.shape[0] != img.shape[0]:
        raise ValueError(
            f"the Flux model runs {vec.shape[0]} modulation vectors for {img.shape[0]} latents (reference latents at "
            "timestep zero, as Flux Kontext/Flux 2 edit models use): the InstantX FLUX.1 IP-Adapter cannot be "
            "applied to such a model call; use it without index_timestep_zero reference latents"
        )


def _double_block_modulation(block: torch.nn.Module, vec) -> tuple:
    if getattr(block, "modulation", True):
        return block.img_mod(vec), block.txt_mod(vec)
    return vec  # global modulation (Flux 2): ((img_mod1, img_mod2), (txt_mod1, txt_mod2))


def _qkv(attn: torch.nn.Module, x: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qkv = attn.qkv(x)
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.norm(q, k, v)
    return q, k, v


def flux_double_block(block: torch.nn.Module, args: dict, terms: Sequence[DoubleTerm]) -> dict:
    """A ComfyUI DoubleStreamBlock as its forward computes it, with `terms` added to the image rows'
    attention output before img_attn.proj. args: ComfyUI's patches_replace["dit"] arguments."""
    img, txt, vec, pe = args["img"], args["txt"], args["vec"], args["pe"]
    mask = args.get("attn_mask")
    options = args.get("transformer_options") or {}
    (img_mod1, img_mod2), (txt_mod1, txt_mod2) = _double_block_modulation(block, vec)
    heads = block.num_heads
    img_q, img_k, img_v = _qkv(block.img_attn, _apply_mod(block.img_norm1(img), 1 + img_mod1.scale, img_mod1.shift),
                               heads)
    txt_q, txt_k, txt_v = _qkv(block.txt_attn, _apply_mod(block.txt_norm1(txt), 1 + txt_mod1.scale, txt_mod1.shift),
                               heads)
    ip_query = rearrange(img_q, "b h n d -> b n (h d)")  # normed, before RoPE: what the adapter attends with
    flipped = getattr(block, "flipped_img_txt", False)
    first, second = ((img_q, img_k, img_v), (txt_q, txt_k, txt_v)) if flipped else ((txt_q, txt_k, txt_v),
                                                                                    (img_q, img_k, img_v))
    q, k, v = (torch.cat((a, b), dim=2) for a, b in zip(first, second, strict=True))
    patches = options.get("patches", {})
    extra = dict(options)
    if not flipped:
        extra["img_slice"] = [txt.shape[1], q.shape[2]]
    for patch in patches.get("attn1_patch", []):  # releases with attention patches in Flux blocks (2025+)
        out = patch(q, k, v, pe=pe, attn_mask=mask, extra_options=extra)
        q, k, v, pe, mask = (out.get("q", q), out.get("k", k), out.get("v", v), out.get("pe", pe),
                             out.get("attn_mask", mask))
    kwargs = {"transformer_options": options} if _ATTENTION_TAKES_OPTIONS else {}
    attn = comfy_flux_math.attention(q, k, v, pe=pe, mask=mask, **kwargs)
    for patch in patches.get("attn1_output_patch", []):
        attn = patch(attn, extra)
    if flipped:
        img_attn, txt_attn = attn[:, : img.shape[1]], attn[:, img.shape[1]:]
    else:
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]
    for term in terms:
        out = term(ip_query, options)
        if out is not None:
            img_attn = img_attn + out.to(img_attn.dtype)
    img = img + _apply_mod(block.img_attn.proj(img_attn), img_mod1.gate)
    img = img + _apply_mod(block.img_mlp(_apply_mod(block.img_norm2(img), 1 + img_mod2.scale, img_mod2.shift)),
                           img_mod2.gate)
    txt = txt + _apply_mod(block.txt_attn.proj(txt_attn), txt_mod1.gate)
    txt = txt + _apply_mod(block.txt_mlp(_apply_mod(block.txt_norm2(txt), 1 + txt_mod2.scale, txt_mod2.shift)),
                           txt_mod2.gate)
    if txt.dtype == torch.float16:
        txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
    return {"img": img, "txt": txt}


class _BlockPatch(seam.InnerPatchHooks):
    """What the double and single patches share: the application, gate, adapter, model and the inner
    replacement; ComfyUI's hooks (deepcopy, `.to()`, `.models()`) come from seam.InnerPatchHooks."""

    kind = ""

    def __init__(self, block_index: int, processor: int, application: FluxInstantXApplication,
                 gate: seam.ScheduleGate, adapter: seam.LoadedAdapter, base_model: torch.nn.Module,
                 inner: Callable | None):
        self.block_index = block_index
        self.processor = processor  # the adapter's processor number for this block
        self.application = application
        self.gate = gate
        self.adapter = adapter
        self._base_model = weakref.ref(base_model)
        self.inner = inner
        self._warned = False

    def _diffusion_model(self) -> torch.nn.Module:
        base_model = self._base_model()
        if base_model is None:
            raise RuntimeError("the Flux model this adapter was applied to is gone")
        return base_model.diffusion_model

    def term(self, q: torch.Tensor, options: dict) -> torch.Tensor | None:
        """The weighted image attention for this block's query [B, N, hidden], or None (window shut, weight 0)."""
        if not self.gate.is_open(options):
            return None
        codes = options.get("cond_or_uncond") or [seam.COMFY_COND]
        heads = self.application.heads
        return block_term(self.application, self.processor, q, heads, [c == seam.COMFY_COND for c in codes])

    def applications(self) -> list:
        """Every adapter application stacked on this block, innermost first."""
        inner = self.inner.applications() if hasattr(self.inner, "applications") else []
        return inner + [self.application]


class FluxInstantXDoubleBlockPatch(_BlockPatch):
    """`patches_replace["dit"][("double_block", i)]`: the block computed with the term inside (see the module
    docstring). Our stacked patches hand their terms inwards and the block runs once with all of them;
    another pack's replacement that was there first is called with our computation as its original_block
    (where it never runs it, our term is lost on that block and the log says so, once)."""

    kind = "double_block"

    def __call__(self, args: dict, extra: dict) -> dict:
        return self._run(args, extra, [])

    def _run(self, args: dict, extra: dict, outer: list[DoubleTerm]) -> dict:
        _check_one_modulation_per_row(args)
        terms = [self.term, *outer]
        if isinstance(self.inner, FluxInstantXDoubleBlockPatch):
            return self.inner._run(args, extra, terms)
        block = self._diffusion_model().double_blocks[self.block_index]
        return self._under_inner(args, extra, lambda block_args: flux_double_block(block, block_args, terms),
                                 f"Flux double block {self.block_index}")


def flux_single_block_query(block: torch.nn.Module, x: torch.Tensor, vec) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [B, N, hidden] normed and not rotated, the block's gate) of a ComfyUI SingleStreamBlock."""
    mod = block.modulation(vec)[0] if getattr(block, "modulation", None) is not None else vec
    norm = block.norm
    q = pre_rope_query(
        x, mod.shift, mod.scale, _apply_mod, block.pre_norm,
        seam._q_projection(block.linear1, block.hidden_size),
        lambda q: norm.query_norm(q).to(q.dtype),  # QKNorm hands q on in the qkv output's dtype
        block.num_heads,
    )
    return q, mod.gate


def _attention_part_of_linear2(linear2: torch.nn.Module, term: torch.Tensor) -> torch.Tensor:
    """linear2([term; 0]) without its bias: the term's share of the block's output projection."""
    weight, bias = linear2.weight, getattr(linear2, "bias", None)
    plain = (type(weight) in (torch.Tensor, torch.nn.Parameter) and weight.dtype == term.dtype
             and weight.device == term.device and not getattr(linear2, "comfy_cast_weights", False)
             and not getattr(linear2, "weight_function", None) and not getattr(linear2, "bias_function", None))
    if plain:
        return torch.nn.functional.linear(term, weight[:, : term.shape[-1]])
    # Cast, offloaded, quantised or LoRA-patched weights: through the module, so ComfyUI handles them.
    padded = torch.cat((term, term.new_zeros(*term.shape[:-1], weight.shape[1] - term.shape[-1])), dim=-1)
    out = linear2(padded)
    return out if bias is None else out - linear2(term.new_zeros(1, 1, weight.shape[1]))


class FluxInstantXSingleBlockPatch(_BlockPatch):
    """`patches_replace["dit"][("single_block", i)]`: the block (or the replacement that was there) runs
    untouched; gate * linear2_attn(term) is added to its output. The query is taken from the block's input
    before it runs: the block adds to its input in place."""

    kind = "single_block"

    def __call__(self, args: dict, extra: dict) -> dict:
        _check_one_modulation_per_row(args)
        options = args.get("transformer_options") or {}
        block = self._diffusion_model().single_blocks[self.block_index]
        added = None
        if self.gate.is_open(options):
            q, gate = flux_single_block_query(block, args["img"], args["vec"])
            term = self.term(q, options)
            if term is not None:
                added = _apply_mod(_attention_part_of_linear2(block.linear2, term.to(q.dtype)), gate)
        out = self.inner(args, extra) if self.inner is not None else extra["original_block"](args)
        if added is None:
            return out
        out = dict(out)
        out["img"] = out["img"] + added.to(out["img"].dtype)
        return out


def patch_flux_instantx(patched: comfy.model_patcher.ModelPatcher, adapter: seam.LoadedAdapter,
                        application: FluxInstantXApplication, gate: seam.ScheduleGate) -> None:
    """Our double- and single-block replacements on `patched` (a clone), over whatever was there."""
    diffusion = patched.model.diffusion_model
    double = len(diffusion.double_blocks)
    application.heads = diffusion.double_blocks[0].num_heads  # the image keys' RMSNorm is per head
    table = patched.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    for processor in range(adapter.spec.depth):
        cls, index = ((FluxInstantXDoubleBlockPatch, processor) if processor < double
                      else (FluxInstantXSingleBlockPatch, processor - double))
        patch = cls(index, processor, application, gate, adapter, patched.model, table.get((cls.kind, index)))
        patched.set_model_patch_replace(patch, "dit", cls.kind, index)


# --- SigLIP pooled encodings (the adapter's encoder) -----------------------------------------

CLIP_VISION_FOLDER = "clip_vision"
_SIGLIP_CACHE: dict[str, tuple[object, torch.nn.Module]] = {}  # path -> (file stamp, model): the last one used


def siglip_files() -> list[str]:
    return seam.list_files(CLIP_VISION_FOLDER)


def _siglip_model(name: str) -> torch.nn.Module:
    from ...models.siglip_pooled import build_siglip_pooled

    path = seam.full_path(CLIP_VISION_FOLDER, name)
    stamp = seam.disk_stamp(path)
    if stamp is None:
        raise FileNotFoundError(f"{name} is not in models/{CLIP_VISION_FOLDER} (any more)")
    cached = _SIGLIP_CACHE.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    model = build_siglip_pooled(comfy.utils.load_torch_file(path, safe_load=True), name)
    _SIGLIP_CACHE.clear()  # one SigLIP tower (400M parameters) kept at a time
    _SIGLIP_CACHE[path] = (stamp, model)
    return model


def siglip_pooled_encode(name: str, images: torch.Tensor, center_crop: bool) -> torch.Tensor:
    """[B, H, W, C] images in [0, 1] -> SigLIP so400m/384 pooled embeddings [B, 1152], float32, from the head-bearing
    clip_vision file `name`; ComfyUI's CLIP preprocessing at 384 px with SigLIP's mean/std (0.5)."""
    import comfy.clip_vision
    import comfy.model_management

    from ...models.siglip_pooled import MEAN, STD, siglip_pooled

    model = _siglip_model(name)
    device = comfy.model_management.get_torch_device()
    model.to(device)
    try:
        out = []
        bar = comfy.utils.ProgressBar(images.shape[0])
        for start in range(0, images.shape[0], 8):
            chunk = images[start : start + 8].to(device)
            pixels = comfy.clip_vision.clip_preprocess(chunk, size=384, mean=list(MEAN), std=list(STD),
                                                       crop=center_crop)
            out.append(siglip_pooled(model, pixels).float().to(comfy.model_management.intermediate_device()))
            bar.update(chunk.shape[0])
    finally:
        model.to(comfy.model_management.unet_offload_device())
    return torch.cat(out)
