"""XLabs FLUX.1 IP-Adapter (v1: 4 tokens, v2: 16) against diffusers, through ComfyUI's sampler path.

The pack's Apply path patches ComfyUI's Flux (`patches_replace["dit"][("double_block", i)]`); the
patched MODEL runs one Euler step of a real schedule through `comfy.sample.sample` with CFG 3 (cond
and uncond batched, negative first, as ComfyUI batches them), guidance 3.5. diffusers'
FluxTransformer2DModel, with the same XLabs file loaded by its own `FluxIPAdapterMixin.load_ip_adapter`
and the weight set through each processor's `scale`, gets the very inputs ComfyUI's model got (packed
latents, img_ids, txt_ids, sigma, guidance) and `ip_adapter_image_embeds`, and CFG is combined the
same way (tests/harness/flux_parity.py).

Model: FLUX.1 dev at real width (24 heads x 128), 2 double + 1 single blocks (tests/fixtures/
flux_models.py), fp32 on both sides; 16x16 latents (64 image tokens), 8 text tokens.

Cases: v1 at weight 0.7; v1 at weight -0.5 on two non-square latents sharing one reference; v2 at
weight 1.3 with one reference per latent (two latents, each with its own negative); v2 with two
references attended at once (concat); a start/end window that holds the step (the term acts) and one
that does not (the model is the bare one). Mutants that must fail by a wide margin: one double
block's term dropped, the query taken after RoPE instead of before, cond and uncond swapped.

Tolerance: max |ours - diffusers| / max |diffusers| of the CFG prediction <= 1e-4.
"""

from __future__ import annotations

import copy
import gc
import logging
import time

import pytest
import torch
from safetensors.torch import save_file

from tests.fixtures.flux_models import ensure_flux_transformer, xlabs_state_dict
from tests.harness import flux_parity as fp
from tests.harness.flux_parity import TOLERANCE
from tests.harness.parity import pack_api, record
from tests.harness.reference_unets import relative_difference

log = logging.getLogger("tests")

LATENT = (16, 16)  # 64 packed image tokens
MARGIN = 10  # a mutant must miss by at least this many tolerances


@pytest.fixture(scope="module")
def pair(comfy_inprocess):
    built = fp.build_flux_pair(ensure_flux_transformer())
    yield built
    del built
    gc.collect()


@pytest.fixture(scope="module")
def adapters(pair, tmp_path_factory):
    """v1 and v2 XLabs files (2 double blocks, as the stand-in model), loaded through the pack's cache."""
    _, cache, _ = pack_api()
    folder = tmp_path_factory.mktemp("flux_adapters")
    out = {}
    for version, tokens, seed in (("v1", 4, 61), ("v2", 16, 62)):
        path = folder / f"flux-ip-adapter-{version}.safetensors"
        save_file(xlabs_state_dict(tokens, depth=2, seed=seed), str(path))
        out[version] = (path, cache.get(str(path)))
    return out


def clip_embeds(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-ins for CLIP ViT-L image_embeds of `count` references, and the zero negative."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(count, 768, generator=gen), torch.zeros(1, 768)


class Runner:
    """Runs a case on both sides, loading the right adapter into diffusers only when it changes."""

    def __init__(self, pair, adapters):
        self.pair, self.adapters = pair, adapters
        self.apply_adapter, _, self.image_embeds = pack_api()
        self.loaded: str | None = None

    def diffusers(self, inputs, step, version: str | None, weight: float, images: torch.Tensor | None):
        transformer = self.pair.diffusers
        if version is None:
            if self.loaded is not None:
                fp.unload_diffusers_adapter(transformer)
                self.loaded = None
            return fp.diffusers_flux_step(transformer, inputs, step.cfg)
        if self.loaded != version:
            fp.load_xlabs_into_diffusers(transformer, self.adapters[version][0], weight)
            self.loaded = version
        fp.set_diffusers_scale(transformer, weight)
        return fp.diffusers_flux_step(transformer, inputs, step.cfg, images)

    def patched(self, version: str, cond, uncond, weight: float, **kw):
        adapter = self.adapters[version][1]
        return self.apply_adapter(self.pair.comfy, adapter, self.image_embeds(cond, uncond, "image_embeds"),
                                  weight, **kw)


@pytest.fixture(scope="module")
def runner(pair, adapters):
    return Runner(pair, adapters)


@pytest.fixture(scope="module")
def base_case(runner):
    """v1, weight 0.7, one latent, one reference; the bare step on the same inputs."""
    step = fp.make_flux_step(LATENT, batch=1, seed=1)
    cond, uncond = clip_embeds(1, seed=2)
    with torch.inference_mode():
        patched = runner.patched("v1", cond, uncond, 0.7)
        start = time.perf_counter()
        result = fp.comfy_flux_step(patched, step)
        comfy_s = time.perf_counter() - start
        inputs = fp.inputs_of(result, step)
        start = time.perf_counter()
        ref = runner.diffusers(inputs, step, "v1", 0.7, torch.cat([uncond, cond])[:, None])
        diffusers_s = time.perf_counter() - start
        bare = runner.diffusers(inputs, step, None, 0.0, None)
    log.info("Flux step: ComfyUI %.1f s, diffusers %.1f s", comfy_s, diffusers_s)
    return step, patched, result, inputs, ref, bare


@pytest.mark.slow
@torch.inference_mode()
def test_bare_flux_matches_diffusers(runner, base_case):
    step, _, _, inputs, _, bare = base_case
    diff, _ = fp.flux_parity(runner.pair.comfy, step, bare, inputs)
    record("sampler FLUX.1 fp32 bare", diff)
    assert diff <= TOLERANCE, f"the bare Flux models differ by {diff:.2e} through the sampler: the comparison is off"


@pytest.mark.slow
@torch.inference_mode()
def test_xlabs_v1_weight(base_case):
    _, _, result, _, ref, bare = base_case
    effect = relative_difference(ref, bare)
    diff = relative_difference(result.eps, ref)
    record("sampler FLUX.1 fp32 XLabs v1 w0.7", diff)
    record("sampler FLUX.1 fp32 XLabs v1 adapter effect", effect)
    assert effect > 0.01, f"the adapter barely changes the step ({effect:.2e}); the test has no teeth"
    assert diff <= TOLERANCE, f"XLabs v1, weight 0.7: ours vs diffusers {diff:.2e} (adapter effect {effect:.2e})"


CASES = {
    # id: (version, weight, batch, latent, references, one_per_latent)
    "v1-negative-weight-2-latents-nonsquare": ("v1", -0.5, 2, (16, 24), 1, False),
    "v2-weight1.3-one-reference-per-latent": ("v2", 1.3, 2, LATENT, 2, True),
    "v2-two-references-concat": ("v2", 1.0, 1, LATENT, 2, False),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
@torch.inference_mode()
def test_xlabs_cases(runner, case):
    version, weight, batch, latent, refs, per_latent = CASES[case]
    step = fp.make_flux_step(latent, batch=batch, seed=3)
    cond, uncond = clip_embeds(refs, seed=4)
    if per_latent:
        uncond = torch.randn(refs, 768, generator=torch.Generator().manual_seed(5))  # a negative per reference
        images = torch.cat([uncond, cond])[:, None]  # latent i: reference i, negative i
    else:
        images = torch.cat([uncond.expand(batch, refs, -1), cond[None].expand(batch, -1, -1)])  # [2B, refs, 768]
    patched = runner.patched(version, cond, uncond, weight, one_per_latent=per_latent)
    result = fp.comfy_flux_step(patched, step)
    inputs = fp.inputs_of(result, step)
    ref = runner.diffusers(inputs, step, version, weight, images)
    bare = runner.diffusers(inputs, step, version, 0.0, images)  # scale 0: diffusers' term is exactly zero
    effect = relative_difference(ref, bare)
    diff = relative_difference(result.eps, ref)
    record(f"sampler FLUX.1 fp32 XLabs {case}", diff)
    assert effect > 0.01, f"XLabs {case}: the adapter barely changes the step ({effect:.2e}); no teeth"
    assert diff <= TOLERANCE, f"XLabs {case}: ours vs diffusers {diff:.2e} (adapter effect {effect:.2e})"


@pytest.mark.slow
@torch.inference_mode()
def test_schedule_window(runner, base_case):
    """start/end inside the schedule: a window holding the step acts exactly; one that does not is bare."""
    step, _, _, inputs, ref, bare = base_case
    cond, uncond = clip_embeds(1, seed=2)
    sampling = runner.pair.comfy.get_model_object("model_sampling")
    sigma = inputs.sigma
    assert sampling.percent_to_sigma(0.2) >= sigma >= sampling.percent_to_sigma(0.8), "the step is not in [0.2, 0.8]"
    assert sigma > sampling.percent_to_sigma(0.5), "the step is not before 0.5"
    inside = runner.patched("v1", cond, uncond, 0.7, start_at=0.2, end_at=0.8)
    outside = runner.patched("v1", cond, uncond, 0.7, start_at=0.5, end_at=1.0)
    diff_in, _ = fp.flux_parity(inside, step, ref, inputs)
    diff_out, _ = fp.flux_parity(outside, step, bare, inputs)
    record("sampler FLUX.1 fp32 XLabs v1 window [0.2, 0.8]", diff_in)
    record("sampler FLUX.1 fp32 XLabs v1 window [0.5, 1] (closed)", diff_out)
    assert diff_in <= TOLERANCE, f"window [0.2, 0.8] holding the step: {diff_in:.2e} from diffusers with the adapter"
    assert diff_out <= TOLERANCE, f"window [0.5, 1] not holding the step: {diff_out:.2e} from the bare model"


@pytest.mark.slow
@torch.inference_mode()
def test_bf16_weights_manual_cast(runner, base_case):
    """ComfyUI's CPU default for bf16 weights: stored bf16, computed in fp32 ("manual cast"), where the block's
    qkv projection is cast by ComfyUI's ops, so the query goes through the module itself. The stand-in file
    and the adapter are bf16 already, so diffusers' fp32 model holds the very same values."""
    import comfy.sd

    step, _, _, inputs, ref, _ = base_case
    cond, uncond = clip_embeds(1, seed=2)
    model = comfy.sd.load_diffusion_model(str(ensure_flux_transformer()), model_options={"dtype": torch.bfloat16})
    try:
        assert model.model.manual_cast_dtype == torch.float32, "expected ComfyUI's CPU manual cast for bf16 weights"
        assert model.model.diffusion_model.double_blocks[0].img_attn.qkv.comfy_cast_weights
        patched = runner.apply_adapter(model, runner.adapters["v1"][1],
                                       runner.image_embeds(cond, uncond, "image_embeds"), 0.7)
        diff, _ = fp.flux_parity(patched, step, ref, inputs)
    finally:
        del model
        gc.collect()
    record("sampler FLUX.1 bf16 weights manual cast XLabs v1 w0.7", diff)
    assert diff <= TOLERANCE, f"bf16 weights computed in fp32: {diff:.2e}"


class ForeignBlock:
    """Another pack's ("double_block", i) replacement: runs the original block and counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, args, extra):
        self.calls += 1
        return extra["original_block"](args)

    def __deepcopy__(self, memo):
        return self  # model clones share it, so its counter sees every call


@pytest.mark.slow
@torch.inference_mode()
def test_composes_with_another_packs_block_replacement(runner, base_case):
    """A replacement already on the blocks keeps running (once per block and call), and the term is still exact."""
    step, _, _, inputs, ref, _ = base_case
    cond, uncond = clip_embeds(1, seed=2)
    foreign = ForeignBlock()
    model = runner.pair.comfy.clone()
    for i in range(2):
        model.set_model_patch_replace(foreign, "dit", "double_block", i)
    patched = runner.apply_adapter(model, runner.adapters["v1"][1], runner.image_embeds(cond, uncond, "image_embeds"),
                                   0.7)
    diff, _ = fp.flux_parity(patched, step, ref, inputs)
    record("sampler FLUX.1 fp32 XLabs v1 over another pack's block replacement", diff)
    assert foreign.calls == 2, f"the other pack's replacement ran {foreign.calls} times for 2 blocks in one call"
    assert diff <= TOLERANCE, f"over another pack's block replacement: {diff:.2e}"


@pytest.mark.slow
@torch.inference_mode()
def test_two_adapters_stack(runner, adapters):
    """v1 and v2 applied one after the other = diffusers with both loaded (one image embedding each)."""
    from diffusers.loaders.ip_adapter import FluxIPAdapterMixin

    step = fp.make_flux_step(LATENT, batch=1, seed=11)
    (c1, u1), (c2, u2) = clip_embeds(1, seed=12), clip_embeds(1, seed=13)
    model = runner.patched("v1", c1, u1, 0.6)
    model = runner.apply_adapter(model, adapters["v2"][1], runner.image_embeds(c2, u2, "image_embeds"), 0.9)
    result = fp.comfy_flux_step(model, step)
    inputs = fp.inputs_of(result, step)

    class _Pipeline(FluxIPAdapterMixin):
        def __init__(self, transformer):
            self.transformer = transformer

    transformer = runner.pair.diffusers
    paths = [adapters["v1"][0], adapters["v2"][0]]
    _Pipeline(transformer).load_ip_adapter([str(p.parent) for p in paths], weight_name=[p.name for p in paths],
                                           image_encoder_pretrained_model_name_or_path=None, low_cpu_mem_usage=False)
    runner.loaded = "v1+v2"
    for processor in transformer.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [0.6, 0.9]
    images = [torch.cat([u1, c1])[:, None], torch.cat([u2, c2])[:, None]]
    transformer_out = transformer(
        hidden_states=fp.pack(inputs.x), encoder_hidden_states=inputs.text, pooled_projections=inputs.pooled,
        timestep=torch.full((2,), inputs.sigma), img_ids=fp.image_ids(LATENT), txt_ids=torch.zeros(8, 3),
        guidance=torch.full((2,), inputs.guidance), joint_attention_kwargs={"ip_adapter_image_embeds": images},
        return_dict=False)[0]
    uncond, cond = fp.unpack(transformer_out.float(), LATENT).chunk(2)
    ref = uncond + step.cfg * (cond - uncond)
    diff = relative_difference(result.eps, ref)
    record("sampler FLUX.1 fp32 XLabs v1 + v2 stacked", diff)
    assert diff <= TOLERANCE, f"two adapters stacked: {diff:.2e}"


# --- mutants ----------------------------------------------------------------------------------


def _dit_table(model) -> dict:
    return model.model_options["transformer_options"]["patches_replace"]["dit"]


def _drop_block(model, index: int):
    mutant = model.clone()
    del _dit_table(mutant)[("double_block", index)]
    return mutant


def _swap_cond_uncond(model):
    mutant = model.clone()
    table = _dit_table(mutant)
    for key, patch in list(table.items()):
        def swapped(args, extra, patch=patch):
            options = dict(args["transformer_options"])
            options["cond_or_uncond"] = list(options["cond_or_uncond"])[::-1]
            return patch({**args, "transformer_options": options}, extra)

        table[key] = swapped
    return mutant


def _query_after_rope(model):
    from comfy.ldm.flux.math import apply_rope

    from ipadapter_pack.ip_adapter_core.flux import double_block_term
    from ipadapter_pack.nodes import comfy_seam

    class PostRope(comfy_seam.FluxDoubleBlockPatch):
        def __call__(self, args, extra):
            q = comfy_seam.flux_image_query(self._block(), args["img"], args["vec"])
            q = apply_rope(q, q, args["pe"][:, :, args["txt"].shape[1]:])[0]  # the picture's part of the rotation
            codes = args["transformer_options"]["cond_or_uncond"]
            term = double_block_term(self.application, self.block_index, q, [c == fp.COND for c in codes])
            out = extra["original_block"](args)
            return {**out, "img": out["img"] + term}

    mutant = model.clone()
    table = _dit_table(mutant)
    for key, patch in list(table.items()):
        rotated = copy.copy(patch)
        rotated.__class__ = PostRope
        table[key] = rotated
    return mutant


MUTANTS = {  # ids without spaces or slashes: they are passed as pytest node ids (release matrix)
    "block1-term-dropped": lambda m: _drop_block(m, 1),
    "block0-term-dropped": lambda m: _drop_block(m, 0),
    "query-after-rope": _query_after_rope,
    "cond-uncond-swapped": _swap_cond_uncond,
}


@pytest.mark.slow
@pytest.mark.parametrize("mutant", list(MUTANTS))
@torch.inference_mode()
def test_mutant_fails_parity(base_case, mutant):
    step, patched, _, inputs, ref, _ = base_case
    diff, _ = fp.flux_parity(MUTANTS[mutant](patched), step, ref, inputs)
    record(f"mutant: sampler FLUX.1 XLabs v1 {mutant}", diff)
    assert diff > MARGIN * TOLERANCE, f"{mutant} went unseen: {diff:.2e} (tolerance {TOLERANCE:.0e})"
