"""FLUX.1 parity with diffusers through ComfyUI's sampler path, one CFG step at a time.

The Flux counterpart of tests/harness/parity.py (which is UNet-shaped): `comfy_flux_step` runs a
(patched) ComfyUI Flux MODEL the way the KSampler (Advanced) node does (`comfy.sample.sample`:
CFGGuider, calc_cond_batch, Flux's model sampling, the Euler sampler) for exactly one step of a
real schedule, reads the step's CFG prediction back from the sampler callback
(v = (x - denoised) / sigma: Flux's CONST sampling has denoised = x - sigma * v), and records what
the diffusion model was called with. `diffusers_flux_step` gives diffusers' FluxTransformer2DModel
those very inputs, packed the way its pipelines pack them (latents `b c (h 2) (w 2) -> b (h w)
(c 2 2)`, img_ids (0, row, col), txt_ids zeros), with the same sigma and guidance (each side scales
both by 1000 inside), negative half first, and combines CFG as the pipelines do.

The stand-in transformer (tests/fixtures/flux_models.py) is FLUX.1 at real width and reduced depth;
both sides load it in fp32 from the same bf16 file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from einops import rearrange

from tests.harness.reference_unets import relative_difference

TOLERANCE = 1e-4  # fp32, as the UNet parity tests
COND, UNCOND = 0, 1  # ComfyUI's cond_or_uncond codes


@dataclass
class FluxPair:
    diffusers: torch.nn.Module  # FluxTransformer2DModel, fp32
    comfy: object  # ModelPatcher of ComfyUI's Flux, fp32


def build_flux_pair(path) -> FluxPair:
    """The stand-in transformer file loaded by diffusers and by ComfyUI (`load_diffusion_model`), fp32."""
    import comfy.sd
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    from tests.fixtures.flux_models import FLUX_REDUCED_CONFIG

    patcher = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32})
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FLUX_REDUCED_CONFIG)
    weights = {k: v.float() for k, v in load_file(str(path)).items()}
    transformer.load_state_dict(weights, strict=True, assign=True)
    del weights
    return FluxPair(transformer.eval().requires_grad_(False), patcher)


@dataclass
class FluxStep:
    """What both sides get: latents' noise, prompts, guidance, and which step of which schedule."""

    noise: torch.Tensor  # [B, 16, h, w]
    text_cond: torch.Tensor  # [1, L, 4096] (T5 states)
    text_uncond: torch.Tensor
    pooled_cond: torch.Tensor  # [1, 768] (CLIP-L pooled)
    pooled_uncond: torch.Tensor
    guidance: float = 3.5
    cfg: float = 3.0  # != 1, so ComfyUI runs the negative too (batched with the positive)
    steps: int = 8  # a "simple" schedule of this many steps ...
    step: int = 3  # ... of which this one runs

    @property
    def batch(self) -> int:
        return self.noise.shape[0]


def make_flux_step(latent_hw: tuple[int, int], batch: int = 1, seed: int = 0, text_tokens: int = 8,
                   **kw) -> FluxStep:
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 16, *latent_hw, generator=gen)
    text = [torch.randn(1, text_tokens, 4096, generator=gen) for _ in range(2)]
    pooled = [torch.randn(1, 768, generator=gen) for _ in range(2)]
    return FluxStep(noise, text[0], text[1], pooled[0], pooled[1], **kw)


@dataclass
class FluxCall:
    """One call of ComfyUI's Flux diffusion model: its inputs as the sampler built them."""

    cond_or_uncond: list[int]
    x: torch.Tensor  # [n, 16, h, w]
    timesteps: torch.Tensor
    context: torch.Tensor
    y: torch.Tensor
    guidance: torch.Tensor


@dataclass
class ComfyFluxStep:
    eps: torch.Tensor  # CFG prediction (velocity), [B, 16, h, w], fp32
    sigma: float
    calls: list[FluxCall] = field(default_factory=list)


def step_sigma(model, step: FluxStep) -> float:
    import comfy.samplers

    sampling = model.get_model_object("model_sampling")
    return float(comfy.samplers.calculate_sigmas(sampling, "simple", step.steps)[step.step])


def comfy_flux_step(model, step: FluxStep) -> ComfyFluxStep:
    """One step of ComfyUI's KSampler path on a Flux `model` (a ModelPatcher): the CFG prediction it used."""
    import comfy.sample

    model = model.clone()
    seen: dict[str, torch.Tensor] = {}

    def callback(i, denoised, x, total):
        seen.update(x=x.detach().clone(), denoised=denoised.detach().clone())

    calls: list[FluxCall] = []

    def capture(module, args, kwargs):
        names = ("x", "timestep", "context", "y", "guidance")
        got = dict(zip(names, args, strict=False)) | {k: kwargs[k] for k in names if k in kwargs}
        calls.append(FluxCall(list(kwargs["transformer_options"]["cond_or_uncond"]), got["x"].detach().clone(),
                              got["timestep"].detach().clone(), got["context"].detach().clone(),
                              got["y"].detach().clone(), got["guidance"].detach().clone()))

    def conds(text, pooled):
        return [[text, {"pooled_output": pooled, "guidance": step.guidance}]]

    hook = model.model.diffusion_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        comfy.sample.sample(
            model, step.noise, step.steps, step.cfg, "euler", "simple",
            conds(step.text_cond, step.pooled_cond), conds(step.text_uncond, step.pooled_uncond),
            torch.zeros_like(step.noise), start_step=step.step, last_step=step.step + 1, force_full_denoise=True,
            callback=callback, disable_pbar=True, seed=0,
        )
    finally:
        hook.remove()
    sigma = step_sigma(model, step)
    eps = ((seen["x"].double() - seen["denoised"].double()) / sigma).float()
    return ComfyFluxStep(eps, sigma, calls)


@dataclass
class FluxInputs:
    """The diffusion-model inputs of one CFG step in diffusers' batch order (negative half first)."""

    x: torch.Tensor  # [2B, 16, h, w]
    sigma: float
    guidance: float
    text: torch.Tensor  # [2B, L, 4096]
    pooled: torch.Tensor  # [2B, 768]


def inputs_of(result: ComfyFluxStep, step: FluxStep) -> FluxInputs:
    """The inputs ComfyUI's sampler gave its Flux model, checked against the step, negatives first."""
    assert [c.cond_or_uncond for c in result.calls] == [[UNCOND, COND]], (
        f"expected one batched call, negative first; ComfyUI called {[c.cond_or_uncond for c in result.calls]}")
    call = result.calls[0]
    b = step.batch
    x_uncond, x_cond = call.x.chunk(2)
    assert torch.equal(x_uncond, x_cond), "the two halves of the batch got different latents"
    assert torch.all(call.timesteps == torch.tensor(result.sigma, dtype=call.timesteps.dtype)), (
        f"Flux timesteps {call.timesteps.tolist()} are not sigma {result.sigma}")
    assert torch.all(call.guidance == step.guidance), f"guidance {call.guidance.tolist()} is not {step.guidance}"
    expected_text = torch.cat([step.text_uncond.expand(b, -1, -1), step.text_cond.expand(b, -1, -1)])
    expected_pooled = torch.cat([step.pooled_uncond.expand(b, -1), step.pooled_cond.expand(b, -1)])
    assert torch.equal(call.context, expected_text), "the prompts are not the step's"
    assert torch.equal(call.y, expected_pooled), "the pooled prompts are not the step's"
    return FluxInputs(call.x, result.sigma, step.guidance, call.context, call.y)


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] latents -> [B, (h/2)(w/2), C*4] tokens, as diffusers' Flux pipelines pack them."""
    return rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack(tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    h, w = hw
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h // 2, w=w // 2, ph=2, pw=2)


def image_ids(hw: tuple[int, int]) -> torch.Tensor:
    """(0, row, col) per packed token, as diffusers' `_prepare_latent_image_ids`."""
    h, w = hw[0] // 2, hw[1] // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def diffusers_flux_step(transformer, inputs: FluxInputs, cfg: float,
                        image_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers' transformer on the same inputs, CFG combined as its pipelines do: [B, 16, h, w].

    image_embeds: [2B, n_images, 768] (negative half first) for the loaded IP-Adapter, or None.
    """
    hw = tuple(inputs.x.shape[-2:])
    n = inputs.x.shape[0]
    kwargs = {}
    if image_embeds is not None:
        kwargs["joint_attention_kwargs"] = {"ip_adapter_image_embeds": [image_embeds]}
    out = transformer(
        hidden_states=pack(inputs.x), encoder_hidden_states=inputs.text, pooled_projections=inputs.pooled,
        timestep=torch.full((n,), inputs.sigma), img_ids=image_ids(hw), txt_ids=torch.zeros(inputs.text.shape[1], 3),
        guidance=torch.full((n,), inputs.guidance), return_dict=False, **kwargs,
    )[0]
    uncond, cond = unpack(out.float(), hw).chunk(2)
    return uncond + cfg * (cond - uncond)


def load_xlabs_into_diffusers(transformer, path, scale: float) -> None:
    """diffusers' own loader, `FluxIPAdapterMixin.load_ip_adapter`, on the XLabs file (it renames the keys
    and calls `transformer._load_ip_adapter_weights([state_dict])`), then each processor's `scale`."""
    from diffusers.loaders.ip_adapter import FluxIPAdapterMixin

    class _Pipeline(FluxIPAdapterMixin):  # the loader needs only `transformer` from its pipeline
        def __init__(self, transformer):
            self.transformer = transformer

    _Pipeline(transformer).load_ip_adapter(
        str(path.parent), weight_name=path.name, image_encoder_pretrained_model_name_or_path=None,
        low_cpu_mem_usage=False,
    )
    set_diffusers_scale(transformer, scale)


def set_diffusers_scale(transformer, scale: float) -> None:
    for processor in transformer.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [scale]


def unload_diffusers_adapter(transformer) -> None:
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    transformer.encoder_hid_proj = None
    transformer.set_attn_processor(FluxAttnProcessor())


def flux_parity(model, step: FluxStep, reference: torch.Tensor, inputs: FluxInputs | None = None
                ) -> tuple[float, ComfyFluxStep]:
    """max |ours - diffusers| / max |diffusers| of the CFG prediction, `model` run through the sampler.

    With `inputs` (those the reference was computed on), checks ComfyUI fed its model the same."""
    result = comfy_flux_step(model, step)
    got = inputs_of(result, step)
    if inputs is not None:
        assert torch.equal(got.x, inputs.x) and got.sigma == inputs.sigma, "ComfyUI's inputs changed between runs"
    return relative_difference(result.eps, reference), result
