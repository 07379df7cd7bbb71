"""Parity with diffusers through ComfyUI's real sampling path (fp32, SD1.5 at its real sizes).

tests/inprocess/test_parity_unet.py calls the patched UNet directly with hand-made transformer_options;
here the pack's patched MODEL goes through `comfy.sample.sample` as the KSampler (Advanced)
node runs it: one Euler step (step 12 of a 20-step "normal" schedule, CFG 5), so ComfyUI
builds the batch, the cond/uncond codes, the sigmas and the timestep itself. diffusers does the
same CFG step on the same UNet inputs (checked bit for bit: latents, prompts, timestep).

Covered: the bare UNets; one latent with one reference (base adapter); two latents sharing one
reference; and one reference per latent (plus adapter, `one_per_latent=True`, against diffusers'
image_embeds shaped [2 * batch, 1, ...]) in every batch layout: cond and uncond in one batch in
ComfyUI's order (uncond first), in the reverse order (a model_function_wrapper hands the UNet
cond first and cond_or_uncond to match), and in separate calls (ComfyUI's own low-memory path:
calc_cond_batch when `memory_required` exceeds free memory). The per-latent case is also run
with its two references swapped, which must fail.

Tolerance: max |ours - diffusers| / max |diffusers| of the CFG noise prediction <= 1e-4. The
bare figure is ~1e-5 here against ~1e-6 for a direct UNet call: CFG 5 (eps_u + 5 (eps_c - eps_u))
multiplies the two kernels' per-branch difference by about 6.
"""

from __future__ import annotations

import gc

import pytest
import torch
from safetensors.torch import save_file

from tests.fixtures.generate import adapter_state_dict
from tests.harness import parity
from tests.harness.parity import TOLERANCE, record, relative_difference

LATENT = (24, 24)  # 192 px; the deepest level is 3x3 (odd sizes on the way up)
WEIGHT = 0.8


@pytest.fixture(scope="module")
def pair(comfy_inprocess):
    built = parity.build_pair("SD1.5", seed=3, share_weights=True)  # ~3.5 GB instead of ~7 GB
    yield built
    del built
    gc.collect()


@pytest.fixture(scope="module")
def adapters(pair, tmp_path_factory):
    """A base and a plus adapter for this UNet, as files loaded through the pack's cache."""
    _, cache, _ = parity.pack_api()
    folder = tmp_path_factory.mktemp("sampler_adapters")
    out = {}
    for kind, seed in (("base", 21), ("plus", 22)):
        flat = adapter_state_dict(kind, parity.hidden_sizes(pair.diffusers), pair.context_dim, seed=seed)
        path = folder / f"{kind}.safetensors"
        save_file(flat, str(path))
        out[kind] = (flat, cache.get(str(path)))
    return out


@pytest.fixture(scope="module")
def single(pair, adapters):
    """One latent, one reference (base adapter): the bare and the adapter references."""
    apply_adapter, _, image_embeds = parity.pack_api()
    gen = torch.Generator().manual_seed(5)
    step = parity.make_step(pair, LATENT, batch=1, seed=4)
    with torch.inference_mode():
        parity.unload_diffusers_adapter(pair.diffusers)
        bare = parity.reference(pair, step)
        flat, adapter = adapters["base"]
        cond, uncond = parity.encodings("base", 1, gen)
        parity.load_diffusers_adapter(pair.diffusers, flat, WEIGHT)
        ref = parity.reference(pair, step, image_embeds=torch.cat([uncond, cond])[:, None])
    patched = apply_adapter(pair.comfy, adapter, image_embeds(cond, uncond, adapter.spec.encoder_output), WEIGHT)
    return bare, ref, patched


@pytest.mark.slow
@torch.inference_mode()
def test_bare_sampler_step_matches_diffusers(pair, single):
    bare, _, _ = single
    diff, _ = parity.sampler_parity(pair.comfy, bare)
    record("sampler SD1.5 fp32 bare", diff)
    assert diff <= TOLERANCE, f"the bare UNets differ by {diff:.2e} through the sampler: the comparison itself is off"


@pytest.mark.slow
@torch.inference_mode()
def test_adapter_through_sampler(single):
    bare, ref, patched = single
    effect = relative_difference(ref.eps, bare.eps)
    assert effect > 0.01, f"the adapter barely changes the CFG step ({effect:.2e}); the test has no teeth"
    diff, _ = parity.sampler_parity(patched, ref)
    record("sampler SD1.5 fp32 base", diff)
    record("sampler SD1.5 fp32 base adapter effect", effect)
    assert diff <= TOLERANCE, f"ours vs diffusers differ by {diff:.2e}"


@pytest.mark.slow
@torch.inference_mode()
def test_two_latents_one_reference(pair, adapters):
    apply_adapter, _, image_embeds = parity.pack_api()
    gen = torch.Generator().manual_seed(6)
    step = parity.make_step(pair, LATENT, batch=2, seed=7)
    flat, adapter = adapters["base"]
    cond, uncond = parity.encodings("base", 1, gen)
    parity.load_diffusers_adapter(pair.diffusers, flat, WEIGHT)
    images = torch.cat([uncond.expand(2, -1), cond.expand(2, -1)])[:, None]  # [2B, 1, D], negatives first
    ref = parity.reference(pair, step, image_embeds=images)
    patched = apply_adapter(pair.comfy, adapter, image_embeds(cond, uncond, adapter.spec.encoder_output), WEIGHT)
    diff, _ = parity.sampler_parity(patched, ref)
    record("sampler SD1.5 fp32 base 2 latents", diff)
    assert diff <= TOLERANCE, f"two latents, one reference: {diff:.2e}"


@pytest.fixture(scope="module")
def per_latent(pair, adapters):
    """Two latents, two references (plus adapter), latent i steered by reference i."""
    apply_adapter, _, image_embeds = parity.pack_api()
    gen = torch.Generator().manual_seed(8)
    step = parity.make_step(pair, LATENT, batch=2, seed=9)
    flat, adapter = adapters["plus"]
    cond, uncond = parity.encodings("plus", 2, gen)  # a negative per reference too
    with torch.inference_mode():
        parity.load_diffusers_adapter(pair.diffusers, flat, WEIGHT)
        ref = parity.reference(pair, step, image_embeds=torch.cat([uncond, cond])[:, None])
    embeds = image_embeds(cond, uncond, adapter.spec.encoder_output)
    patched = apply_adapter(pair.comfy, adapter, embeds, WEIGHT, one_per_latent=True)
    swapped = apply_adapter(pair.comfy, adapter, image_embeds(cond.flip(0), uncond.flip(0), embeds.output), WEIGHT,
                            one_per_latent=True)
    return ref, patched, swapped


@pytest.mark.slow
@pytest.mark.parametrize("layout", parity.LAYOUTS)
@torch.inference_mode()
def test_one_reference_per_latent(per_latent, layout):
    ref, patched, _ = per_latent
    diff, _ = parity.sampler_parity(patched, ref, layout)
    record(f"sampler SD1.5 fp32 plus one per latent {layout}", diff)
    assert diff <= TOLERANCE, f"one reference per latent ({layout}): {diff:.2e}"


@pytest.mark.slow
@torch.inference_mode()
def test_one_reference_per_latent_has_teeth(per_latent):
    """The same comparison fails when latent 0 gets reference 1 and latent 1 reference 0."""
    ref, _, swapped = per_latent
    diff, _ = parity.sampler_parity(swapped, ref)
    record("mutant: sampler SD1.5 references per latent swapped", diff)
    assert diff > TOLERANCE, f"swapping the references per latent went unseen ({diff:.2e})"
