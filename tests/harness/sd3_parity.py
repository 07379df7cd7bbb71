"""SD3 parity with diffusers through ComfyUI's sampler path, one CFG step at a time.

The SD3 counterpart of tests/harness/flux_parity.py: `comfy_sd3_step` runs a (patched) ComfyUI SD3
MODEL the way the KSampler (Advanced) node does (`comfy.sample.sample`: CFGGuider, calc_cond_batch,
SD3's flow model sampling (shift 3), the Euler sampler) for exactly one step of a real schedule,
reads the step's CFG velocity back from the sampler callback (CONST sampling: denoised = x - sigma
* v) and records every call of the diffusion model. `diffusers_sd3_step` gives diffusers'
SD3Transformer2DModel those very inputs with timestep = 1000 * sigma (what ComfyUI's model gets,
checked), negative half first, and combines CFG as diffusers' pipelines do. The IP-Adapter goes into
diffusers with its own loader (`SD3IPAdapterMixin.load_ip_adapter` on the file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tests.harness.reference_unets import relative_difference

TOLERANCE = 1e-4  # fp32, as the UNet and Flux parity tests
COND, UNCOND = 0, 1  # ComfyUI's cond_or_uncond codes


@dataclass
class SD3Pair:
    diffusers: torch.nn.Module  # SD3Transformer2DModel, fp32
    comfy: object  # ModelPatcher of ComfyUI's SD3, fp32


def build_sd3_pair(path: Path, config: dict) -> SD3Pair:
    """The stand-in file loaded by diffusers and by ComfyUI (`load_diffusion_model`), both fp32."""
    import comfy.model_base
    import comfy.sd
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    patcher = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32})
    assert isinstance(patcher.model, comfy.model_base.SD3), f"ComfyUI loaded {type(patcher.model).__name__}, not SD3"
    transformer = SD3Transformer2DModel(**config)
    transformer.load_state_dict(load_file(str(path)), strict=True)
    return SD3Pair(transformer.eval().requires_grad_(False), patcher)


@dataclass
class SD3Step:
    """What both sides get: latents' noise, prompts, guidance, and which step of which schedule."""

    noise: torch.Tensor  # [B, 16, h, w]
    text_cond: torch.Tensor  # [1, L, 4096]
    text_uncond: torch.Tensor
    pooled_cond: torch.Tensor  # [1, 2048]
    pooled_uncond: torch.Tensor
    cfg: float = 4.5
    steps: int = 8  # a "simple" schedule of this many steps ...
    step: int = 3  # ... of which this one runs

    @property
    def batch(self) -> int:
        return self.noise.shape[0]


def make_sd3_step(latent_hw: tuple[int, int], batch: int = 1, seed: int = 0, text_tokens: int = 6, **kw) -> SD3Step:
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 16, *latent_hw, generator=gen)
    text = [torch.randn(1, text_tokens, 4096, generator=gen) for _ in range(2)]
    pooled = [torch.randn(1, 2048, generator=gen) for _ in range(2)]
    return SD3Step(noise, text[0], text[1], pooled[0], pooled[1], **kw)


@dataclass
class SD3Call:
    cond_or_uncond: list[int]
    x: torch.Tensor
    timesteps: torch.Tensor
    context: torch.Tensor
    y: torch.Tensor


@dataclass
class ComfySD3Step:
    v: torch.Tensor  # CFG velocity, [B, 16, h, w], fp32
    sigma: float
    calls: list[SD3Call] = field(default_factory=list)


def step_sigma(model, step: SD3Step) -> float:
    import comfy.samplers

    sampling = model.get_model_object("model_sampling")
    return float(comfy.samplers.calculate_sigmas(sampling, "simple", step.steps)[step.step])


def comfy_sd3_step(model, step: SD3Step) -> ComfySD3Step:
    """One step of ComfyUI's KSampler path on an SD3 `model` (a ModelPatcher): the CFG velocity it used."""
    import comfy.sample

    model = model.clone()
    seen: dict[str, torch.Tensor] = {}

    def callback(i, denoised, x, total):
        seen.update(x=x.detach().clone(), denoised=denoised.detach().clone())

    calls: list[SD3Call] = []

    def capture(module, args, kwargs):
        names = ("x", "timesteps", "context", "y")
        got = dict(zip(names, args, strict=False)) | {k: kwargs[k] for k in names if k in kwargs}
        calls.append(SD3Call(list(kwargs["transformer_options"]["cond_or_uncond"]), got["x"].detach().clone(),
                             got["timesteps"].detach().clone(), got["context"].detach().clone(),
                             got["y"].detach().clone()))

    def conds(text, pooled):
        return [[text, {"pooled_output": pooled}]]

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
    v = ((seen["x"].double() - seen["denoised"].double()) / sigma).float()
    return ComfySD3Step(v, sigma, calls)


@dataclass
class SD3Inputs:
    """The diffusion-model inputs of one CFG step in diffusers' batch order (negative half first)."""

    x: torch.Tensor  # [2B, 16, h, w]
    sigma: float
    timestep: torch.Tensor  # [2B], 1000 * sigma: what both models get
    text: torch.Tensor  # [2B, L, 4096]
    pooled: torch.Tensor  # [2B, 2048]


def inputs_of(result: ComfySD3Step, step: SD3Step) -> SD3Inputs:
    """The inputs ComfyUI's sampler gave its SD3 model, checked against the step, negatives first."""
    assert [c.cond_or_uncond for c in result.calls] == [[UNCOND, COND]], (
        f"expected one batched call, negative first; ComfyUI called {[c.cond_or_uncond for c in result.calls]}")
    call = result.calls[0]
    b = step.batch
    x_uncond, x_cond = call.x.chunk(2)
    assert torch.equal(x_uncond, x_cond), "the two halves of the batch got different latents"
    expected_t = torch.full_like(call.timesteps, 1000.0 * result.sigma)
    assert torch.allclose(call.timesteps, expected_t, rtol=1e-6, atol=0), (
        f"SD3 timesteps {call.timesteps.tolist()} are not 1000 x sigma {result.sigma}")
    expected_text = torch.cat([step.text_uncond.expand(b, -1, -1), step.text_cond.expand(b, -1, -1)])
    expected_pooled = torch.cat([step.pooled_uncond.expand(b, -1), step.pooled_cond.expand(b, -1)])
    assert torch.equal(call.context, expected_text), "the prompts are not the step's"
    assert torch.equal(call.y, expected_pooled), "the pooled prompts are not the step's"
    return SD3Inputs(call.x, result.sigma, call.timesteps.float(), call.context, call.y)


def diffusers_sd3_step(transformer, inputs: SD3Inputs, cfg: float, image_embeds: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """diffusers' transformer on the same inputs, CFG combined as its pipelines do: [B, 16, h, w].

    image_embeds: SigLIP states [2B, L, 1152] (negative half first) for the loaded IP-Adapter, or None.
    """
    kwargs = {}
    if image_embeds is not None:
        kwargs["joint_attention_kwargs"] = {"ip_adapter_image_embeds": image_embeds}
    out = transformer(hidden_states=inputs.x, encoder_hidden_states=inputs.text, pooled_projections=inputs.pooled,
                      timestep=inputs.timestep, return_dict=False, **kwargs)[0]
    uncond, cond = out.float().chunk(2)
    return uncond + cfg * (cond - uncond)


def load_instantx_into_diffusers(transformer, path: Path, scale: float) -> None:
    """diffusers' own loader, `SD3IPAdapterMixin.load_ip_adapter`, on the InstantX file (it converts the
    resampler's keys and builds one SD3IPAdapterJointAttnProcessor2_0 per joint block), then the scale."""
    from diffusers.loaders.ip_adapter import SD3IPAdapterMixin

    class _Pipeline(SD3IPAdapterMixin):  # the loader needs only `transformer` from its pipeline
        def __init__(self, transformer):
            self.transformer = transformer

    pipeline = _Pipeline(transformer)
    pipeline.load_ip_adapter(str(path.parent), weight_name=path.name, image_encoder_folder=None,
                             low_cpu_mem_usage=False)
    pipeline.set_ip_adapter_scale(scale)


def unload_diffusers_adapter(transformer) -> None:
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    transformer.image_proj = None
    transformer.set_attn_processor(JointAttnProcessor2_0())


def sd3_parity(model, step: SD3Step, reference: torch.Tensor, inputs: SD3Inputs | None = None
               ) -> tuple[float, ComfySD3Step]:
    """max |ours - diffusers| / max |diffusers| of the CFG velocity, `model` run through the sampler.

    With `inputs` (those the reference was computed on), checks ComfyUI fed its model the same."""
    result = comfy_sd3_step(model, step)
    got = inputs_of(result, step)
    if inputs is not None:
        assert torch.equal(got.x, inputs.x) and got.sigma == inputs.sigma, "ComfyUI's inputs changed between runs"
    return relative_difference(result.v, reference), result
