"""FaceID adapters: detection from the weights, projections against diffusers, the LoRA map.

Projections are compared with diffusers' own classes built by diffusers' own converter
(`UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers`) on the same state dict,
at 1e-5 relative (max |ours - diffusers| / max |diffusers|, fp32, CPU). Each comparison is paired
with a mutation (shortcut dropped, s_scale ignored, LayerNorms swapped, tokens shifted, input
normalised) that must push the difference far past that tolerance, so a check that cannot fail
does not pass unnoticed. The LoRA map is checked against the key ids diffusers' own
`_load_ip_adapter_loras` gives (after `_load_ip_adapter_weights`, as `load_ip_adapter` does),
its conversion to PEFT names, and ComfyUI's `unet_to_diffusers` table.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from unittest import mock

import pytest
import torch

from tests.fixtures.faceid_files import (
    FACEID_KINDS,
    SMALL_LORA_RANK,
    _mlp,
    _perceiver,
    faceid_spec,
    faceid_state_dict,
    write,
)
from tests.fixtures.generate import (
    SD15_REAL_HIDDEN,
    SD15_TINY_HIDDEN,
    SDXL_REAL_HIDDEN,
    SDXL_TINY_HIDDEN,
    _adapter_spec,
    _materialize,
    _prefixed,
    attn2_hidden_sizes,
)

log = logging.getLogger(__name__)

TOLERANCE = 1e-5
MUTATION_MARGIN = 100  # a mutation must move the result by more than 100x the tolerance
MINI = {768: [64] * 16, 2048: [64] * 70}  # layer widths for projection tests (the projection ignores them)
BASE = {768: "SD1.5", 2048: "SDXL"}


def rel_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    assert got.shape == expected.shape, f"shape {list(got.shape)} != {list(expected.shape)}"
    return float((got - expected).abs().max() / expected.abs().max())


def assert_mutation_fails(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    diff = rel_diff(got, expected)
    log.info("mutation %s: %.1e", what, diff)
    assert diff > MUTATION_MARGIN * TOLERANCE, f"mutation '{what}' moved the result by {diff:.1e} only: blind check"


def proj_part(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("image_proj."): v.clone() for k, v in flat.items() if k.startswith("image_proj.")}


@contextmanager
def _no_random_init():
    """diffusers builds its projection with random init before loading the weights: skip the
    (slow, 200M-parameter for SDXL Plus) init draws; the load overwrites every tensor anyway."""
    keep = lambda tensor, *args, **kwargs: tensor  # noqa: E731
    with mock.patch.object(torch.nn.init, "kaiming_uniform_", keep), mock.patch.object(torch.nn.init, "uniform_", keep):
        yield


def diffusers_projection(flat: dict[str, torch.Tensor]) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    with _no_random_init():
        # The converter needs `self` only for meta-device loading, which is off here.
        return UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(
            None, proj_part(flat), low_cpu_mem_usage=False).eval()


def arcface(n: int, seed: int, raw: bool = False) -> torch.Tensor:
    """n ArcFace-like embeddings: unit length (normed_embedding), or raw with norms around 20-28."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 512, generator=gen)
    x = x / x.norm(dim=1, keepdim=True)
    return x * (20 + 8 * torch.rand(n, 1, generator=gen)) if raw else x


def crop_states(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 257, 1280, generator=torch.Generator().manual_seed(seed))


def build(flat: dict[str, torch.Tensor]):
    from ipadapter_pack.models.ip_adapter import IPAdapterModel

    return IPAdapterModel.from_state_dict(flat)


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------

REAL_HIDDEN = {768: SD15_REAL_HIDDEN, 2048: SDXL_REAL_HIDDEN}
TINY_HIDDEN = {768: SD15_TINY_HIDDEN, 2048: SDXL_TINY_HIDDEN}
# kind -> variant, projection, face input, crop (encoder, width), LoRA, tokens
EXPECTED = {
    "faceid": ("faceid", "faceid-mlp", "arcface", ("", 0), True, 4),
    "faceid_plus": ("faceid-plus", "faceid-plus", "arcface", ("ViT-H", 1280), True, 4),
    "faceid_portrait": ("faceid-portrait", "faceid-mlp", "arcface", ("", 0), False, 16),
    "faceid_portrait_unnorm": ("faceid-portrait-unnorm", "faceid-resampler", "arcface_raw", ("", 0), False, 16),
}
DETECTION_CASES = [(kind, ctx, size) for kind in FACEID_KINDS for ctx in (768, 2048) for size in ("real", "small")]


@pytest.mark.parametrize("kind,context_dim,size", DETECTION_CASES,
                         ids=[f"{k}-{BASE[c]}-{s}" for k, c, s in DETECTION_CASES])
def test_detects_faceid_variant_from_weights(kind, context_dim, size):
    """Every variant at real and small widths; shapes only (meta tensors), so real SDXL costs nothing."""
    from ipadapter_pack.ip_adapter_core.layout import detect, split_state_dict

    hidden = (REAL_HIDDEN if size == "real" else TINY_HIDDEN)[context_dim]
    spec = detect(split_state_dict(faceid_state_dict(kind, hidden, context_dim, 0, small=size == "small", meta=True)))
    variant, projection, face_input, crop, lora, tokens = EXPECTED[kind]
    rank = (SMALL_LORA_RANK if size == "small" else 128) if lora else 0
    assert (spec.variant, spec.projection, spec.base_model, spec.context_dim, len(spec.layers)) == (
        variant, projection, BASE[context_dim], context_dim, {768: 16, 2048: 70}[context_dim])
    assert (spec.is_faceid, spec.encoder, spec.face_input, spec.embed_dim) == (True, "ArcFace", face_input, 512)
    assert (spec.crop_encoder, spec.crop_embed_dim, spec.needs_face_crop) == (*crop, bool(crop[0]))
    assert (spec.has_lora, spec.lora_rank, spec.tokens) == (lora, rank, tokens)
    assert not spec.uses_hidden_states
    if kind in ("faceid_plus", "faceid_portrait_unnorm"):
        heads = {"faceid_plus": context_dim // 64, "faceid_portrait_unnorm": 20 if size == "real" else 10}[kind]
        assert (spec.resampler_heads, spec.resampler_depth) == (heads, 4)
    assert variant in spec.describe() and ("v2" in spec.describe()) == (kind == "faceid_plus")


@pytest.mark.parametrize("kind", ["base", "vitg", "plus", "fullface", "vith", "plus_vith"])
def test_plain_adapters_are_not_faceid(kind):
    from ipadapter_pack.ip_adapter_core.layout import detect, split_state_dict

    ctx = 2048 if kind in ("vith", "plus_vith") else 768
    flat = {k: torch.empty(s, device="meta") for k, s, _ in _adapter_spec(kind, TINY_HIDDEN[ctx], ctx)}
    spec = detect(split_state_dict(flat))
    assert (spec.is_faceid, spec.face_input, spec.needs_face_crop, spec.has_lora, spec.lora_rank) == (
        False, "", False, False, 0)
    assert spec.variant in ("base", "plus", "full-face")


@pytest.mark.parametrize("kind,context_dim", [("faceid", 768), ("faceid_plus", 768), ("faceid_portrait", 768),
                                              ("faceid_portrait_unnorm", 2048)])
@pytest.mark.parametrize("ext", ["safetensors", "bin"])
def test_files_load_with_their_layout(tmp_path, kind, context_dim, ext):
    """Written as the published files are (fp16; .bin = {"image_proj", "ip_adapter"}) and read back."""
    from ipadapter_pack.models.files import load_adapter, read_state_dict

    hidden = TINY_HIDDEN[context_dim] if context_dim == 768 else MINI[context_dim]
    flat = faceid_state_dict(kind, hidden, context_dim, seed=3, dtype=torch.float16, small=True)
    path = write(flat, tmp_path / f"{kind}.{ext}")
    if ext == "bin":
        nested = torch.load(path, weights_only=True)
        assert set(nested) == {"image_proj", "ip_adapter"}
    assert read_state_dict(str(path)).keys() == flat.keys()
    model = load_adapter(str(path))
    assert model.spec.variant == EXPECTED[kind][0]
    assert all(torch.equal(model.lora[k.removeprefix("ip_adapter.")], v) for k, v in flat.items() if "_lora." in k)
    assert len(model.lora) == (16 * 2 * 8 if EXPECTED[kind][4] else 0)
    assert torch.equal(model.key_value(3).to_k_ip.weight, flat["ip_adapter.7.to_k_ip.weight"])


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


def _meta(spec) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s, _ in spec}


def test_refuses_kolors_faceid_with_the_reason():
    """Kolors FaceID Plus: ProjPlusModel at 4096 (ChatGLM width), 6 tokens, CLIP-L/336 crops (1024),
    and its IP layers under `adapter_modules` (an SDXL-shaped UNet, to_k_ip [hidden, 2048])."""
    from ipadapter_pack.ip_adapter_core.layout import AdapterFormatError
    from ipadapter_pack.models.ip_adapter import IPAdapterModel

    proj = _mlp(4096, 6, 4096) + _prefixed(_perceiver(4096, 1024, 4096), "perceiver_resampler.")
    ip = [(f"{2 * n + 1}.to_{kv}_ip.weight", (h, 2048), "w") for n, h in enumerate(SDXL_REAL_HIDDEN) for kv in "kv"]
    for head in ("adapter_modules.", "ip_adapter."):
        flat = _meta(_prefixed(proj, "image_proj.") + _prefixed(ip, head))
        with pytest.raises(AdapterFormatError, match=r"Kolors FaceID Plus .* 4096 wide .* not supported"):
            IPAdapterModel.from_state_dict(flat)


def test_refuses_broken_faceid_files():
    from ipadapter_pack.ip_adapter_core.layout import AdapterFormatError, detect, split_state_dict

    def refuse(flat, pattern):
        with pytest.raises(AdapterFormatError, match=pattern):
            detect(split_state_dict(flat))

    faceid = faceid_state_dict("faceid", SD15_TINY_HIDDEN, 768, 0, small=True, meta=True)
    refuse({k: v for k, v in faceid.items() if k != "ip_adapter.17.to_out_lora.up.weight"},
           r"ip_adapter\.17\.to_out_lora\.up\.weight is missing: a FaceID LoRA covers every attention processor")
    refuse(dict(faceid, **{"ip_adapter.4.to_k_lora.down.weight": torch.empty(4, 768, device="meta")}),
           r"ip_adapter\.4\.to_k_lora\.down\.weight .* expected \[4, 320\]")
    refuse(dict(faceid, **{"ip_adapter.40.to_q_lora.down.weight": torch.empty(4, 320, device="meta")}),
           r"LoRA keys this layout does not have: 40\.to_q_lora")
    refuse(dict(faceid, **{"image_proj.proj.0.weight": torch.empty(1024, 1024, device="meta")}), "ArcFace")
    refuse(dict(faceid, **{"image_proj.norm.weight": torch.empty(2048, device="meta")}), "2048-wide tokens")
    plus = faceid_state_dict("faceid_plus", SD15_TINY_HIDDEN, 768, 0, small=True, meta=True)
    refuse({k: v for k, v in plus.items() if k != "image_proj.perceiver_resampler.proj_in.weight"},
           r"incomplete FaceID IP-Adapter .* not supported.*perceiver_resampler\.proj_in\.weight is missing")
    # A base adapter with a stray FaceID key (the hostile-input corpus has this one).
    base = _meta(_adapter_spec("base", SD15_TINY_HIDDEN, 768))
    refuse(dict(base, **{"image_proj.perceiver_resampler.proj_in.weight": torch.empty(2, 2, device="meta")}),
           r"FaceID IP-Adapter .* not supported")
    refuse(dict(base, **{"ip_adapter.1.to_q_lora.down.weight": torch.empty(4, 320, device="meta")}),
           r"LoRA weights .* not a FaceID projection")


# --------------------------------------------------------------------------------------------
# Projection parity with diffusers
# --------------------------------------------------------------------------------------------

MLP_CASES = [("faceid", 768), ("faceid", 2048), ("faceid_portrait", 768), ("faceid_portrait", 2048)]


@pytest.mark.parametrize("kind,context_dim", MLP_CASES, ids=[f"{k}-{BASE[c]}" for k, c in MLP_CASES])
@torch.no_grad()
def test_faceid_projection_matches_diffusers(kind, context_dim):
    """FaceID / Portrait vs IPAdapterFaceIDImageProjection; mutation: tokens shifted by one in proj.2."""
    flat = faceid_state_dict(kind, MINI[context_dim], context_dim, seed=7, small=True)
    ours, reference = build(flat), diffusers_projection(flat)
    assert type(reference).__name__ == "IPAdapterFaceIDImageProjection"
    for faces in (arcface(3, 1), torch.zeros(1, 512)):  # references, and the zero (negative) embedding
        expected = reference(faces)
        diff = rel_diff(ours.image_tokens(faces), expected)
        log.info("parity %s %s (%d faces): %.1e", kind, BASE[context_dim], len(faces), diff)
        assert diff <= TOLERANCE, f"{kind}: differs from diffusers by {diff:.1e}"
    tokens = flat["image_proj.proj.2.weight"].shape[0] // context_dim
    shifted = {k: flat[k].roll(context_dim, dims=0) for k in ("image_proj.proj.2.weight", "image_proj.proj.2.bias")}
    assert_mutation_fails(build(dict(flat, **shifted)).image_tokens(faces), expected, f"{tokens} tokens shifted by one")


@torch.no_grad()
def test_portrait_faces_concatenate_as_diffusers():
    """Several faces of one portrait: diffusers projects [1, N, 512] to [1, N, 16, C] and its IP
    attention views that as N*16 tokens; the pack projects [N, 512] and concatenates."""
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    from ipadapter_pack.ip_adapter_core.embeds import concat_tokens

    flat = faceid_state_dict("faceid_portrait", MINI[768], 768, seed=7, small=True)
    faces = arcface(5, 2)
    expected = MultiIPAdapterImageProjection([diffusers_projection(flat)])([faces[None]])[0].reshape(1, -1, 768)
    got = concat_tokens(build(flat).image_tokens(faces))
    assert got.shape == (1, 80, 768)
    assert rel_diff(got, expected) <= TOLERANCE
    assert_mutation_fails(concat_tokens(build(flat).image_tokens(faces.flip(0))), expected, "faces reordered")


PLUS_CASES = [768, 2048]
PLUS_SETTINGS = [(False, 1.0), (True, 1.0), (True, 0.6), (True, 1.7)]  # (shortcut, s_scale)


@pytest.mark.parametrize("context_dim", PLUS_CASES, ids=["SD1.5", "SDXL"])
@torch.no_grad()
def test_faceid_plus_projection_matches_diffusers(context_dim):
    """FaceID Plus (v1: no shortcut) and Plus v2 (shortcut, s_scale) vs IPAdapterFaceIDPlusImageProjection.

    Real widths of the projection (SD1.5: 768, 12 heads; SDXL: 2048, 32 heads). Mutations: shortcut
    dropped, s_scale ignored, perceiver norm1/norm2 swapped, face-token norm and norm_out swapped.
    """
    flat = faceid_state_dict("faceid_plus", MINI[context_dim], context_dim, seed=7, small=True)
    ours, reference = build(flat), diffusers_projection(flat)
    assert type(reference).__name__ == "IPAdapterFaceIDPlusImageProjection"
    faces, crops = arcface(2, 3), crop_states(2, 4)

    def expected(face, crop, shortcut, s_scale):
        reference.clip_embeds = crop[:, None]  # [N, 1 image, 257, 1280], as the pipeline hands it over
        reference.shortcut, reference.shortcut_scale = shortcut, s_scale
        return reference(face)

    for shortcut, s_scale in PLUS_SETTINGS:
        for face, crop in ((faces, crops), (torch.zeros_like(faces), crop_states(2, 5))):
            want = expected(face, crop, shortcut, s_scale)
            diff = rel_diff(ours.image_tokens(face, crop_states=crop, shortcut=shortcut, s_scale=s_scale), want)
            log.info("parity faceid-plus %s shortcut=%s s_scale=%s: %.1e", BASE[context_dim], shortcut, s_scale, diff)
            assert diff <= TOLERANCE, f"shortcut={shortcut} s_scale={s_scale}: differs from diffusers by {diff:.1e}"

    v2 = expected(faces, crops, True, 0.6)
    no_shortcut = ours.image_tokens(faces, crop_states=crops, shortcut=False, s_scale=0.6)
    assert_mutation_fails(no_shortcut, v2, "shortcut dropped")
    assert_mutation_fails(ours.image_tokens(faces, crop_states=crops, shortcut=True), v2, "s_scale ignored")
    pr = "image_proj.perceiver_resampler."
    for a, b in ((pr + "layers.0.0.norm1", pr + "layers.0.0.norm2"), ("image_proj.norm", pr + "norm_out")):
        swapped = {f"{a}.{p}": flat[f"{b}.{p}"] for p in ("weight", "bias")}
        swapped.update({f"{b}.{p}": flat[f"{a}.{p}"] for p in ("weight", "bias")})
        got = build(dict(flat, **swapped)).image_tokens(faces, crop_states=crops, shortcut=True, s_scale=0.6)
        assert_mutation_fails(got, v2, f"{a} <-> {b}")


@pytest.mark.parametrize("small", [False, True], ids=["real", "small"])
@torch.no_grad()
def test_portrait_unnorm_projection_matches_diffusers(small):
    """The unnorm portrait is a plain Resampler to diffusers (IPAdapterPlusImageProjection) over a
    one-token sequence: the raw ArcFace embedding. Mutations: norm1/norm2 swapped, input normalised."""
    flat = faceid_state_dict("faceid_portrait_unnorm", MINI[2048], 2048, seed=7, small=small)
    ours, reference = build(flat), diffusers_projection(flat)
    assert type(reference).__name__ == "IPAdapterPlusImageProjection"
    faces = arcface(3, 6, raw=True)
    for face in (faces, torch.zeros(1, 512)):
        want = reference(face[:, None])
        diff = rel_diff(ours.image_tokens(face), want)
        log.info("parity faceid-portrait-unnorm %s: %.1e", "small" if small else "real", diff)
        assert diff <= TOLERANCE
    want = reference(faces[:, None])
    assert rel_diff(ours.image_tokens(faces[:, None]), want) <= TOLERANCE  # [N, 1, 512] is taken too
    a, b = "image_proj.layers.0.0.norm1", "image_proj.layers.0.0.norm2"
    swapped = {f"{a}.{p}": flat[f"{b}.{p}"] for p in ("weight", "bias")}
    swapped.update({f"{b}.{p}": flat[f"{a}.{p}"] for p in ("weight", "bias")})
    assert_mutation_fails(build(dict(flat, **swapped)).image_tokens(faces), want, "norm1 <-> norm2")
    assert_mutation_fails(ours.image_tokens(faces / faces.norm(dim=1, keepdim=True)), want, "embedding normalised")


@torch.no_grad()
def test_image_tokens_interface():
    flat = faceid_state_dict("faceid_plus", MINI[768], 768, seed=7, small=True)
    model = build(flat)
    faces, crops = arcface(2, 3), crop_states(2, 4)
    with pytest.raises(ValueError, match="shortcut: False for FaceID Plus, True for FaceID Plus v2"):
        model.image_tokens(faces, crop_states=crops)
    with pytest.raises(ValueError, match="crop_states"):
        model.image_tokens(faces, shortcut=True)
    with pytest.raises(ValueError, match="2 face embeddings but 1 face crops"):
        model.image_tokens(faces, crop_states=crops[:1], shortcut=False)
    fp32 = model.image_tokens(faces, crop_states=crops, shortcut=True, s_scale=0.5)
    fp64 = model.image_tokens(faces, dtype=torch.float64, crop_states=crops, shortcut=True, s_scale=0.5)
    assert fp64.dtype == torch.float64 and rel_diff(fp32.double(), fp64) <= TOLERANCE
    assert next(model.image_proj.parameters()).dtype == torch.float32  # the stored copy is not cast
    portrait = build(faceid_state_dict("faceid_portrait", MINI[768], 768, seed=7, small=True))
    with pytest.raises(ValueError, match="for FaceID Plus adapters; this is faceid-portrait"):
        portrait.image_tokens(faces, crop_states=crops, shortcut=False)


# --------------------------------------------------------------------------------------------
# The LoRA map
# --------------------------------------------------------------------------------------------

# SD1.5 / SDXL topologies (block depths and order) at small widths, for a real diffusers UNet.
SMALL_UNETS = {
    "SD1.5": dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(32, 64, 128, 128), cross_attention_dim=768, attention_head_dim=8,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "SDXL": dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(32, 64, 64), cross_attention_dim=2048, attention_head_dim=(1, 2, 2),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}


def _comfy_config(base: str) -> dict:
    from tests.harness.reference_unets import SD15_COMFY, SDXL_COMFY

    return {"SD1.5": SD15_COMFY, "SDXL": SDXL_COMFY}[base]


def _tiny_faceid_plus(hidden: list[int], ctx: int) -> dict[str, dict[str, torch.Tensor]]:
    """A FaceID Plus with the real key layout at toy widths (64-wide perceiver): diffusers loads any width."""
    spec = _prefixed(_mlp(ctx, 4, 64) + _prefixed(_perceiver(64, 1280, 64), "perceiver_resampler."), "image_proj.")
    full = faceid_spec("faceid_plus", hidden, ctx, lora_rank=2)
    spec += [entry for entry in full if entry[0].startswith("ip_adapter.")]
    flat = _materialize(spec, 5, dtype=torch.float32)
    parts: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        head, rest = key.split(".", 1)
        parts[head][rest] = value
    return parts


@pytest.mark.parametrize("base", ["SD1.5", "SDXL"])
def test_lora_map_matches_diffusers_and_comfy(base, comfy_inprocess):
    """diffusers' loader (FaceID Plus loaded first, as load_ip_adapter does, so the projection's own
    attention processors are listed too) names every LoRA matrix; PEFT's names and ComfyUI's key
    table turn each into a ComfyUI UNet weight: the pack's map gives the same key, same tensors."""
    import comfy.utils
    from diffusers import UNet2DConditionModel
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    from ipadapter_pack.ip_adapter_core.faceid_lora import lora_patches
    from ipadapter_pack.ip_adapter_core.layout import SD15_LAYERS, SDXL_LAYERS

    unet = UNet2DConditionModel(**SMALL_UNETS[base]).eval()
    modules = dict(unet.named_modules())
    hidden = [modules[n.removesuffix(".processor")].to_k.out_features for n in unet.attn_processors
              if n.endswith("attn2.processor")]
    ctx = SMALL_UNETS[base]["cross_attention_dim"]
    parts = _tiny_faceid_plus(hidden, ctx)
    unet._load_ip_adapter_weights([parts])
    assert any(n.startswith("encoder_hid_proj.") for n in unet.attn_processors)
    (loras,) = unet._load_ip_adapter_loras([parts]).values()
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in loras.items()})
    to_ldm = comfy.utils.unet_to_diffusers(dict(_comfy_config(base)))
    reference: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in peft.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
        comfy_key = "diffusion_model." + to_ldm[m[1] + ".weight"]
        reference.setdefault(comfy_key, {})[m[2]] = tensor

    layers = {"SD1.5": SD15_LAYERS, "SDXL": SDXL_LAYERS}[base]
    ours = lora_patches(parts["ip_adapter"], layers)
    assert len(ours) == len(reference) == 8 * len(layers)
    assert ours.keys() == reference.keys()
    for key, (up, down) in ours.items():
        assert up is reference[key]["B"] and down is reference[key]["A"], key


@pytest.mark.parametrize("base", ["SD1.5", "SDXL"])
def test_lora_map_covers_every_attention_module_once(base, comfy_inprocess):
    """Against ComfyUI's own UNet (real SD1.5 widths; SDXL topology): every attn1/attn2 to_q, to_k,
    to_v, to_out.0 weight gets exactly one patch, of its shape (up @ down)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from ipadapter_pack.ip_adapter_core.faceid_lora import lora_patches, processor_paths
    from ipadapter_pack.ip_adapter_core.layout import SD15_LAYERS, SDXL_LAYERS

    config = _comfy_config(base)
    with torch.device("meta"):
        unet = UNetModel(**config, device="meta", operations=comfy.ops.disable_weight_init)
    shapes = {"diffusion_model." + k: tuple(v.shape) for k, v in unet.state_dict().items()}
    targets = {k for k in shapes if re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$", k)}
    layers = {"SD1.5": SD15_LAYERS, "SDXL": SDXL_LAYERS}[base]
    hidden = attn2_hidden_sizes(shapes, prefix="diffusion_model.")
    flat = faceid_state_dict("faceid", hidden, config["context_dim"], 0, small=True, meta=True)
    ip = {k.removeprefix("ip_adapter."): v for k, v in flat.items() if k.startswith("ip_adapter.")}
    patches = lora_patches(ip, layers)
    assert set(patches) == targets and len(patches) == len(targets) == 8 * len(layers)
    assert len(set(processor_paths(layers))) == 2 * len(layers)
    for key, (up, down) in patches.items():
        assert (up.shape[0], down.shape[1]) == shapes[key], key


def test_model_lora_patches_and_comfy_scale(comfy_inprocess):
    """The loaded model hands out the file's own tensors; ComfyUI's LoRA patch with alpha None (or
    alpha = rank) at strength 1 adds exactly up @ down, diffusers' scale (lora_alpha = r, weight 1)."""
    from comfy.lora import calculate_weight
    from comfy.weight_adapter.lora import LoRAAdapter

    from ipadapter_pack.ip_adapter_core.faceid_lora import lora_patches

    flat = faceid_state_dict("faceid", SD15_TINY_HIDDEN, 768, seed=9, small=True)
    model = build(flat)
    patches = model.lora_patches()
    ip = {k.removeprefix("ip_adapter."): v for k, v in flat.items() if k.startswith("ip_adapter.")}
    assert patches.keys() == lora_patches(ip, model.spec.layers).keys()
    up, down = patches["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"]
    assert up is flat["ip_adapter.1.to_k_lora.up.weight"] and down is flat["ip_adapter.1.to_k_lora.down.weight"]
    up, down = patches["diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_out.0.weight"]
    assert up is flat["ip_adapter.30.to_out_lora.up.weight"]
    assert build(faceid_state_dict("faceid_portrait", MINI[768], 768, seed=9, small=True)).lora_patches() == {}

    weight = torch.randn(up.shape[0], down.shape[1], dtype=torch.float64)
    expected = weight + up.double() @ down.double()
    for alpha in (None, float(down.shape[0])):
        adapter = LoRAAdapter(set(), (up, down, alpha, None, None, None))
        got = calculate_weight([(1.0, adapter, 1.0, None, None)], weight.clone(), "k", intermediate_dtype=torch.float64)
        assert torch.allclose(got, expected, rtol=0, atol=1e-12), f"alpha={alpha}"
