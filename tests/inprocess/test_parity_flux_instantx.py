"""InstantX FLUX.1-dev IP-Adapter against an independent reference, through ComfyUI's sampler path.

Reference read (facts only, nothing copied): InstantX's `attention_processor.py` (`IPAFluxAttnProcessor2_0`)
and `infer_flux_ipa_siglip.py` (`MLPProjModel`, `IPAdapter.set_ip_adapter/load_ip_adapter/get_image_embeds`)
as published with the weights in the Hugging Face repo InstantX/FLUX.1-dev-IP-Adapter (files of November
2024; no internet here, so read from public copies in the code index: the processor with `FP32LayerNorm,
RMSNorm` imports and `norm_added_v` commented out, and `infer_flux_ipa_siglip.py` as vendored by derived
projects), and the same processor as the Shakker-Labs ComfyUI-IPAdapter-Flux port applies it to ComfyUI's
blocks (flux/layers.py `DoubleStreamBlockIPA` / `SingleStreamBlockIPA`). Facts taken from them:
  * one processor per attention of FLUX.1, `transformer_blocks.*` (19) then `single_transformer_blocks.*`
    (38), the file's `ip_adapter.{0..56}` loaded in that order; to_k_ip / to_v_ip 4096 -> 3072 without bias;
  * image keys through RMSNorm(128, eps 1e-5, no affine); the values are not normed;
  * the query is the block's `to_q` output through its `norm_q`, before RoPE; in a single block over the
    whole [text; image] stream;
  * the term, times `scale`, is added to the attention output: in a double block to the image rows before
    `to_out` (so the gate and MLP see it), in a single block before the concat with the MLP and proj_out;
  * tokens: Linear(1152, 2304), GELU, Linear(2304, 128 * 4096), reshape, LayerNorm(4096), on SigLIP
    so400m-patch14-384's `pooler_output`.
The reference is tests/harness/flux_instantx_parity.py (plain torch on diffusers 0.42.1's Flux blocks).

Model: FLUX.1 dev at real width (24 heads x 128), 2 double + 1 single blocks (tests/fixtures/
flux_models.py), fp32 on both sides; the adapter has the real keys and widths, 3 processors and 16
tokens instead of 128 (tests/fixtures/flux_instantx_models.py says why). One Euler step of an 8-step
schedule with CFG 3 (cond and uncond batched), guidance 3.5; 16x16 latents unless said.

Tolerance: max |ours - reference| / max |reference| of the CFG prediction <= 1e-4.
"""

from __future__ import annotations

import gc
import logging
import time

import pytest
import torch
from safetensors.torch import save_file

from tests.fixtures.flux_instantx_models import instantx_flux_state_dict, siglip_state_dict
from tests.fixtures.flux_models import ensure_flux_transformer
from tests.harness import flux_instantx_parity as ref
from tests.harness import flux_parity as fp
from tests.harness.flux_parity import TOLERANCE
from tests.harness.parity import pack_api, record
from tests.harness.reference_unets import relative_difference

log = logging.getLogger("tests")

LATENT = (16, 16)
TOKENS = 16
MARGIN = 10  # a mutant must miss by at least this many tolerances


@pytest.fixture(scope="module")
def pair(comfy_inprocess):
    built = fp.build_flux_pair(ensure_flux_transformer())
    yield built
    del built
    gc.collect()


@pytest.fixture(scope="module")
def adapter(comfy_inprocess, tmp_path_factory):
    """(state dict, LoadedAdapter) of a 3-processor InstantX file, loaded through the pack's cache."""
    _, cache, _ = pack_api()
    folder = tmp_path_factory.mktemp("flux_instantx")
    tensors = instantx_flux_state_dict(TOKENS, depth=3, seed=81)
    path = folder / "flux-instantx-ip-adapter.safetensors"
    save_file(tensors, str(path))
    return tensors, cache.get(str(path))


def pooled(count: int, seed: int) -> torch.Tensor:
    """Stand-ins for SigLIP pooled embeddings (unit-scale, as pooler outputs are after the head's MLP)."""
    return torch.randn(count, 1152, generator=torch.Generator().manual_seed(seed))


def run_case(pair, adapter, step, cond, uncond, weight, per_latent=False, **kw):
    """(ours, reference, bare) CFG predictions for one case; the reference runs on ComfyUI's very inputs."""
    apply_adapter, _, image_embeds = pack_api()
    tensors, loaded = adapter
    patched = apply_adapter(pair.comfy, loaded, image_embeds(cond, uncond, "pooled"), weight,
                            one_per_latent=per_latent, **kw)
    result = fp.comfy_flux_step(patched, step)
    inputs = fp.inputs_of(result, step)
    b = step.batch
    tok_c, tok_u = ref.reference_tokens(tensors, cond), ref.reference_tokens(tensors, uncond)
    if per_latent:
        tokens = torch.cat([tok_u, tok_c])  # latent i: reference i and negative i
    else:
        flat_c = tok_c.reshape(1, -1, tok_c.shape[-1])  # several references attended at once
        flat_u = tok_u.expand(cond.shape[0], -1, -1).reshape(1, -1, tok_u.shape[-1])
        tokens = torch.cat([flat_u.expand(b, -1, -1), flat_c.expand(b, -1, -1)])
    ref.install_reference(pair.diffusers, tensors, tokens, weight)
    try:
        expected = fp.diffusers_flux_step(pair.diffusers, inputs, step.cfg)
    finally:
        ref.remove_reference(pair.diffusers)
    bare = fp.diffusers_flux_step(pair.diffusers, inputs, step.cfg)
    return result, expected, bare, patched, inputs


@pytest.fixture(scope="module")
def base_case(pair, adapter):
    step = fp.make_flux_step(LATENT, batch=1, seed=11)
    cond, uncond = pooled(1, 12), pooled(1, 13)
    with torch.inference_mode():
        start = time.perf_counter()
        result, expected, bare, patched, inputs = run_case(pair, adapter, step, cond, uncond, 0.8)
        log.info("InstantX Flux base case: %.1f s", time.perf_counter() - start)
    return step, cond, uncond, result, expected, bare, patched, inputs


@pytest.mark.slow
@torch.inference_mode()
def test_instantx_weight(base_case):
    _, _, _, result, expected, bare, _, _ = base_case
    effect = relative_difference(expected, bare)
    diff = relative_difference(result.eps, expected)
    record("sampler FLUX.1 fp32 InstantX w0.8", diff)
    record("sampler FLUX.1 fp32 InstantX w0.8 adapter effect", effect)
    assert effect > 0.01, f"the adapter barely changes the step ({effect:.2e}); no teeth"
    assert diff <= TOLERANCE, f"InstantX w0.8: ours vs reference {diff:.2e} (adapter effect {effect:.2e})"


CASES = {
    # name: (weight, batch, latent, references, one per latent)
    "w-0.6_2latents_nonsquare_shared": (-0.6, 2, (16, 24), 1, False),
    "w1.3_2latents_one_per_latent": (1.3, 2, (16, 16), 2, True),
    "w1.0_2references_concat": (1.0, 1, (24, 16), 2, False),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
@torch.inference_mode()
def test_instantx_cases(pair, adapter, case):
    weight, batch, latent, refs, per_latent = CASES[case]
    step = fp.make_flux_step(latent, batch=batch, seed=14)
    cond = pooled(refs, 15)
    uncond = pooled(refs if per_latent else 1, 16)
    result, expected, bare, _, _ = run_case(pair, adapter, step, cond, uncond, weight, per_latent)
    effect = relative_difference(expected, bare)
    diff = relative_difference(result.eps, expected)
    record(f"sampler FLUX.1 fp32 InstantX {case}", diff)
    assert effect > 0.01, f"InstantX {case}: the adapter barely changes the step ({effect:.2e}); no teeth"
    assert diff <= TOLERANCE, f"InstantX {case}: ours vs reference {diff:.2e} (adapter effect {effect:.2e})"


@pytest.mark.slow
@torch.inference_mode()
def test_schedule_window(pair, adapter, base_case):
    """start/end inside the schedule: a window holding the step acts exactly; one that does not is bare."""
    apply_adapter, _, image_embeds = pack_api()
    step, cond, uncond, _, expected, bare, _, inputs = base_case
    sampling = pair.comfy.get_model_object("model_sampling")
    assert sampling.percent_to_sigma(0.2) >= inputs.sigma > sampling.percent_to_sigma(0.5), "step not in [0.2, 0.5)"
    embeds = image_embeds(cond, uncond, "pooled")
    inside = apply_adapter(pair.comfy, adapter[1], embeds, 0.8, start_at=0.2, end_at=0.8)
    outside = apply_adapter(pair.comfy, adapter[1], embeds, 0.8, start_at=0.5, end_at=1.0)
    diff_in, _ = fp.flux_parity(inside, step, expected, inputs)
    diff_out, _ = fp.flux_parity(outside, step, bare, inputs)
    record("sampler FLUX.1 fp32 InstantX window [0.2, 0.8]", diff_in)
    record("sampler FLUX.1 fp32 InstantX window [0.5, 1] (closed)", diff_out)
    assert diff_in <= TOLERANCE, f"window [0.2, 0.8] holding the step: {diff_in:.2e} from the reference"
    assert diff_out <= TOLERANCE, f"window [0.5, 1] not holding the step: {diff_out:.2e} from the bare model"


def _applications(model) -> list:
    table = model.model_options["transformer_options"]["patches_replace"]["dit"]
    found = []
    for patch in table.values():
        for app in patch.applications():
            if all(app is not other for other in found):
                found.append(app)
    return found


def _mutant(name: str, pair, adapter, cond, uncond):
    apply_adapter, _, image_embeds = pack_api()
    if name == "double_block_0_term_dropped":
        return apply_adapter(pair.comfy, adapter[1], image_embeds(cond, uncond, "pooled"), 0.8,
                             layer_weights=[0.0, 1.0, 1.0])
    if name == "single_block_0_term_dropped":
        return apply_adapter(pair.comfy, adapter[1], image_embeds(cond, uncond, "pooled"), 0.8,
                             layer_weights=[1.0, 1.0, 0.0])
    if name == "cond_uncond_swapped":
        return apply_adapter(pair.comfy, adapter[1], image_embeds(uncond, cond, "pooled"), 0.8)
    if name == "image_key_norm_dropped":
        model = apply_adapter(pair.comfy, adapter[1], image_embeds(cond, uncond, "pooled"), 0.8)
        (application,) = _applications(model)
        application.normalise_keys = False
        application._kv_cache.clear()
        return model
    raise ValueError(name)


MUTANTS = ("double_block_0_term_dropped", "single_block_0_term_dropped", "cond_uncond_swapped",
           "image_key_norm_dropped")


@pytest.mark.slow
@pytest.mark.parametrize("mutant", MUTANTS)
@torch.inference_mode()
def test_mutant_fails_parity(pair, adapter, base_case, mutant):
    step, cond, uncond, _, expected, _, _, inputs = base_case
    diff, _ = fp.flux_parity(_mutant(mutant, pair, adapter, cond, uncond), step, expected, inputs)
    record(f"mutant FLUX.1 InstantX {mutant}", diff)
    assert diff > MARGIN * TOLERANCE, f"mutant {mutant} passes parity ({diff:.2e}): the test has no teeth there"


# --- refusals --------------------------------------------------------------------------------


def test_refuses_clip_embeds(adapter, pair):
    apply_adapter, _, image_embeds = pack_api()
    with pytest.raises(ValueError, match=r"flux-instantx-ip-adapter\.safetensors is an InstantX FLUX\.1 adapter: it "
                                         r"takes SigLIP so400m/384 pooled embeddings \(1152 wide.*these embeds are "
                                         r"ViT-L image_embeds \(768 wide\)"):
        apply_adapter(pair.comfy, adapter[1], image_embeds(torch.randn(1, 768), torch.zeros(1, 768), "image_embeds"),
                      1.0)


def test_refuses_other_depth(pair, tmp_path):
    apply_adapter, cache, image_embeds = pack_api()
    path = tmp_path / "instantx-4.safetensors"
    save_file(instantx_flux_state_dict(2, depth=4, seed=82), str(path))
    with pytest.raises(ValueError, match=r"instantx-4\.safetensors has 4 block processors but Flux(Schnell)? has 2 "
                                         r"double \+ 1 single blocks = 3"):
        apply_adapter(pair.comfy, cache.get(str(path)), image_embeds(pooled(1, 1), pooled(1, 2), "pooled"), 1.0)


def test_refuses_non_flux_model(adapter):
    from tests.harness import parity

    apply_adapter, _, image_embeds = pack_api()
    sdxl = parity.build_pair("SDXL", narrow=True, share_weights=True)
    with pytest.raises(ValueError, match=r"flux-instantx-ip-adapter\.safetensors is an InstantX FLUX\.1 IP-Adapter "
                                         r"\(3 Flux blocks\) but the model is SDXL, not a Flux model"):
        apply_adapter(sdxl.comfy, adapter[1], image_embeds(pooled(1, 1), pooled(1, 2), "pooled"), 1.0)


def test_layout_detection(adapter):
    from ipadapter_pack.ip_adapter_core.layout import AdapterFormatError, detect, split_state_dict

    spec = detect(split_state_dict(adapter[0]))
    assert (spec.family, spec.encoder, spec.encoder_output, spec.embed_dim, spec.tokens, spec.depth) == (
        "flux-instantx", "SigLIP so400m/384", "pooled", 1152, TOKENS, 3), spec
    broken = dict(adapter[0])
    broken["ip_adapter.1.to_k_ip.bias"] = torch.zeros(3072)
    with pytest.raises(AdapterFormatError, match=r"without bias \(missing or unknown: 1\.to_k_ip\.bias\)"):
        detect(split_state_dict(broken))
    vit_l = dict(adapter[0])
    vit_l["image_proj.proj.0.weight"] = torch.zeros(2304, 768)
    with pytest.raises(AdapterFormatError, match=r"takes 768-wide embeddings \(ViT-L\); the InstantX FLUX\.1 "
                                                 r"IP-Adapter takes SigLIP so400m/384 pooled embeddings \(1152\)"):
        detect(split_state_dict(vit_l))


# --- SigLIP pooled output --------------------------------------------------------------------


def test_siglip_pooled_matches_transformers(tmp_path):
    """The pack's SigLIP loader (ComfyUI key layout, local config) vs transformers' own from_pretrained of the
    same weights: pooler_output on the same pixels. Real width (1152, 16 heads, 729 positions), 2 layers."""
    from tests.harness import torchvision_cpu

    torchvision_cpu.install()
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from ipadapter_pack.models.siglip_pooled import SO400M_384, build_siglip_pooled, siglip_pooled

    tensors = siglip_state_dict(layers=2, seed=83)
    ours = build_siglip_pooled(tensors, "siglip-so400m-2layers.safetensors")
    folder = tmp_path / "siglip"
    folder.mkdir()
    SiglipVisionConfig(num_hidden_layers=2, **SO400M_384).save_pretrained(folder)
    save_file(tensors, str(folder / "model.safetensors"))
    theirs = SiglipVisionModel.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32).eval()
    pixels = torch.rand(2, 3, 384, 384, generator=torch.Generator().manual_seed(84)) * 2 - 1
    with torch.inference_mode():
        got = siglip_pooled(ours, pixels)
        want = theirs(pixel_values=pixels).pooler_output
    diff = relative_difference(got, want)
    record("SigLIP so400m pooled vs transformers", diff)
    assert got.shape == (2, 1152) and diff <= 1e-5, f"pooled output differs from transformers' by {diff:.2e}"
    no_head = {k: v for k, v in tensors.items() if ".head." not in k}
    with pytest.raises(ValueError, match=r"sigclip-nohead\.safetensors has no SigLIP attention-pooling head "
                                         r"\(vision_model\.head\.probe"):
        build_siglip_pooled(no_head, "sigclip-nohead.safetensors")


def test_encode_node_siglip_pooled(comfy_inprocess, tmp_path):
    """IP-Adapter Encode Image (SigLIP pooled) on a clip_vision file: the pooled embeddings of transformers'
    SiglipVisionModel (from_pretrained of the same weights) on ComfyUI's 384-px SigLIP preprocessing of the
    image, a zero negative, output kind "pooled"; a file without the pooling head is refused by name."""
    import comfy.clip_vision
    import folder_paths

    from tests.harness import torchvision_cpu

    torchvision_cpu.install()
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from ipadapter_pack.models.siglip_pooled import SO400M_384
    from ipadapter_pack.nodes.encode_siglip import EncodeIPAdapterSigLIPPooled

    tensors = siglip_state_dict(layers=1, seed=85)
    folder = tmp_path / "clip_vision"
    folder.mkdir()
    save_file(tensors, str(folder / "siglip-so400m-head.safetensors"))
    save_file({k: v for k, v in tensors.items() if ".head." not in k}, str(folder / "sigclip-nohead.safetensors"))
    folder_paths.add_model_folder_path("clip_vision", str(folder))
    image = torch.rand(2, 200, 300, 3, generator=torch.Generator().manual_seed(86))
    (embeds,) = EncodeIPAdapterSigLIPPooled().encode("siglip-so400m-head.safetensors", image, "squash",
                                                     "reference (zero)")
    hf = tmp_path / "hf"
    hf.mkdir()
    SiglipVisionConfig(num_hidden_layers=1, **SO400M_384).save_pretrained(hf)
    save_file(tensors, str(hf / "model.safetensors"))
    theirs = SiglipVisionModel.from_pretrained(hf, local_files_only=True, torch_dtype=torch.float32).eval()
    pixels = comfy.clip_vision.clip_preprocess(image, size=384, mean=[0.5] * 3, std=[0.5] * 3, crop=False)
    with torch.inference_mode():
        want = theirs(pixel_values=pixels).pooler_output
    diff = relative_difference(embeds.cond, want)
    record("SigLIP so400m pooled, Encode node vs transformers", diff)
    assert embeds.output == "pooled" and embeds.cond.shape == (2, 1152) and diff <= 1e-5, (
        f"Encode (SigLIP pooled) differs from transformers' pooler_output by {diff:.2e}")
    assert torch.equal(embeds.uncond, torch.zeros(1, 1152))
    with pytest.raises(ValueError, match=r"sigclip-nohead\.safetensors has no SigLIP attention-pooling head"):
        EncodeIPAdapterSigLIPPooled().encode("sigclip-nohead.safetensors", image, "squash", "reference (zero)")


# --- composition -----------------------------------------------------------------------------


class ForeignBlock:
    """Another pack's block replacement that runs the original block (as most do), counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, args: dict, extra: dict) -> dict:
        self.calls += 1
        return extra["original_block"](args)

    def __deepcopy__(self, memo: dict) -> ForeignBlock:
        return self  # model clones share it, so its counter sees every call


@pytest.mark.slow
@torch.inference_mode()
def test_two_applications_stack(pair, adapter, base_case):
    """The same adapter applied twice (0.5, then 0.3) = the reference at 0.8: the terms add inside each block,
    which runs once (our stacked double-block patches share one block computation)."""
    apply_adapter, _, image_embeds = pack_api()
    step, cond, uncond, _, expected, _, _, inputs = base_case
    embeds = image_embeds(cond, uncond, "pooled")
    once = apply_adapter(pair.comfy, adapter[1], embeds, 0.5)
    twice = apply_adapter(once, adapter[1], embeds, 0.3)
    diff, _ = fp.flux_parity(twice, step, expected, inputs)
    record("sampler FLUX.1 fp32 InstantX 0.5 + 0.3 stacked = 0.8", diff)
    assert diff <= TOLERANCE, f"two applications 0.5 + 0.3 vs the reference at 0.8: {diff:.2e}"


@pytest.mark.slow
@torch.inference_mode()
def test_composes_with_another_packs_block_replacements(pair, adapter, base_case):
    """Replacements already on every double and single block keep running (once per block and call), and the
    terms are still exact."""
    apply_adapter, _, image_embeds = pack_api()
    step, cond, uncond, _, expected, _, _, inputs = base_case
    foreign = ForeignBlock()
    model = pair.comfy.clone()
    for kind, count in (("double_block", 2), ("single_block", 1)):
        for i in range(count):
            model.set_model_patch_replace(foreign, "dit", kind, i)
    patched = apply_adapter(model, adapter[1], image_embeds(cond, uncond, "pooled"), 0.8)
    diff, _ = fp.flux_parity(patched, step, expected, inputs)
    record("sampler FLUX.1 fp32 InstantX over another pack's block replacements", diff)
    assert foreign.calls == 3, f"the other pack's replacements ran {foreign.calls} times for 3 blocks in one call"
    assert diff <= TOLERANCE, f"over another pack's block replacements: {diff:.2e}"


@pytest.mark.slow
@torch.inference_mode()
def test_stacks_with_xlabs_in_either_order(pair, adapter, base_case, tmp_path):
    """XLabs v1 and InstantX on one model: the XLabs term goes after the double block and InstantX's inside it,
    so the order of the two Apply nodes must not matter; and each changes what the other alone gives."""
    from tests.fixtures.flux_models import xlabs_state_dict

    apply_adapter, cache, image_embeds = pack_api()
    step, cond, uncond, result, _, _, _, inputs = base_case
    path = tmp_path / "flux-ip-adapter-v1.safetensors"
    save_file(xlabs_state_dict(4, depth=2, seed=87), str(path))
    xlabs = cache.get(str(path))
    clip = image_embeds(torch.randn(1, 768, generator=torch.Generator().manual_seed(88)), torch.zeros(1, 768),
                        "image_embeds")
    siglip = image_embeds(cond, uncond, "pooled")
    instantx_first = apply_adapter(apply_adapter(pair.comfy, adapter[1], siglip, 0.8), xlabs, clip, 0.7)
    xlabs_first = apply_adapter(apply_adapter(pair.comfy, xlabs, clip, 0.7), adapter[1], siglip, 0.8)
    a = fp.comfy_flux_step(instantx_first, step)
    b = fp.comfy_flux_step(xlabs_first, step)
    xlabs_alone = fp.comfy_flux_step(apply_adapter(pair.comfy, xlabs, clip, 0.7), step)
    order = relative_difference(a.eps, b.eps)
    from_instantx = relative_difference(a.eps, result.eps)
    from_xlabs = relative_difference(a.eps, xlabs_alone.eps)
    record("sampler FLUX.1 fp32 InstantX + XLabs, order swapped", order)
    assert order <= TOLERANCE, f"InstantX then XLabs vs XLabs then InstantX: {order:.2e}"
    assert from_instantx > 0.01 and from_xlabs > 0.01, (
        f"stacked vs InstantX alone {from_instantx:.2e}, vs XLabs alone {from_xlabs:.2e}: one of them did not act")


@pytest.mark.slow
@torch.inference_mode()
def test_bf16_weights_manual_cast(pair, adapter, base_case):
    """ComfyUI's CPU default for bf16 weights: stored bf16, computed in fp32 ("manual cast"): the blocks' modules
    cast their weights per call, so the query (qkv / linear1) and the single block's linear2 share go through the
    modules themselves. The stand-in file and the adapter are bf16 already: the reference holds the same values."""
    import comfy.sd

    apply_adapter, _, image_embeds = pack_api()
    step, cond, uncond, _, expected, _, _, inputs = base_case
    model = comfy.sd.load_diffusion_model(str(ensure_flux_transformer()), model_options={"dtype": torch.bfloat16})
    try:
        assert model.model.manual_cast_dtype == torch.float32, "expected ComfyUI's CPU manual cast for bf16 weights"
        assert model.model.diffusion_model.single_blocks[0].linear2.comfy_cast_weights
        patched = apply_adapter(model, adapter[1], image_embeds(cond, uncond, "pooled"), 0.8)
        diff, _ = fp.flux_parity(patched, step, expected, inputs)
    finally:
        del model
        gc.collect()
    record("sampler FLUX.1 bf16 weights manual cast InstantX w0.8", diff)
    assert diff <= TOLERANCE, f"bf16 weights computed in fp32: {diff:.2e}"


def test_refuses_per_token_modulation(pair, adapter):
    """A model call with more modulation vectors than latents (reference latents at timestep zero, whose
    modulation_dims the block replacement never receives) is refused, not computed wrongly."""
    apply_adapter, _, image_embeds = pack_api()
    patched = apply_adapter(pair.comfy, adapter[1], image_embeds(pooled(1, 1), pooled(1, 2), "pooled"), 1.0)
    table = patched.model_options["transformer_options"]["patches_replace"]["dit"]
    args = {"img": torch.zeros(1, 4, 3072), "txt": torch.zeros(1, 2, 3072), "vec": torch.zeros(2, 3072),
            "pe": None, "transformer_options": {}}
    for key in (("double_block", 0), ("single_block", 0)):
        with pytest.raises(ValueError, match=r"runs 2 modulation vectors for 1 latents \(reference latents at "
                                             r"timestep zero"):
            table[key](args, {"original_block": lambda a: pytest.fail("the block ran")})


def test_clip_vision_encode_refuses_instantx(adapter):
    """IP-Adapter Encode Image (a CLIP_VISION input) cannot give SigLIP's pooled output: it says which node can."""
    from ipadapter_pack.nodes.encode import encode_embeds

    with pytest.raises(ValueError, match=r"InstantX FLUX\.1 IP-Adapter: it takes SigLIP so400m/384 pooled embeddings.*"
                                         r"use IP-Adapter Encode Image \(SigLIP pooled\)"):
        encode_embeds(object(), torch.rand(1, 64, 64, 3), adapter[1].spec, "center", "reference (zero)")
