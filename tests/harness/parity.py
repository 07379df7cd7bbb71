"""Parity with diffusers through ComfyUI's real sampling path, one CFG step at a time.

`comfy_cfg_step` runs a patched ComfyUI model the way the KSampler (Advanced) node does
(`comfy.sample.sample`: CFGGuider, calc_cond_batch, the model's own sigma <-> timestep mapping,
the Euler sampler) for exactly one step of a real schedule, and reads the step's CFG noise
prediction back from the sampler callback:  eps = (x - denoised) / sigma.
`diffusers_cfg_step` makes diffusers' UNet2DConditionModel do the same CFG step as its
pipelines do (negative half first, noise_pred_uncond + cfg * (noise_pred_text - noise_pred_uncond))
on the very UNet inputs ComfyUI fed its UNet (checked bit for bit: latents, prompts, timestep).
`sampler_parity` is the one comparison: the parity tests and their mutants all go through it.

Pairs come from `build_pair` here (not reference_unets.build_pair): the same two-implementation
idea, built on the meta device and filled in place, which is several times faster for the
860M-parameter SD1.5 UNet. `narrow=True` keeps a base model's topology (every cross-attention
layer, depths, heads of the same kind) with every level 320 wide: SD1.5 111M parameters instead
of 860M, SDXL 283M instead of 866M (reference_unets' reduced SDXL), which ComfyUI still detects
as SD15 / SDXL. Two fp32 copies of a full-width UNet take ~7 GB; on a 2-core machine a
full-width forward costs ~5x a narrow one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from tests.harness.reference_unets import (
    SD15_COMFY,
    SD15_UNET,
    SDXL_COMFY,
    SDXL_UNET,
    UNetPair,
    relative_difference,
)

TOLERANCE = 1e-4  # fp32, as tests/inprocess/test_parity_unet.py
FIGURES = os.path.join(os.path.dirname(__file__), "..", "..", "out", "parity.json")
COND, UNCOND = 0, 1  # ComfyUI's cond_or_uncond codes

# SD1.5's topology (4 levels, 16 cross-attention layers, 8 heads, context 768) with every level
# 320 wide: ComfyUI still detects it as SD15 (model_channels 320 is what it matches on).
SD15_NARROW_UNET = dict(SD15_UNET, block_out_channels=(320, 320, 320, 320))
SD15_NARROW_COMFY = dict(SD15_COMFY, channel_mult=[1, 1, 1, 1])
# SDXL's topology (cross-attention depths 2/10, linear proj_in, adm 2816, context 2048, 64-wide
# heads) with every level 320 wide: 70 cross-attention layers, 5 heads each.
SDXL_NARROW_UNET = dict(SDXL_UNET, block_out_channels=(320, 320, 320), attention_head_dim=(5, 5, 5))
SDXL_NARROW_COMFY = dict(SDXL_COMFY, channel_mult=[1, 1, 1])


def record(name: str, value: float) -> None:
    """Adds one figure to out/parity.json (the file test_parity_unet.py writes too), under a lock:
    test processes running side by side must not drop each other's figures."""
    import fcntl

    os.makedirs(os.path.dirname(FIGURES), exist_ok=True)
    with open(FIGURES + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        figures = _read_figures()
        figures[name] = value
        with open(FIGURES + ".tmp", "w") as f:
            json.dump(figures, f, indent=1, sort_keys=True)
        os.replace(FIGURES + ".tmp", FIGURES)


def _read_figures() -> dict:
    for _ in range(20):  # a writer without the lock may be half-way through the file
        if not os.path.exists(FIGURES):
            return {}
        try:
            with open(FIGURES) as f:
                return json.load(f)
        except ValueError:
            time.sleep(0.1)
    raise RuntimeError(f"{FIGURES} is not valid JSON")


# --- building the two UNets --------------------------------------------------------------------


def _configs(base_model: str, narrow: bool) -> tuple[dict, dict, int]:
    if base_model == "SD1.5":
        return (SD15_NARROW_UNET, SD15_NARROW_COMFY, 768) if narrow else (SD15_UNET, SD15_COMFY, 768)
    if base_model == "SDXL":
        return (SDXL_NARROW_UNET, SDXL_NARROW_COMFY, 2048) if narrow else (SDXL_UNET, SDXL_COMFY, 2048)
    raise ValueError(f"no configuration for {base_model} (narrow={narrow})")


def _diffusers_unet(config: dict, state_dict: dict[str, torch.Tensor] | None = None, meta: bool = False):
    """A diffusers UNet without initialisation cost: built on meta, then given `state_dict`'s tensors."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    assert not list(unet.buffers()), "the UNet has buffers, which assigning parameters would leave on meta"
    if meta:
        return unet
    unet.load_state_dict(state_dict, strict=True, assign=True)
    return unet.eval().requires_grad_(False)


def _fill(name: str, p: torch.Tensor, gen: torch.Generator) -> None:
    """N(0, 0.02) weights and biases; norms 1 + N(0, 0.1) / N(0, 0.1), so a swapped norm shows."""
    if "norm" in name:
        p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1, generator=gen)
    else:
        p.normal_(0.0, 0.02, generator=gen)


@contextlib.contextmanager
def _native_compute(enabled: bool) -> Iterator[None]:
    """ComfyUI on CPU runs fp16/bf16 weights through fp32 ("manual cast"); on a GPU with native
    half precision it computes in the weights' dtype. `enabled` loads a model the GPU way."""
    import comfy.model_management as mm

    original = mm.unet_manual_cast
    if enabled:
        mm.unet_manual_cast = lambda *args, **kwargs: None
    try:
        yield
    finally:
        mm.unet_manual_cast = original


def _comfy_unet(state_dict: dict[str, torch.Tensor], comfy_config: dict, dtype: torch.dtype, native: bool):
    import comfy.sd
    import comfy.utils

    mapping = comfy.utils.unet_to_diffusers(dict(comfy_config))
    missing = set(state_dict) - set(mapping)
    assert not missing, f"unmapped diffusers keys: {sorted(missing)[:5]}"
    ldm = {ldm_key: state_dict[key].to(dtype) for key, ldm_key in mapping.items() if key in state_dict}
    with _native_compute(native):
        patcher = comfy.sd.load_diffusion_model_state_dict(ldm, model_options={"dtype": dtype})
    assert patcher is not None, "ComfyUI did not detect the converted UNet"
    return patcher


def build_pair(base_model: str, seed: int = 0, narrow: bool = False, share_weights: bool = False) -> UNetPair:
    """One random fp32 UNet, as diffusers' UNet2DConditionModel and as ComfyUI's loaded model.

    ComfyUI loads the topology from shape-only (zero-stride) tensors, its weights are drawn in
    place in diffusers' parameter order, and diffusers gets copies of them (no third copy at any
    time). share_weights: diffusers gets the very tensors instead (a full-size SD1.5 pair is then
    ~3.5 GB instead of ~7 GB). Sound as long as nothing writes to the weights: ComfyUI does that
    only for weight patches (LoRA...), which `sampler_parity` refuses on a sharing pair, or when
    it casts them to another dtype or device, which `weights_shared` notices.
    """
    import comfy.utils

    config, comfy_config, context = _configs(base_model, narrow)
    unet = _diffusers_unet(config, meta=True)
    shapes = {name: torch.zeros((), dtype=torch.float32).expand(p.shape) for name, p in unet.named_parameters()}
    patcher = _comfy_unet(shapes, comfy_config, torch.float32, native=False)
    mapping = comfy.utils.unet_to_diffusers(dict(comfy_config))
    ours = dict(patcher.model.diffusion_model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    with torch.no_grad():
        for name in shapes:
            target = ours[mapping[name]]
            assert 0 not in target.stride() or target.numel() == 1, f"ComfyUI kept the shape-only tensor for {name}"
            _fill(name, target, gen)
            weights[name] = target if share_weights else target.clone()
    unet.load_state_dict(weights, strict=True, assign=True)
    unet.eval().requires_grad_(False)
    pair = UNetPair(base_model, unet, patcher, context)
    pair.narrow = narrow
    pair.shared = share_weights
    assert weights_shared(pair) == share_weights, "the two UNets' storage is not as asked"
    return pair


def weights_shared(pair: UNetPair) -> bool:
    """Whether ComfyUI's UNet holds the diffusers UNet's tensors (checked on the first and last layer)."""
    ours = pair.comfy.model.diffusion_model
    first = ours.input_blocks[0][0].weight.data_ptr() == pair.diffusers.conv_in.weight.data_ptr()
    last = ours.out[-1].weight.data_ptr() == pair.diffusers.conv_out.weight.data_ptr()
    return first and last


def derive_pair(pair: UNetPair, dtype: torch.dtype, compute: str) -> UNetPair:
    """The same weights in `dtype`, both sides.

    compute="native": both compute in `dtype` (ComfyUI as on a GPU with native fp16/bf16).
    compute="manual_cast": ComfyUI's CPU default for half weights (stored in `dtype`, computed
    in fp32); its diffusers twin is an fp32 UNet holding the `dtype`-rounded weights.
    """
    config, comfy_config, context = _configs(pair.base_model, getattr(pair, "narrow", False))
    weights = pair.diffusers.state_dict()
    if compute == "native":
        unet = _diffusers_unet(config, {k: v.to(dtype) for k, v in weights.items()})
        patcher = _comfy_unet(weights, comfy_config, dtype, native=True)
        assert patcher.model.manual_cast_dtype is None and patcher.model_dtype() == dtype
    elif compute == "manual_cast":
        unet = _diffusers_unet(config, {k: v.to(dtype).float() for k, v in weights.items()})
        patcher = _comfy_unet(weights, comfy_config, dtype, native=False)
        assert patcher.model.manual_cast_dtype == torch.float32 and patcher.model_dtype() == dtype, (
            "expected ComfyUI's CPU manual cast (weights in half precision, compute in fp32)")
    else:
        raise ValueError(compute)
    derived = UNetPair(pair.base_model, unet, patcher, context)
    derived.narrow = getattr(pair, "narrow", False)
    return derived


def compute_dtype(model) -> torch.dtype:
    """The dtype a ComfyUI model computes in (its manual-cast dtype where it has one)."""
    return model.model.manual_cast_dtype or model.model_dtype()


# --- adapters on the diffusers side ------------------------------------------------------------


def nested(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        head, rest = key.split(".", 1)
        out[head][rest] = value.clone()
    return out


def load_diffusers_adapter(unet, flat: dict[str, torch.Tensor], scale: float) -> None:
    """diffusers' own loader (weights converted to the UNet's dtype), then its per-processor scale."""
    unet._load_ip_adapter_weights([nested(flat)], low_cpu_mem_usage=False)
    for processor in unet.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [scale]


def unload_diffusers_adapter(unet) -> None:
    """As diffusers' IPAdapterMixin.unload_ip_adapter does it for the UNet."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    unet.encoder_hid_proj = None
    unet.register_to_config(encoder_hid_dim_type=None)
    unet.set_attn_processor({
        name: AttnProcessor2_0() if isinstance(proc, IPAdapterAttnProcessor2_0) else proc.__class__()
        for name, proc in unet.attn_processors.items()
    })


def hidden_sizes(unet) -> list[int]:
    """attn2 widths in diffusers' processor order: what an adapter's to_k_ip rows must be."""
    modules = dict(unet.named_modules())
    return [modules[name.removesuffix(".processor")].to_k.out_features
            for name in unet.attn_processors if name.endswith("attn2.processor")]


def encodings(kind: str, count: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-ins for CLIP outputs, cond and uncond, `count` references: what the reference feeds."""
    if kind == "plus":
        shape = (count, 257, 1280)
        return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    width = {"base": 1024, "sdxl_base": 1280}[kind]
    return torch.randn(count, width, generator=gen), torch.zeros(count, width)


# --- one CFG step ------------------------------------------------------------------------------


@dataclass
class CFGStep:
    """What both sides get: latents' noise, prompts, guidance, and which step of which schedule."""

    noise: torch.Tensor  # [B, 4, h, w]; the sampler starts from x = sigma * noise (empty latent)
    text_cond: torch.Tensor  # [1, 77, C]
    text_uncond: torch.Tensor
    cfg: float = 5.0
    steps: int = 20  # a "normal" schedule of this many steps ...
    step: int = 12  # ... of which this one runs
    pooled_cond: torch.Tensor | None = None  # SDXL: [1, 1280]
    pooled_uncond: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.noise.shape[0]

    @property
    def pixels(self) -> tuple[int, int]:
        return self.noise.shape[-2] * 8, self.noise.shape[-1] * 8


def make_step(pair: UNetPair, latent_hw: tuple[int, int], batch: int = 1, seed: int = 0, **kw) -> CFGStep:
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 4, *latent_hw, generator=gen)
    text_cond, text_uncond = (torch.randn(1, 77, pair.context_dim, generator=gen) for _ in range(2))
    pooled = {}
    if pair.base_model == "SDXL":
        pooled = {name: torch.randn(1, 1280, generator=gen) for name in ("pooled_cond", "pooled_uncond")}
    return CFGStep(noise, text_cond, text_uncond, **pooled, **kw)


@dataclass
class UNetCall:
    cond_or_uncond: list[int]
    x: torch.Tensor
    timesteps: torch.Tensor
    context: torch.Tensor


@dataclass
class ComfyStep:
    eps: torch.Tensor  # CFG noise prediction, fp32
    sigma: float
    calls: list[UNetCall] = field(default_factory=list)


def _conds(step: CFGStep, pooled: torch.Tensor | None, text: torch.Tensor) -> list:
    extra = {}
    if pooled is not None:
        height, width = step.pixels
        extra = dict(pooled_output=pooled, width=width, height=height, crop_w=0, crop_h=0,
                     target_width=width, target_height=height)
    return [[text, extra]]


def _cond_first(inner: Callable | None) -> Callable:
    """A model_function_wrapper that hands the UNet the batch's chunks in reverse order (ComfyUI
    itself puts uncond first), cond_or_uncond reversed to match, and restores the order after."""

    def wrapper(apply_model, args):
        x, codes = args["input"], list(args["cond_or_uncond"])
        n = len(codes)

        def flip(v):
            return torch.cat(v.chunk(n)[::-1]) if torch.is_tensor(v) and v.shape[0] == x.shape[0] and n > 1 else v

        c = {k: flip(v) for k, v in args["c"].items()}
        options = dict(c["transformer_options"])
        options["cond_or_uncond"] = codes[::-1]
        options["uuids"] = list(options.get("uuids", []))[::-1]
        c["transformer_options"] = options
        flipped = {"input": flip(x), "timestep": flip(args["timestep"]), "c": c, "cond_or_uncond": codes[::-1]}
        if inner is not None:
            out = inner(apply_model, flipped)
        else:
            out = apply_model(flipped["input"], flipped["timestep"], **c)
        return flip(out)

    return wrapper


def _one_call_per_cond(args) -> list:
    """calc_cond_batch as ComfyUI runs it when memory is short: it batches cond and uncond only if
    `memory_required(batch) * 1.5 < free memory`; a model that needs more than any free memory gets
    one UNet call per cond. (Free memory itself is left alone: the attention kernel reads it too.)"""
    import comfy.samplers

    model = args["model"]
    model.memory_required = lambda *a, **k: math.inf
    try:
        return comfy.samplers.calc_cond_batch(model, args["conds"], args["input"], args["sigma"], args["model_options"])
    finally:
        del model.memory_required


LAYOUTS = ("batched", "cond_first", "separate")
EXPECTED_CALLS = {"batched": [[UNCOND, COND]], "cond_first": [[COND, UNCOND]], "separate": [[UNCOND], [COND]]}


def comfy_cfg_step(model, step: CFGStep, layout: str = "batched") -> ComfyStep:
    """One step of ComfyUI's KSampler path on `model` (a ModelPatcher); the CFG eps it used."""
    import comfy.sample

    model = model.clone()
    if layout == "cond_first":
        model.set_model_unet_function_wrapper(_cond_first(model.model_options.get("model_function_wrapper")))
    elif layout == "separate":
        model.set_model_sampler_calc_cond_batch_function(_one_call_per_cond)
    elif layout != "batched":
        raise ValueError(layout)

    seen: dict[str, torch.Tensor] = {}

    def callback(i, denoised, x, total):
        seen.update(x=x.detach().clone(), denoised=denoised.detach().clone())

    calls: list[UNetCall] = []

    def capture(module, args, kwargs):
        x, timesteps = args[:2] if len(args) >= 2 else (args[0], kwargs["timesteps"])
        calls.append(UNetCall(list(kwargs["transformer_options"]["cond_or_uncond"]), x.detach().clone(),
                              timesteps.detach().clone(), kwargs["context"].detach().clone()))

    hook = model.model.diffusion_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        comfy.sample.sample(
            model, step.noise, step.steps, step.cfg, "euler", "normal",
            _conds(step, step.pooled_cond, step.text_cond), _conds(step, step.pooled_uncond, step.text_uncond),
            torch.zeros_like(step.noise), start_step=step.step, last_step=step.step + 1, force_full_denoise=True,
            callback=callback, disable_pbar=True, seed=0,
        )
    finally:
        hook.remove()
    sigma = float(step_sigma(model, step))
    eps = ((seen["x"].double() - seen["denoised"].double()) / sigma).float()
    assert torch.equal(seen["x"], step.noise * torch.tensor(sigma)), "the sampler did not start from sigma * noise"
    return ComfyStep(eps, sigma, calls)


def step_sigma(model, step: CFGStep) -> torch.Tensor:
    """sigma of `step` in ComfyUI's "normal" schedule for this model."""
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", step.steps)[step.step]


@dataclass
class UNetInputs:
    """The UNet inputs of one CFG step, in diffusers' batch order (negative half first)."""

    x: torch.Tensor  # [2B, 4, h, w], already scaled by 1/sqrt(sigma^2 + 1)
    timestep: float
    text: torch.Tensor  # [2B, 77, C]
    sigma: float


def unet_inputs(model, step: CFGStep) -> UNetInputs:
    """What ComfyUI's EPS model sampling feeds the UNet at this step, derived independently:
    x = sigma * noise, x_in = x / sqrt(sigma^2 + 1), and the timestep whose diffusers sigma
    (scaled-linear betas 0.00085..0.012, as the SD1.5/SDXL schedulers) is nearest in log space."""
    from diffusers import EulerDiscreteScheduler

    sigma = step_sigma(model, step)
    x = step.noise * sigma
    x_in = x / (sigma ** 2 + 1.0) ** 0.5
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sigmas = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5
    timestep = float((sigmas.log() - math.log(float(sigma))).abs().argmin())
    b = step.batch
    text = torch.cat([step.text_uncond.expand(b, -1, -1), step.text_cond.expand(b, -1, -1)])
    return UNetInputs(torch.cat([x_in, x_in]), timestep, text, float(sigma))


def check_inputs(result: ComfyStep, inputs: UNetInputs, step: CFGStep, dtype: torch.dtype) -> None:
    """Every UNet call of ComfyUI's step saw exactly the inputs handed to diffusers."""
    b = step.batch
    halves = {UNCOND: slice(0, b), COND: slice(b, 2 * b)}
    for call in result.calls:
        expected_x = torch.cat([inputs.x[halves[c]] for c in call.cond_or_uncond]).to(dtype)
        expected_text = torch.cat([inputs.text[halves[c]] for c in call.cond_or_uncond]).to(dtype)
        assert torch.equal(call.x, expected_x), f"latents differ in the UNet call {call.cond_or_uncond}"
        assert torch.equal(call.context, expected_text), f"prompts differ in the UNet call {call.cond_or_uncond}"
        assert torch.all(call.timesteps == inputs.timestep), (
            f"ComfyUI's timesteps {call.timesteps.tolist()} are not {inputs.timestep} (sigma {inputs.sigma})")


def diffusers_cfg_step(unet, step: CFGStep, inputs: UNetInputs, image_embeds: torch.Tensor | None = None,
                       ip_masks: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers' UNet on the same inputs, combined as its pipelines do CFG (in fp32)."""
    dtype = unet.dtype
    b = step.batch
    added = {}
    if image_embeds is not None:
        added["image_embeds"] = [image_embeds.to(dtype)]
    if step.pooled_cond is not None:
        height, width = step.pixels
        added["text_embeds"] = torch.cat([step.pooled_uncond.expand(b, -1), step.pooled_cond.expand(b, -1)]).to(dtype)
        added["time_ids"] = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype).repeat(2 * b, 1)
    kwargs = {} if ip_masks is None else {"cross_attention_kwargs": {"ip_adapter_masks": [ip_masks]}}
    timesteps = torch.full((2 * b,), inputs.timestep)
    eps = unet(inputs.x.to(dtype), timesteps, inputs.text.to(dtype), added_cond_kwargs=added, **kwargs).sample
    uncond, cond = eps.float().chunk(2)
    return uncond + step.cfg * (cond - uncond)


@dataclass
class Reference:
    """diffusers' CFG eps for one step, and the UNet inputs it was computed on."""

    step: CFGStep
    inputs: UNetInputs
    eps: torch.Tensor
    pair: UNetPair | None = None


def reference(pair: UNetPair, step: CFGStep, **kwargs) -> Reference:
    inputs = unet_inputs(pair.comfy, step)
    return Reference(step, inputs, diffusers_cfg_step(pair.diffusers, step, inputs, **kwargs), pair)


def sampler_parity(model, ref: Reference, layout: str = "batched") -> tuple[float, ComfyStep]:
    """max |ours - diffusers| / max |diffusers| of the CFG eps, `model` run through ComfyUI's sampler.

    Also checks that ComfyUI called its UNet in the expected layout, on diffusers' inputs."""
    if getattr(ref.pair, "shared", False):
        assert not model.patches, "weight patches on a pair that shares its weights with diffusers"
    result = comfy_cfg_step(model, ref.step, layout)
    if getattr(ref.pair, "shared", False):
        assert weights_shared(ref.pair), "ComfyUI replaced the shared weights (cast or moved them)"
    got = [call.cond_or_uncond for call in result.calls]
    assert got == EXPECTED_CALLS[layout], f"{layout}: ComfyUI called the UNet as {got}"
    check_inputs(result, ref.inputs, ref.step, compute_dtype(model))
    return relative_difference(result.eps, ref.eps), result


# --- the pack ----------------------------------------------------------------------------------


def pack_api():
    """(apply_adapter, ADAPTERS, ImageEmbeds) from the pack, where they live now."""
    from ipadapter_pack.ip_adapter_core.embeds import ImageEmbeds
    from ipadapter_pack.nodes.apply import apply_adapter
    from ipadapter_pack.nodes.comfy_seam import ADAPTERS

    return apply_adapter, ADAPTERS, ImageEmbeds


def attn2_table(model) -> dict:
    return model.model_options["transformer_options"]["patches_replace"]["attn2"]


def applications(model) -> list:
    """The adapter applications a patched model carries (one per Apply)."""
    found = []
    for patch in attn2_table(model).values():
        for app in patch.applications():
            if all(app is not other for other in found):
                found.append(app)
    return found


@contextlib.contextmanager
def spy_key_values(application) -> Iterator[list[dict]]:
    """Records, per layer call, the dtype/device of the queries and of the image K/V used."""
    seen: list[dict] = []
    original = application.key_values

    def spy(layer_index, like):
        out = original(layer_index, like)
        seen.append({"layer": layer_index, "q": (like.dtype, like.device),
                     "kv": [(t.dtype, t.device) for t in out]})
        return out

    application.key_values = spy
    try:
        yield seen
    finally:
        del application.key_values
