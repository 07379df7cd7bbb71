"""InstantX SD3.5-Large IP-Adapter: parity with diffusers through ComfyUI's sampler path (fp32).

The pack's patched SD3 MODEL goes through `comfy.sample.sample` as the KSampler (Advanced) node runs
it, one Euler step of an 8-step "simple" schedule with CFG 4.5, cond and uncond batched (ComfyUI's
order, negative first); diffusers' SD3Transformer2DModel, with the adapter file loaded by its own
`SD3IPAdapterMixin.load_ip_adapter`, gets the very inputs ComfyUI's diffusion model got (latents,
prompts, pooled prompts; timestep = 1000 x sigma, checked) and its SigLIP states negative half first.
Model: the small width-consistent SD3 of tests/fixtures/sd3_models.py (2 joint blocks of 2 heads x 64),
the adapter at its width with the real resampler sizes (1152 -> 1280, 20 heads, 4 layers, 64 tokens).

Covered: the bare model; weight 1.3 on one latent; weight -0.6 on two non-square latents with one
reference each; two references concatenated (diffusers' resampler run per reference, tokens joined);
two references averaged; the same patched model at two sigmas of the schedule (the time embedding
must follow the step); a start/end window holding the step (adapter on) and one not holding it (=
bare). Mutants that must fail by a clear margin: one block's term dropped, the term added after the
block instead of before to_out, the time embedding frozen at the first step, cond/uncond swapped,
the adapter's norms applied on top of the block's ln_q/ln_k. Plus one SD3.5 Large joint block at
real width (2432 = 38 heads x 64) with its image attention against diffusers' block + processor
(the file's block and resampler converted by diffusers' own converters), and the refusals.

Tolerance: max |ours - diffusers| / max |diffusers| <= 1e-4 (measured figures in the messages and in
out/parity.json).
"""

from __future__ import annotations

import gc
import logging
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from tests.fixtures import sd3_models
from tests.harness import sd3_parity as h
from tests.harness.parity import record
from tests.harness.reference_unets import relative_difference

TOLERANCE = h.TOLERANCE
MUTANT_MARGIN = 10  # a mutant must miss diffusers by at least this many tolerances
WIDTH, DEPTH = 128, 2
SIGLIP = (sd3_models.SIGLIP_TOKENS, sd3_models.SIGLIP_WIDTH)
LATENT = (16, 16)

log = logging.getLogger(__name__)


def _pack():
    from ipadapter_pack.ip_adapter_core.embeds import ImageEmbeds
    from ipadapter_pack.nodes import comfy_seam
    from ipadapter_pack.nodes.apply import apply_adapter

    return apply_adapter, comfy_seam, ImageEmbeds


@pytest.fixture(scope="module")
def pair(comfy_inprocess):
    built = h.build_sd3_pair(sd3_models.ensure_small_sd3(), sd3_models.SMALL_CONFIG)
    yield built
    del built
    gc.collect()


@pytest.fixture(scope="module")
def adapter(pair, tmp_path_factory):
    """The InstantX stand-in at the small model's width, as a file: ours through the pack's cache,
    diffusers' through its own loader."""
    _, seam, _ = _pack()
    path = tmp_path_factory.mktemp("sd3_adapter") / "ip-adapter_sd35_128.safetensors"
    save_file(sd3_models.instantx_state_dict(WIDTH, DEPTH, seed=41), str(path))
    h.load_instantx_into_diffusers(pair.diffusers, path, 1.0)
    return seam.ADAPTERS.get(str(path))


def _scale(transformer, weight: float) -> None:
    for processor in transformer.attn_processors.values():
        processor.scale = weight


def _states(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(count, *SIGLIP, generator=gen), torch.randn(count, *SIGLIP, generator=gen)


class _PerReference(torch.nn.Module):
    """diffusers' own resampler run on each of `refs` references (joined along the tokens), their image
    tokens concatenated: what 'concat' means for this adapter (diffusers has no several-image path here)."""

    def __init__(self, proj: torch.nn.Module, refs: int):
        super().__init__()
        self.proj, self.refs = proj, refs

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [self.proj(part, timestep) for part in x.chunk(self.refs, dim=1)]
        return torch.cat([tokens for tokens, _ in outs], dim=1), outs[0][1]


def _reference(pair, step: h.SD3Step, model, weight: float, embeds: torch.Tensor | None,
               refs: int = 1) -> tuple[torch.Tensor, h.SD3Inputs, float]:
    """diffusers' CFG velocity on the inputs ComfyUI gave `model`, and our figure for `model`."""
    result = h.comfy_sd3_step(model, step)
    inputs = h.inputs_of(result, step)
    _scale(pair.diffusers, weight)
    original = getattr(pair.diffusers, "image_proj", None)  # set once the adapter is loaded
    if refs > 1:
        pair.diffusers.image_proj = _PerReference(original, refs)
    try:
        ref = h.diffusers_sd3_step(pair.diffusers, inputs, step.cfg, embeds)
    finally:
        if refs > 1:
            pair.diffusers.image_proj = original
    return ref, inputs, relative_difference(result.v, ref)


@pytest.mark.slow
@torch.inference_mode()
def test_bare_sd3_matches_diffusers(pair):
    step = h.make_sd3_step(LATENT, seed=1)
    _, _, err = _reference(pair, step, pair.comfy, 1.0, None)
    record("sd3 bare (small SD3, sampler step)", err)
    assert err <= TOLERANCE, f"bare SD3: ComfyUI vs diffusers {err:.2e} > {TOLERANCE:.0e}"


# (id, weight, latents, latent h x w, references, one per latent, combine)
CASES = [
    ("w1.3", 1.3, 1, LATENT, 1, False, "concat"),
    ("w-0.6_2latents_12x20_one_per_latent", -0.6, 2, (12, 20), 2, True, "concat"),
    ("w0.9_2refs_concat", 0.9, 1, LATENT, 2, False, "concat"),
    ("w1.1_2refs_average", 1.1, 1, LATENT, 2, False, "average"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@torch.inference_mode()
def test_sd3_adapter_matches_diffusers(pair, adapter, case):
    name, weight, batch, hw, refs, one_per_latent, combine = case
    apply_adapter, _, image_embeds = _pack()
    cond, uncond = _states(refs, seed=7)
    if combine == "concat" and not one_per_latent:
        uncond = uncond[:1]  # one shared negative, repeated per reference (the pack's concat rule)
    step = h.make_sd3_step(hw, batch=batch, seed=2)
    model = apply_adapter(pair.comfy, adapter, image_embeds(cond, uncond, "penultimate"), weight,
                          combine_embeds=combine, one_per_latent=one_per_latent)
    if one_per_latent:
        embeds, diff_refs = torch.cat([uncond, cond]), 1
    elif combine == "average":
        embeds, diff_refs = torch.cat([uncond.mean(0, keepdim=True).expand(batch, -1, -1),
                                       cond.mean(0, keepdim=True).expand(batch, -1, -1)]), 1
    else:  # concat: references joined along the tokens, each run through the resampler on its own
        joined = cond.reshape(1, -1, SIGLIP[1]).expand(batch, -1, -1)
        negative = uncond.expand(refs, -1, -1).reshape(1, -1, SIGLIP[1]).expand(batch, -1, -1)
        embeds, diff_refs = torch.cat([negative, joined]), refs
    ref, _, err = _reference(pair, step, model, weight, embeds, diff_refs)
    bare = h.diffusers_sd3_step(pair.diffusers, h.inputs_of(h.comfy_sd3_step(pair.comfy, step), step), step.cfg)
    effect = relative_difference(ref, bare)
    record(f"sd3 {name}", err)
    assert effect > 100 * TOLERANCE, f"{name}: the adapter moves diffusers' output by only {effect:.2e}"
    assert err <= TOLERANCE, f"{name}: ComfyUI + pack vs diffusers {err:.2e} > {TOLERANCE:.0e} (effect {effect:.2e})"


STEPS = (1, 5)  # two sigmas of the 8-step schedule: the time embedding must follow the step


@pytest.fixture(scope="module")
def two_sigmas(pair, adapter):
    """One patched model; diffusers' references at two steps (sigmas) of the schedule."""
    apply_adapter, _, image_embeds = _pack()
    cond, uncond = _states(1, seed=9)
    weight = 1.4
    model = apply_adapter(pair.comfy, adapter, image_embeds(cond, uncond, "penultimate"), weight)
    embeds = torch.cat([uncond, cond])
    refs = []
    with torch.inference_mode():
        for index in STEPS:
            step = h.make_sd3_step(LATENT, seed=3, step=index)
            ref, inputs, _ = _reference(pair, step, pair.comfy, weight, embeds)
            refs.append((step, ref, inputs))
    return model, embeds, weight, refs


@pytest.mark.slow
@torch.inference_mode()
def test_sd3_time_embedding_follows_the_step(two_sigmas):
    model, _, _, refs = two_sigmas
    errors, sigmas = [], []
    for step, ref, inputs in refs:
        err, result = h.sd3_parity(model, step, ref, inputs)
        errors.append(err)
        sigmas.append(result.sigma)
        record(f"sd3 w1.4 step {step.step} (sigma {result.sigma:.3f})", err)
    assert sigmas[0] != sigmas[1], f"both steps ran at sigma {sigmas[0]}"
    assert max(errors) <= TOLERANCE, (
        f"at sigmas {sigmas}: ComfyUI + pack vs diffusers {', '.join(f'{e:.2e}' for e in errors)} > {TOLERANCE:.0e}")


@pytest.mark.slow
@torch.inference_mode()
def test_sd3_schedule_window(pair, adapter, two_sigmas):
    """start/end as fractions of the schedule: a window holding the step applies the adapter, one not
    holding it leaves the model bare."""
    apply_adapter, _, image_embeds = _pack()
    _, embeds, weight, refs = two_sigmas
    step, ref, inputs = refs[1]
    sampling = pair.comfy.get_model_object("model_sampling")
    sigma = inputs.sigma
    inside, outside = (0.3, 0.9), (0.0, 0.3)
    assert sampling.percent_to_sigma(inside[0]) >= sigma >= sampling.percent_to_sigma(inside[1])
    assert not sampling.percent_to_sigma(outside[0]) >= sigma >= sampling.percent_to_sigma(outside[1])
    uncond, cond = embeds.chunk(2)
    figures = {}
    for name, (start, end) in (("inside", inside), ("outside", outside)):
        model = apply_adapter(pair.comfy, adapter, image_embeds(cond, uncond, "penultimate"), weight,
                              start_at=start, end_at=end)
        expected = ref if name == "inside" else h.diffusers_sd3_step(pair.diffusers, inputs, step.cfg)
        figures[name], _ = h.sd3_parity(model, step, expected, inputs)
        record(f"sd3 window {name} ({start}, {end}) at sigma {sigma:.3f}", figures[name])
    assert max(figures.values()) <= TOLERANCE, f"window: {figures} > {TOLERANCE:.0e}"


# --- mutants -------------------------------------------------------------------------------------


def _term_after_block(seam):
    """The term added to the block's picture output (after to_out, gate and MLP) instead of before to_out."""
    original = seam.sd3_joint_block

    def mutant(block, args, terms):
        seen = []

        def spy(q, k, v, heads, options):
            seen.append(None)
            out = [t(q, k, v, heads, options) for t in terms]
            seen[-1] = sum(o for o in out if o is not None)
            return None

        out = original(block, args, [spy])
        return {"txt": out["txt"], "img": out["img"] + seen[-1]}

    return mutant


def _norms_on_block_norms(seam):
    """The adapter's norm_q/norm_k fed the block's ln_q/ln_k output instead of the raw projections."""
    original = seam.SD3JointBlockPatch.term

    def mutant(self, q_raw, k_raw, v, heads, options):
        attn = self._model().diffusion_model.joint_blocks[self.block_index].x_block.attn
        b, n, _ = q_raw.shape
        q = attn.ln_q(q_raw.reshape(b, n, heads, -1)).reshape(b, n, -1)
        k = attn.ln_k(k_raw.reshape(b, n, heads, -1)).reshape(b, n, -1)
        return original(self, q, k, v, heads, options)

    return mutant


def _frozen_time(seam):
    """The timesteps of the first call kept for every later call."""
    original = seam.sd3_timesteps
    first: list[torch.Tensor] = []

    def mutant(base_model, sigmas, rows):
        if not first:
            first.append(original(base_model, sigmas, rows))
        return first[0]

    return mutant


MUTANTS = ("block 1 term dropped", "term after the block", "time frozen at the first step",
           "cond/uncond swapped", "adapter norms on top of ln_q/ln_k")


@pytest.mark.slow
@pytest.mark.parametrize("mutant", MUTANTS)
@torch.inference_mode()
def test_sd3_mutants_fail(pair, adapter, two_sigmas, mutant, monkeypatch):
    apply_adapter, seam, image_embeds = _pack()
    _, embeds, weight, refs = two_sigmas
    uncond, cond = embeds.chunk(2)
    layer_weights = None
    if mutant == "block 1 term dropped":
        layer_weights = (1.0, 0.0)
    elif mutant == "cond/uncond swapped":
        cond, uncond = uncond, cond
    elif mutant == "term after the block":
        monkeypatch.setattr(seam.sd3, "sd3_joint_block", _term_after_block(seam))
    elif mutant == "time frozen at the first step":
        monkeypatch.setattr(seam.sd3, "sd3_timesteps", _frozen_time(seam))
    else:
        monkeypatch.setattr(seam.SD3JointBlockPatch, "term", _norms_on_block_norms(seam))
    model = apply_adapter(pair.comfy, adapter, image_embeds(cond, uncond, "penultimate"), weight,
                          layer_weights=layer_weights)
    # The frozen mutant first sees step STEPS[0], then is measured at STEPS[1]; the others at STEPS[1].
    if mutant == "time frozen at the first step":
        first_err, _ = h.sd3_parity(model, refs[0][0], refs[0][1], refs[0][2])
        assert first_err <= TOLERANCE, f"the frozen mutant should still match at its first step ({first_err:.2e})"
    step, ref, inputs = refs[1]
    err, _ = h.sd3_parity(model, step, ref, inputs)
    record(f"sd3 mutant: {mutant}", err)
    assert err > MUTANT_MARGIN * TOLERANCE, (
        f"mutant '{mutant}' is within {err:.2e} of diffusers (must miss by > {MUTANT_MARGIN * TOLERANCE:.0e})")


# --- one SD3.5 Large joint block at real width --------------------------------------------------


def _comfy_joint_block(diffusers_block: torch.nn.Module, depth: int) -> torch.nn.Module:
    """ComfyUI's JointBlock as its MMDiT builds SD3.5 Large's (not the last block), holding the diffusers
    block's weights mapped with ComfyUI's own diffusers-key map (q/k/v joined into qkv)."""
    import comfy.ops
    import comfy.utils
    from comfy.ldm.modules.diffusionmodules.mmdit import JointBlock

    with torch.device("meta"):
        block = JointBlock(sd3_models.LARGE_WIDTH, sd3_models.LARGE_HEADS, mlp_ratio=4.0, qkv_bias=True,
                           attn_mode="torch", pre_only=False, rmsnorm=False, scale_mod_only=False, swiglu=False,
                           qk_norm="rms", x_block_self_attn=False, dtype=torch.float32, device="meta",
                           operations=comfy.ops.disable_weight_init)
    shapes = {name: p.shape for name, p in block.named_parameters()}
    mapping = comfy.utils.mmdit_to_diffusers({"depth": depth, "num_blocks": 1})
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in diffusers_block.state_dict().items():
        target = mapping["transformer_blocks.0." + name]
        if isinstance(target, str):
            weights[target.removeprefix("joint_blocks.0.")] = tensor.clone()
            continue
        key, (dim, start, size) = target[0].removeprefix("joint_blocks.0."), target[1]
        full = weights.setdefault(key, torch.empty(shapes[key]))
        full.narrow(dim, start, size).copy_(tensor)
    assert set(weights) == set(shapes), f"unmapped: {sorted(set(shapes) ^ set(weights))[:4]}"
    block.load_state_dict(weights, strict=True, assign=True)
    return block.eval().requires_grad_(False)


@pytest.mark.slow
@torch.inference_mode()
def test_real_width_joint_block_matches_diffusers(comfy_inprocess):
    """SD3.5 Large's joint block (2432 wide, 38 heads) with the InstantX term, alone: diffusers'
    JointTransformerBlock with SD3IPAdapterJointAttnProcessor2_0 and IPAdapterTimeImageProjection (both
    built by diffusers' SD3 converters from the file's tensors) against ComfyUI's JointBlock run by the
    pack's block function with the pack's term."""
    from diffusers import SD3Transformer2DModel

    from ipadapter_pack.ip_adapter_core.sd3 import SD3Application
    from ipadapter_pack.models.sd3_adapter import SD3IPAdapterModel

    _, seam, _ = _pack()
    weight = 1.2
    flat = sd3_models.instantx_state_dict(sd3_models.LARGE_WIDTH, 1, seed=43)
    ours = SD3IPAdapterModel.from_state_dict(flat)
    nested = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        head, rest = key.split(".", 1)
        nested[head][rest] = value
    converter = SimpleNamespace(
        config=SimpleNamespace(attention_head_dim=sd3_models.HEAD_DIM, num_attention_heads=sd3_models.LARGE_HEADS),
        attn_processors={"transformer_blocks.0.attn.processor": None})
    processor = SD3Transformer2DModel._convert_ip_adapter_attn_to_diffusers(
        converter, nested["ip_adapter"], low_cpu_mem_usage=False)["transformer_blocks.0.attn.processor"]
    processor.scale = weight
    image_proj = SD3Transformer2DModel._convert_ip_adapter_image_proj_to_diffusers(
        converter, nested["image_proj"], low_cpu_mem_usage=False).eval()
    del flat, nested

    block = sd3_models.large_joint_block()
    comfy_block = _comfy_joint_block(block, depth=sd3_models.LARGE_HEADS)  # before the processor joins the block
    block.attn.set_processor(processor)

    gen = torch.Generator().manual_seed(44)
    batch, picture, text = 2, 8 * 6, 7  # uncond row first, then cond; a 16 x 12 latent's 2 x 2 patches
    x = torch.randn(batch, picture, sd3_models.LARGE_WIDTH, generator=gen)
    context = torch.randn(batch, text, sd3_models.LARGE_WIDTH, generator=gen)
    vec = torch.randn(batch, sd3_models.LARGE_WIDTH, generator=gen)
    cond, uncond = _states(1, seed=45)
    timesteps = torch.full((batch,), 1000.0 * 0.63)

    tokens, temb = image_proj(torch.cat([uncond, cond]), timesteps)
    expected_txt, expected_img = block(x, context, vec, joint_attention_kwargs={"ip_hidden_states": tokens,
                                                                                "temb": temb})
    bare_txt, bare_img = block(x, context, vec)

    application = SD3Application(ours, cond[:, None], uncond[:, None], weight)

    def term(q_raw, k_raw, v, heads, options):
        return application.block_term(0, q_raw, k_raw, v, heads, timesteps, [False, True])

    out = seam.sd3_joint_block(comfy_block, {"img": x, "txt": context, "vec": vec, "transformer_options": {}},
                               [term])
    err_img = relative_difference(out["img"], expected_img)
    err_txt = relative_difference(out["txt"], expected_txt)
    effect = relative_difference(expected_img, bare_img)
    record("sd3 real-width joint block (2432) picture", err_img)
    record("sd3 real-width joint block (2432) text", err_txt)
    assert effect > 100 * TOLERANCE, f"the term moves diffusers' block output by only {effect:.2e}"
    assert max(err_img, err_txt) <= TOLERANCE, (
        f"2432-wide joint block: picture {err_img:.2e}, text {err_txt:.2e} > {TOLERANCE:.0e} (effect {effect:.2e})")


# --- refusals -------------------------------------------------------------------------------------


@pytest.mark.slow
@torch.inference_mode()
def test_sd3_refusals_name_both_sides(pair, adapter, sd15, models, tmp_path):
    """An SD3 adapter on a UNet model, a UNet adapter on SD3, CLIP encodings for SigLIP states, an adapter of
    another depth or width, a CLIP-width resampler: each refused before anything is patched."""
    from ipadapter_pack.ip_adapter_core.layout import AdapterFormatError, detect, split_state_dict

    apply_adapter, seam, image_embeds = _pack()
    cond, uncond = _states(1, seed=11)
    siglip = image_embeds(cond, uncond, "penultimate")
    with pytest.raises(ValueError, match=r"InstantX SD3 \(128 wide\).*not an SD3 model"):
        apply_adapter(sd15, adapter, siglip, 1.0)
    sd15_adapter = seam.ADAPTERS.get(str(models["ipadapter/sd15_tiny_base.safetensors"]))
    with pytest.raises(ValueError, match=r"SD1.5 IP-Adapter but the model is .*SD3 model"):
        apply_adapter(pair.comfy, sd15_adapter, image_embeds(torch.zeros(1, 1024), torch.zeros(1, 1024),
                                                             "image_embeds"), 1.0)
    vit_h = image_embeds(torch.zeros(1, 257, 1280), torch.zeros(1, 257, 1280), "penultimate")
    with pytest.raises(ValueError, match=r"SigLIP so400m/384 penultimate .*1152.*ViT-H penultimate \(1280 wide\)"):
        apply_adapter(pair.comfy, adapter, vit_h, 1.0)
    clip_l = image_embeds(torch.zeros(1, 768), torch.zeros(1, 768), "image_embeds")
    with pytest.raises(ValueError, match=r"ViT-L image_embeds \(768 wide\)"):
        apply_adapter(pair.comfy, adapter, clip_l, 1.0)
    for name, width, depth in (("deeper", WIDTH, 3), ("wider", 192, 2)):
        path = tmp_path / f"{name}.safetensors"
        save_file(sd3_models.instantx_state_dict(width, depth, seed=5, resampler_dim=256, resampler_heads=4), str(path))
        other = seam.ADAPTERS.get(str(path))
        with pytest.raises(ValueError, match=rf"{depth} joint blocks {width} wide .* has 2 joint blocks 128 wide"):
            apply_adapter(pair.comfy, other, siglip, 1.0)
    clip_width = sd3_models.instantx_state_dict(WIDTH, 1, seed=6, resampler_dim=256, resampler_heads=4)
    clip_width["image_proj.proj_in.weight"] = torch.zeros(256, 1280)
    with pytest.raises(AdapterFormatError, match=r"1280-wide hidden states \(ViT-H\).*SigLIP so400m/384"):
        detect(split_state_dict(clip_width))


# --- stacking and composing -----------------------------------------------------------------------


@pytest.mark.slow
@torch.inference_mode()
def test_sd3_stacks_and_composes_with_other_replacements(pair, adapter, two_sigmas, caplog):
    """Two applications of the adapter on one model add their terms in one block run (the term is linear
    in the weight, so 0.5 + 0.9 on the same references is diffusers at 1.4); another pack's joint-block
    replacement that was there first still runs (once per block, with our block as its original_block)
    and parity holds; one that never runs the original block costs our term there, and the log says so."""
    apply_adapter, seam, image_embeds = _pack()
    _, embeds, weight, refs = two_sigmas
    step, ref, inputs = refs[1]
    uncond, cond = embeds.chunk(2)
    siglip = image_embeds(cond, uncond, "penultimate")
    stacked = apply_adapter(apply_adapter(pair.comfy, adapter, siglip, 0.5), adapter, siglip, weight - 0.5)
    patch = stacked.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)]
    assert len(patch.applications()) == 2
    err_stacked, _ = h.sd3_parity(stacked, step, ref, inputs)

    calls = []

    def passing(args, extra):
        calls.append(True)
        return extra["original_block"](args)

    foreign = pair.comfy.clone()
    for i in range(DEPTH):
        foreign.set_model_patch_replace(passing, "dit", "double_block", i)
    composed = apply_adapter(foreign, adapter, siglip, weight)
    err_composed, _ = h.sd3_parity(composed, step, ref, inputs)

    def replacing(args, extra):
        block = pair.comfy.model.diffusion_model.joint_blocks[1]
        # Releases before mid-2025 give replacements (and their blocks) no transformer_options.
        options = {k: args[k] for k in ("transformer_options",) if k in args}
        txt, img = block(args["txt"], args["img"], c=args["vec"], **options)
        return {"txt": txt, "img": img}

    blind = pair.comfy.clone()
    blind.set_model_patch_replace(replacing, "dit", "double_block", 1)
    with caplog.at_level(logging.WARNING):
        h.sd3_parity(apply_adapter(blind, adapter, siglip, weight), step, ref, inputs)
    record("sd3 two applications stacked (0.5 + 0.9)", err_stacked)
    record("sd3 over another pack's joint-block replacement", err_composed)
    assert len(calls) == DEPTH, f"the other replacement ran {len(calls)} times for {DEPTH} blocks"
    assert max(err_stacked, err_composed) <= TOLERANCE, (
        f"stacked {err_stacked:.2e}, over another replacement {err_composed:.2e} > {TOLERANCE:.0e}")
    assert "joint block 1 did not run the original block" in caplog.text


@pytest.mark.slow
@torch.inference_mode()
def test_sd3_file_in_diffusers_naming_builds_the_same_adapter(comfy_inprocess):
    """A file whose resampler carries diffusers' converted names (ln0, attn.to_kv, ff.net.0.proj, adaln_proj,
    ...: the state dict of diffusers' own IPAdapterTimeImageProjection) is read as the same adapter."""
    from diffusers import SD3Transformer2DModel

    from ipadapter_pack.models.ip_adapter import IPAdapterModel

    flat = sd3_models.instantx_state_dict(WIDTH, 1, seed=47, resampler_dim=256, resampler_heads=4)
    instantx = IPAdapterModel.from_state_dict(flat)
    proj = {k.removeprefix("image_proj."): v for k, v in flat.items() if k.startswith("image_proj.")}
    converter = SimpleNamespace()  # the converter reads nothing of its model without low_cpu_mem_usage
    converted = SD3Transformer2DModel._convert_ip_adapter_image_proj_to_diffusers(converter, proj,
                                                                                    low_cpu_mem_usage=False)
    renamed = {f"image_proj.{k}": v for k, v in converted.state_dict().items()}
    assert "image_proj.layers.0.attn.to_kv.weight" in renamed and "image_proj.layers.0.0.to_kv.weight" not in renamed
    renamed.update({k: v for k, v in flat.items() if k.startswith("ip_adapter.")})
    diffusers_named = IPAdapterModel.from_state_dict(renamed)
    assert diffusers_named.spec == instantx.spec
    cond, _ = _states(2, seed=48)
    timesteps = torch.tensor([955.0, 320.0])
    ours = instantx.resample(cond, timesteps, torch.float32, torch.device("cpu"))
    theirs = diffusers_named.resample(cond, timesteps, torch.float32, torch.device("cpu"))
    reference = converted(cond, timesteps)
    for a, b, c in zip(ours, theirs, reference, strict=True):
        assert torch.equal(a, b)
        assert relative_difference(a, c) <= TOLERANCE, f"resampler vs diffusers' {relative_difference(a, c):.2e}"


@pytest.mark.slow
@torch.inference_mode()
def test_sd3_cond_and_uncond_in_separate_calls(pair, two_sigmas):
    """ComfyUI's low-memory path (one model call per cond, the same sigmas tensor for both): the image tokens
    cached for a call must not leak into the other half."""
    from tests.harness.parity import _one_call_per_cond

    model, _, _, refs = two_sigmas
    step, ref, inputs = refs[1]
    separate = model.clone()
    separate.set_model_sampler_calc_cond_batch_function(_one_call_per_cond)
    result = h.comfy_sd3_step(separate, step)
    got = [c.cond_or_uncond for c in result.calls]
    assert sorted(got) == [[h.COND], [h.UNCOND]], f"ComfyUI called the model as {got}"
    err = relative_difference(result.v, ref)
    record("sd3 w1.4 cond and uncond in separate calls", err)
    assert err <= TOLERANCE, f"separate calls: ComfyUI + pack vs diffusers {err:.2e} > {TOLERANCE:.0e}"
