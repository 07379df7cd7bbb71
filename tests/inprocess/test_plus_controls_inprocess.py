"""IPAdapter plus's controls through the pack's own nodes act where they should and nowhere else.

As in test_effects_inprocess.py: one real forward of the unpatched SD1.5 stand-in UNet is
recorded per cross-attention layer, and the attn2 replacements of models patched by Apply
IP-Adapter are fed those same inputs and compared bit for bit:

* weight type "style transfer" (SD1.5 indices 0-3 and 9-15) changes exactly those layers;
* the "index:value" form of the Layer Weights table changes exactly the listed indices;
* the precise types move the reference to the negative on exactly their layers: there the
  conditional rows are the plain layer's (zero image tokens add exactly nothing) and the
  unconditional rows are what the conditional rows would get from the reference; every other
  layer is bit-identical to the same weights without the swap;
* on SDXL, style transfer precise swaps all ten depth sub-blocks of transformer index 3 (input 8);
* IP-Adapter Noise Image's new types are negatives: their seed changes exactly the unconditional
  half of every layer; IP-Adapter Prep Image's crop position and sharpening change exactly the
  conditional half.

Expected layer sets are written out from LEADING_PACK.md 2.1 (SD1.5 transformer indices).
"""

from __future__ import annotations

import pytest
import torch

from tests.harness.attention_probe import changed_layers, changed_positions, patched_outputs, record_inputs

COND, UNCOND = 0, 1
CHUNKS = [COND, UNCOND]
SD15_LAYERS = ([("input", b, 0) for b in (1, 2, 4, 5, 7, 8)] + [("output", b, 0) for b in range(3, 12)]
               + [("middle", 0, 0)])
# ComfyUI transformer_index -> layer (LEADING_PACK.md 2.1)
BY_INDEX = {**{i: ("input", b, 0) for i, b in enumerate((1, 2, 4, 5, 7, 8))}, 6: ("middle", 0, 0),
            **{7 + i: ("output", b, 0) for i, b in enumerate(range(3, 12))}}
COMPOSITION = {BY_INDEX[4], BY_INDEX[5]}  # input 7 and 8


def at(*indices: int) -> set:
    return {BY_INDEX[i] for i in indices}


@pytest.fixture(scope="module")
def sd15_adapter(pack, models):
    models.ensure("ipadapter/sd15_tiny_base.safetensors")
    (adapter, _info) = pack.NODE_CLASS_MAPPINGS["IPAdapterExactLoader"]().load("sd15_tiny_base.safetensors")
    return adapter


@pytest.fixture(scope="module")
def recorded(sd15):
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(2, 4, 8, 16, generator=gen)
    context = torch.randn(2, 77, 768, generator=gen)
    return record_inputs(sd15, SD15_LAYERS, x, context, CHUNKS)


def embeds_of(seed: int):
    from ipadapter_pack.ip_adapter_core.embeds import ImageEmbeds

    ref = torch.randn(1, 1024, generator=torch.Generator().manual_seed(seed))
    return ImageEmbeds(ref, torch.zeros(1, 1024), "image_embeds")


def outputs(pack, sd15, adapter, recorded, layer_weights, weight: float = 0.9, embeds=None):
    node = pack.NODE_CLASS_MAPPINGS["IPAdapterExactApply"]()
    (model,) = node.apply(sd15, adapter, embeds or embeds_of(1), weight, "V only", 0.0, 1.0, "concat",
                          layer_weights=layer_weights)
    return patched_outputs(model, recorded)


def weight_type(pack, name: str, style_boost: float = 1.0, composition_boost: float = 0.0, table: str = ""):
    return pack.NODE_CLASS_MAPPINGS["IPAdapterExactWeightType"]().build(name, style_boost, composition_boost,
                                                                         table)[0]


def layer_table(pack, table: str):
    return pack.NODE_CLASS_MAPPINGS["IPAdapterExactLayerWeights"]().build("linear", table, "")[0]


@torch.inference_mode()
def test_style_transfer_weight_type_acts_on_its_indices_only(pack, sd15, sd15_adapter, recorded):
    plain = {key: inputs.plain for key, inputs in recorded.items()}
    style = outputs(pack, sd15, sd15_adapter, recorded, weight_type(pack, "style transfer"))
    assert changed_layers(style, plain) == at(0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)
    composition = outputs(pack, sd15, sd15_adapter, recorded, weight_type(pack, "composition"))
    assert changed_layers(composition, plain) == COMPOSITION
    # the same weights by "index:value" in the Layer Weights table: bit-identical layers
    by_table = outputs(pack, sd15, sd15_adapter, recorded, layer_table(pack, "4:0.25, 5:1"))
    assert changed_layers(by_table, composition) == set()


@torch.inference_mode()
def test_index_value_table_changes_exactly_the_listed_indices(pack, sd15, sd15_adapter, recorded):
    plain = {key: inputs.plain for key, inputs in recorded.items()}
    base = outputs(pack, sd15, sd15_adapter, recorded, layer_table(pack, "3:1, 6:0.5, 15:2"))
    assert changed_layers(base, plain) == at(3, 6, 15)
    moved = outputs(pack, sd15, sd15_adapter, recorded, layer_table(pack, "3:1, 6:0.7, 15:2"))
    assert changed_layers(moved, base) == at(6)


@torch.inference_mode()
@pytest.mark.parametrize(("precise", "unswapped", "boost", "swapped_layers"), [
    # style transfer precise at w = 0.9, style_boost 1.0 = style and composition's weights (c = 1.0)
    ("style transfer precise", "style and composition", {"style_boost": 1.0}, COMPOSITION),
    # composition precise with composition_boost b: the same weights written as index:value / w
    ("composition precise", None, {"composition_boost": 0.45}, set(SD15_LAYERS) - COMPOSITION),
])
def test_precise_swaps_cond_and_uncond_on_exactly_its_layers(pack, sd15, sd15_adapter, recorded, precise,
                                                             unswapped, boost, swapped_layers):
    w = 0.9
    swapped = outputs(pack, sd15, sd15_adapter, recorded, weight_type(pack, precise, **boost), w)
    if unswapped is not None:
        same_weights = weight_type(pack, unswapped)
    else:  # LEADING_PACK.md 2.2, SD1.5: {4: 0.25w, 5: w, 0-3 and 9-15: b, 6-8: 0.1b}, here as multiples of w
        b = boost["composition_boost"]
        values = {4: 0.25, 5: 1.0, **dict.fromkeys((0, 1, 2, 3, *range(9, 16)), b / w),
                  **dict.fromkeys((6, 7, 8), 0.1 * b / w)}
        same_weights = layer_table(pack, ", ".join(f"{i}:{v!r}" for i, v in values.items()))
    reference = outputs(pack, sd15, sd15_adapter, recorded, same_weights, w)
    unswapped_model_layers = {key for key in SD15_LAYERS if key not in swapped_layers}
    differs = changed_layers(swapped, reference)
    assert differs == swapped_layers, f"changed: {sorted(differs)}"
    for key in unswapped_model_layers:
        assert torch.equal(swapped[key], reference[key]), key
    # the reference model, its chunk labels exchanged: its uncond rows get the reference's tokens
    node = pack.NODE_CLASS_MAPPINGS["IPAdapterExactApply"]()
    (model,) = node.apply(sd15, sd15_adapter, embeds_of(1), w, "V only", 0.0, 1.0, "concat",
                          layer_weights=same_weights)
    from tests.harness.attention_probe import attn2_table

    table = attn2_table(model)
    for key in swapped_layers:
        inputs = recorded[key]
        assert torch.equal(swapped[key][:1], inputs.plain[:1]), f"{key}: the conditional rows must be plain"
        relabelled = table[key](inputs.q, inputs.k, inputs.v, {**inputs.options, "cond_or_uncond": [UNCOND, COND]})
        torch.testing.assert_close(swapped[key][1:], relabelled[1:], rtol=0, atol=1e-6,
                                   msg=f"{key}: the unconditional rows must get the reference")
        assert not torch.equal(swapped[key][1:], inputs.plain[1:]), key
    # the reference and the weight still matter on the swapped layers, in the unconditional rows only
    other = outputs(pack, sd15, sd15_adapter, recorded, weight_type(pack, precise, **boost), w, embeds_of(2))
    assert changed_layers(other, swapped) == {k for k in SD15_LAYERS if k in swapped_layers or
                                              not torch.equal(reference[k], recorded[k].plain)}
    for key in swapped_layers:
        changed = changed_positions(other[key], swapped[key], recorded[key])
        assert not changed[CHUNKS.index(COND)].any() and changed[CHUNKS.index(UNCOND)].all(), key


# --- pictures: Noise Image's new types and Prep Image, through Encode ----------------------------


@pytest.fixture(scope="module")
def encoder_memo():
    """The pack's CLIP vision calls memoised on the pixels for this module: a picture seen before
    gets the same encoding without another ViT-H pass (seconds each on a CPU)."""
    from ipadapter_pack.nodes import comfy_seam

    original, memo = comfy_seam.clip_encode, {}

    def clip_encode(clip_vision, images, output, center_crop):
        key = (id(clip_vision), output, center_crop, tuple(images.shape), images.float().numpy().tobytes())
        if key not in memo:
            memo[key] = original(clip_vision, images, output, center_crop)
        return memo[key].clone()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(comfy_seam, "clip_encode", clip_encode)
        yield memo


def encode(pack, adapter, vit_h, image, negative=None):
    node = pack.NODE_CLASS_MAPPINGS["IPAdapterExactEncode"]()
    (embeds,) = node.encode(adapter, vit_h, image, "center", "reference (zero)", negative_image=negative)
    return embeds


def picture(seed: int, h: int = 64, w: int = 64) -> torch.Tensor:
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
@pytest.mark.parametrize("kind", ["fade", "dissolve", "gaussian", "shuffle"])
def test_noise_types_change_only_the_negative_half(pack, sd15, sd15_adapter, recorded, vit_h, encoder_memo, kind):
    """Noise Image (IPAdapter plus's types, on a picture, with blur) as Encode's negative_image:
    another seed changes every position of the unconditional half of every layer, and leaves the
    conditional half bit-identical."""
    noise = pack.NODE_CLASS_MAPPINGS["IPAdapterExactNoise"]()
    reference = picture(31)
    negatives = [noise.make(0.6, seed, picture(32, 48, 80), kind, 3)[0] for seed in (1, 2)]
    assert all(n.shape == (1, 224, 224, 3) for n in negatives) and not torch.equal(*negatives)
    first, second = (encode(pack, sd15_adapter, vit_h, reference, n) for n in negatives)
    one = outputs(pack, sd15, sd15_adapter, recorded, None, embeds=first)
    two = outputs(pack, sd15, sd15_adapter, recorded, None, embeds=second)
    for key, inputs in recorded.items():
        changed = changed_positions(two[key], one[key], inputs)
        assert changed[CHUNKS.index(UNCOND)].all(), f"{kind}, {key}: the seed must change the negative half"
        assert not changed[CHUNKS.index(COND)].any(), f"{kind}, {key}: the seed moved the conditional half"


@torch.inference_mode()
def test_prep_image_crop_position_and_sharpening_act_on_the_reference_only(pack, sd15, sd15_adapter, recorded,
                                                                          vit_h, encoder_memo):
    """Two 96 x 64 (tall) pictures with the same top 64 x 64 square and different bottoms: prepared
    with crop 'top' they give bit-identical layers; with 'bottom' (or sharpening) every conditional
    position of every layer changes and the unconditional half stays bit-identical."""
    prep = pack.NODE_CLASS_MAPPINGS["IPAdapterExactPrepImage"]()
    a = picture(33, 96, 64)
    b = a.clone()
    b[:, 64:] = picture(34, 32, 64)

    def run(image, position, sharpening=0.0):
        (prepared,) = prep.prep(image, "LANCZOS", position, sharpening)
        assert prepared.shape == (1, 224, 224, 3)
        return outputs(pack, sd15, sd15_adapter, recorded, None, embeds=encode(pack, sd15_adapter, vit_h, prepared))

    top_a, top_b, bottom_a, bottom_b = run(a, "top"), run(b, "top"), run(a, "bottom"), run(b, "bottom")
    sharp_a = run(a, "top", 0.8)
    for key, inputs in recorded.items():
        assert torch.equal(top_a[key], top_b[key]), f"{key}: 'top' keeps only the shared square"
        for what, x, y in (("bottom", bottom_a, bottom_b), ("sharpening", top_a, sharp_a)):
            changed = changed_positions(x[key], y[key], inputs)
            assert changed[CHUNKS.index(COND)].all(), f"{what}, {key}: the reference must change"
            assert not changed[CHUNKS.index(UNCOND)].any(), f"{what}, {key}: the negative half moved"


# --- SDXL: one transformer index covers all its depth sub-blocks ----------------------------------

SDXL_LAYERS = ([("input", b, i) for b, n in ((4, 2), (5, 2), (7, 10), (8, 10)) for i in range(n)]
               + [("output", b, i) for b, n in ((0, 10), (1, 10), (2, 10), (3, 2), (4, 2), (5, 2)) for i in range(n)]
               + [("middle", 0, i) for i in range(10)])
SDXL_INDEX_3 = {("input", 8, i) for i in range(10)}  # LEADING_PACK.md 2.1: the composition transformer
SDXL_INDEX_6 = {("output", 1, i) for i in range(10)}  # the style transformer


@pytest.fixture(scope="module")
def sdxl_setup(comfy_inprocess, models, pack):
    import comfy.sd

    path = models["checkpoints/sdxl_tiny.safetensors"]
    model = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)[0]
    models.ensure("ipadapter/sdxl_tiny_vith.safetensors")
    (adapter, _info) = pack.NODE_CLASS_MAPPINGS["IPAdapterExactLoader"]().load("sdxl_tiny_vith.safetensors")
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.randn(2, 77, 2048, generator=gen)
    y = torch.randn(2, 2816, generator=gen)
    return model, adapter, record_inputs(model, SDXL_LAYERS, x, context, CHUNKS, y=y)


@torch.inference_mode()
def test_sdxl_style_transfer_precise_swaps_every_sub_block_of_index_3(pack, sdxl_setup):
    """SDXL style transfer precise (w 0.9, style_boost 1.0) against style and composition (the same
    weights): the two differ on exactly the ten sub-blocks of input 8, whose conditional rows are the
    plain layer's; both act on exactly input 8 and output 1 (indices 3 and 6)."""
    model, adapter, recorded = sdxl_setup
    plain = {key: inputs.plain for key, inputs in recorded.items()}
    precise = outputs(pack, model, adapter, recorded, weight_type(pack, "style transfer precise", 1.0), 0.9)
    reference = outputs(pack, model, adapter, recorded, weight_type(pack, "style and composition"), 0.9)
    assert changed_layers(reference, plain) == SDXL_INDEX_3 | SDXL_INDEX_6
    assert changed_layers(precise, reference) == SDXL_INDEX_3
    for key in SDXL_INDEX_3:
        assert torch.equal(precise[key][:1], plain[key][:1]), f"{key}: the conditional rows must be plain"
        assert not torch.equal(precise[key][1:], plain[key][1:]), f"{key}: the negative must get the reference"


@torch.inference_mode()
def test_encoder_weight_moves_only_the_conditional_half(pack, sd15, sd15_adapter, recorded, vit_h, encoder_memo):
    """Encode's weight (IPAdapter plus's Encoder weight): 1.0 is bit-identical to no weight; 0.5
    changes every conditional position of every layer and leaves the negative half bit-identical."""
    node = pack.NODE_CLASS_MAPPINGS["IPAdapterExactEncode"]()
    reference = picture(35)
    (plain_embeds,) = node.encode(sd15_adapter, vit_h, reference, "center", "reference (zero)")
    (one,) = node.encode(sd15_adapter, vit_h, reference, "center", "reference (zero)", weight=1.0)
    (half,) = node.encode(sd15_adapter, vit_h, reference, "center", "reference (zero)", weight=0.5)
    assert torch.equal(one.cond, plain_embeds.cond)
    assert torch.equal(half.cond, plain_embeds.cond * 0.5) and torch.equal(half.uncond, plain_embeds.uncond)
    base = outputs(pack, sd15, sd15_adapter, recorded, None, embeds=plain_embeds)
    scaled = outputs(pack, sd15, sd15_adapter, recorded, None, embeds=half)
    for key, inputs in recorded.items():
        changed = changed_positions(scaled[key], base[key], inputs)
        assert changed[CHUNKS.index(COND)].all() and not changed[CHUNKS.index(UNCOND)].any(), key
