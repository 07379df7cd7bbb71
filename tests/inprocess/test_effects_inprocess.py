"""Each effect-bearing control acts where it should and nowhere else, proven where that is exact.

A UNet mixes information across the latent (convolutions, self-attention, skip connections), so
a change at one layer reaches every pixel of the final picture: "nowhere else" is only exactly
true at the layer where the image term is added. These tests record the inputs of every
cross-attention layer of one real forward of the unpatched stand-in UNet (queries, keys, values,
ComfyUI's extra_options), feed those same inputs to the attn2 replacements of models patched by
the pack's own nodes, and compare outputs bit for bit (tests/harness/attention_probe.py):

* attention mask (regional_masks.json): the patched output differs from the plain one exactly at
  the query positions inside the mask, on every layer and token grid (non-square latent, so a
  swapped height/width shows); changing the masked adapter's reference or weight changes exactly
  those positions, the other region stays bit-identical;
* one image per latent (batch_one_per_latent.json): changing reference 2 changes latent 2's rows
  only; through a whole sampler run latent 1's result stays bit-identical too (checked: true on
  this CPU build, the UNet has no batch-coupled op);
* style & composition (sdxl_style_and_composition.json): the style image and weight change
  exactly the style layers (SDXL output block 1), the composition image exactly input block 8;
* several images (several_images.json): changing any one reference changes every layer's
  conditional output, for every combine method; the negative half stays identical;
* noise image (the negative image input): its seed changes exactly the unconditional half of
  every layer, and at weight 0 nothing changes at all, whatever the seed.

Expected layer sets and regions are written out here from the README's block map and the
masks' geometry, not computed with the pack's own helpers.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness.attention_probe import (
    changed_layers,
    changed_positions,
    patched_outputs,
    record_inputs,
)

COND, UNCOND = 0, 1  # ComfyUI's cond_or_uncond codes
CHUNKS = [COND, UNCOND]

SD15_LAYERS = ([("input", b, 0) for b in (1, 2, 4, 5, 7, 8)] + [("output", b, 0) for b in range(3, 12)]
               + [("middle", 0, 0)])
SDXL_STYLE = {("output", 1, i) for i in range(10)}  # InstantStyle up.block_0[1]
SDXL_STRONG_STYLE = {("output", b, i) for b in (0, 1, 2) for i in range(10)}
SDXL_COMPOSITION = {("input", 8, i) for i in range(10)}  # InstantStyle down.block_2[1]
SDXL_LAYERS = ([("input", b, i) for b, n in ((4, 2), (5, 2), (7, 10), (8, 10)) for i in range(n)]
               + [("output", b, i) for b, n in ((0, 10), (1, 10), (2, 10), (3, 2), (4, 2), (5, 2)) for i in range(n)]
               + [("middle", 0, i) for i in range(10)])


# --- fixtures and helpers --------------------------------------------------------------------


def load_adapter(pack, models, name: str):
    models.ensure(f"ipadapter/{name}")
    (adapter, _info) = pack.NODE_CLASS_MAPPINGS["IPAdapterExactLoader"]().load(name)
    return adapter


@pytest.fixture(scope="module")
def sd15_adapter(pack, models):
    return load_adapter(pack, models, "sd15_tiny_base.safetensors")


def record_sd15(sd15, batch: int, height: int, width: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * batch, 4, height, width, generator=gen)
    context = torch.randn(2 * batch, 77, 768, generator=gen)
    return record_inputs(sd15, SD15_LAYERS, x, context, CHUNKS)


@pytest.fixture(scope="module")
def wide(sd15):
    """One latent of 16 x 32: token grids 16x32, 8x16, 4x8, 2x4 -- every one splits evenly in halves."""
    return record_sd15(sd15, batch=1, height=16, width=32)


@pytest.fixture(scope="module")
def pair_of_latents(sd15):
    return record_sd15(sd15, batch=2, height=8, width=8, seed=1)


def references(count: int, seed: int, width: int = 1024) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, width, generator=gen) for _ in range(count)]


def embeds_of(*refs: torch.Tensor):
    """image_embeds of one reference per tensor, with the reference negative (zero embedding)."""
    from ipadapter_pack.ip_adapter_core.embeds import ImageEmbeds

    return ImageEmbeds(torch.cat(refs), torch.zeros(1, refs[0].shape[-1]), "image_embeds")


def apply(pack, model, adapter, embeds, weight: float = 0.9, **optional):
    node = pack.NODE_CLASS_MAPPINGS["IPAdapterExactApply"]()
    (patched,) = node.apply(model, adapter, embeds, weight, "V only", 0.0, 1.0, "concat", **optional)
    return patched


def left_half(height: int = 64, width: int = 128) -> torch.Tensor:
    """A MASK [1, H, W] (the latent's aspect) that is 1 on the left half, as regional_masks.json builds it."""
    mask = torch.zeros(1, height, width)
    mask[..., : width // 2] = 1.0
    return mask


def left_columns(inputs) -> torch.Tensor:
    """[h, w] booleans: the query positions of this layer's grid under the left-half mask."""
    h, w = inputs.grid
    region = torch.zeros(h, w, dtype=torch.bool)
    region[:, : w // 2] = True
    return region


def describe(where: torch.Tensor) -> str:
    return f"{int(where.sum())} of {where.numel()} positions"


def mismatch(changed: torch.Tensor, expected: torch.Tensor) -> str:
    return (f"{int((changed & ~expected).sum())} positions changed outside the expected region, "
            f"{int((expected & ~changed).sum())} of its {int(expected.sum())} positions unchanged")


# --- regional masks --------------------------------------------------------------------------


@torch.inference_mode()
def test_mask_confines_the_image_term_to_its_region(pack, sd15, sd15_adapter, wide):
    """Patched vs plain, per query position: changed exactly inside the mask, in both halves of the
    CFG batch, on all 16 layers (token grids 16x32 down to 2x4)."""
    (ref,) = references(1, seed=10)
    masked = patched_outputs(apply(pack, sd15, sd15_adapter, embeds_of(ref), attn_mask=left_half()), wide)
    unmasked = patched_outputs(apply(pack, sd15, sd15_adapter, embeds_of(ref)), wide)
    grids = set()
    for key, inputs in wide.items():
        region = left_columns(inputs)
        grids.add(inputs.grid)
        changed = changed_positions(masked[key], inputs.plain, inputs)
        for chunk in range(len(CHUNKS)):
            assert torch.equal(changed[chunk, 0], region), (
                f"{key} chunk {chunk}, {inputs.grid} grid, left half expected: {mismatch(changed[chunk, 0], region)}")
        # without the mask the same adapter changes every position: the mask is what confines it
        assert changed_positions(unmasked[key], inputs.plain, inputs).all(), key
    assert grids == {(16, 32), (8, 16), (4, 8), (2, 4)}


@torch.inference_mode()
def test_regional_reference_and_weight_move_only_their_region(pack, sd15, sd15_adapter, wide):
    """regional_masks.json in-process: adapter A on the left half, adapter B on the right half.
    A's reference or weight changes the left half of every layer and leaves the right half
    bit-identical; B's reference does the mirror image."""
    left = left_half()
    right = 1.0 - left
    ref_a, ref_b, other = references(3, seed=11)

    def regional(a, weight_a, b):
        model = apply(pack, sd15, sd15_adapter, embeds_of(a), weight_a, attn_mask=left)
        return patched_outputs(apply(pack, model, sd15_adapter, embeds_of(b), 0.9, attn_mask=right), wide)

    base = regional(ref_a, 0.9, ref_b)
    variants = {
        "A's reference": (regional(other, 0.9, ref_b), True),
        "A's weight 0.9 -> 0.5": (regional(ref_a, 0.5, ref_b), True),
        "B's reference": (regional(ref_a, 0.9, other), False),
    }
    for key, inputs in wide.items():
        region = left_columns(inputs)
        # both adapters together act everywhere (each on its half)
        assert changed_positions(base[key], inputs.plain, inputs)[0, 0].all(), key
        for what, (outputs, on_left) in variants.items():
            changed = changed_positions(outputs[key], base[key], inputs)
            expected = region if on_left else ~region
            assert torch.equal(changed[CHUNKS.index(COND), 0], expected), (
                f"{what}, {key}: conditional half: {mismatch(changed[CHUNKS.index(COND), 0], expected)}")
            # the negative half: the reference does not enter it (zero-embedding negative), the weight does
            assert not (changed[CHUNKS.index(UNCOND), 0] & ~expected).any(), f"{what}, {key}: outside the region"


# --- one image per latent --------------------------------------------------------------------


@torch.inference_mode()
def test_one_image_per_latent_steers_each_latent_by_its_own_reference(pack, sd15, sd15_adapter, pair_of_latents):
    """Two latents, two references: changing reference 2 changes every position of latent 2's
    conditional rows and nothing else; latent 1 is bit-identical on every layer."""
    first, second, other = references(3, seed=12)
    base = patched_outputs(apply(pack, sd15, sd15_adapter, embeds_of(first, second), one_image_per_latent=True),
                           pair_of_latents)
    swapped = patched_outputs(apply(pack, sd15, sd15_adapter, embeds_of(first, other), one_image_per_latent=True),
                              pair_of_latents)
    concat = patched_outputs(apply(pack, sd15, sd15_adapter, embeds_of(first, second)), pair_of_latents)
    concat_swapped = patched_outputs(apply(pack, sd15, sd15_adapter, embeds_of(first, other)), pair_of_latents)
    cond = CHUNKS.index(COND)
    for key, inputs in pair_of_latents.items():
        assert changed_positions(base[key], inputs.plain, inputs)[cond].all(), f"{key}: both latents are steered"
        changed = changed_positions(swapped[key], base[key], inputs)
        assert changed[cond, 1].all(), f"{key}: latent 2 must follow reference 2"
        assert not changed[cond, 0].any(), f"{key}: latent 1 changed with reference 2 ({describe(changed[cond, 0])})"
        assert not changed[CHUNKS.index(UNCOND)].any(), f"{key}: the negative does not depend on the references"
        # without one_image_per_latent both latents see both references: the test above can fail
        assert changed_positions(concat_swapped[key], concat[key], inputs)[cond, 0].all(), key


def sample_latents(model, batch: int, seed: int = 0, steps: int = 4) -> torch.Tensor:
    """A real ComfyUI sampler run (euler, CFG 5) on `batch` 8x8 latents."""
    import comfy.sample

    gen = torch.Generator().manual_seed(seed)
    positive = [[torch.randn(1, 77, 768, generator=gen), {}]]
    negative = [[torch.randn(1, 77, 768, generator=gen), {}]]
    latent = torch.zeros(batch, 4, 8, 8)
    noise = torch.randn(batch, 4, 8, 8, generator=gen)
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative, latent,
                               disable_pbar=True, seed=seed)


@torch.inference_mode()
def test_one_image_per_latent_leaves_the_other_latent_bit_identical_through_sampling(pack, sd15, sd15_adapter):
    """Is 'swapping reference 2 leaves picture 1 bit-identical' exactly true for the whole model?
    Latents of a batch meet in no UNet op (group norm, attention and convolutions are per sample)
    and the sampler is element-wise, so it should be -- checked here through a real sampler."""
    first, second, other = references(3, seed=13)
    base = sample_latents(apply(pack, sd15, sd15_adapter, embeds_of(first, second), one_image_per_latent=True), 2)
    swapped = sample_latents(apply(pack, sd15, sd15_adapter, embeds_of(first, other), one_image_per_latent=True), 2)
    assert torch.equal(swapped[0], base[0]), f"latent 1 moved by {float((swapped[0] - base[0]).abs().max()):.3g}"
    assert (swapped[1] - base[1]).abs().max() > 1e-3, "latent 2 must follow its reference"


# --- several images --------------------------------------------------------------------------


@torch.inference_mode()
@pytest.mark.parametrize("method", ["average", "concat", "add", "subtract", "norm average", "max", "min"])
def test_every_reference_of_several_matters(pack, sd15, sd15_adapter, wide, method):
    """several_images.json: two encodings through Combine Embeds into one Apply. Changing either
    reference changes every conditional position of every layer; the negative half stays as it is."""
    combine = pack.NODE_CLASS_MAPPINGS["IPAdapterExactCombineEmbeds"]()
    refs = references(3, seed=14)

    def outputs(a, b):
        (combined,) = combine.combine(embeds_of(a), method, embeds_2=embeds_of(b))
        return patched_outputs(apply(pack, sd15, sd15_adapter, combined, 0.8), wide)

    base = outputs(refs[0], refs[1])
    for which, variant in (("first", outputs(refs[2], refs[1])), ("second", outputs(refs[0], refs[2]))):
        for key, inputs in wide.items():
            changed = changed_positions(variant[key], base[key], inputs)
            assert changed[CHUNKS.index(COND)].all(), (
                f"{method}: changing the {which} reference left {key} at {describe(~changed[0])} unchanged")
            assert not changed[CHUNKS.index(UNCOND)].any(), f"{method}, {key}: the shared negative moved"


# --- style and composition (SDXL) ------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl(comfy_inprocess, models):
    import comfy.sd

    path = models["checkpoints/sdxl_tiny.safetensors"]
    return comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)[0]


@pytest.fixture(scope="module")
def sdxl_inputs(sdxl):
    """One 16x16 latent (cross-attention at 8x8 and 4x4) with CFG halves and SDXL's pooled `y`."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.randn(2, 77, 2048, generator=gen)
    y = torch.randn(2, 2816, generator=gen)
    return record_inputs(sdxl, SDXL_LAYERS, x, context, CHUNKS, y=y)


def picture(seed: int, size: int = 64) -> torch.Tensor:
    return torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def encoder_memo(monkeypatch):
    """The CLIP vision calls of the pack, memoised on the pixels: a node called again on an image it
    has seen gets the same encoding without another ViT-H pass (seconds each on a CPU)."""
    from ipadapter_pack.nodes import comfy_seam

    original, memo = comfy_seam.clip_encode, {}

    def clip_encode(clip_vision, images, output, center_crop):
        key = (id(clip_vision), output, center_crop, tuple(images.shape), images.float().numpy().tobytes())
        if key not in memo:
            memo[key] = original(clip_vision, images, output, center_crop)
        return memo[key].clone()

    monkeypatch.setattr(comfy_seam, "clip_encode", clip_encode)
    return memo


@torch.inference_mode()
def test_style_and_composition_act_only_on_their_layers(pack, models, sdxl, sdxl_inputs, vit_h, encoder_memo):
    """The Style & Composition node on SDXL: which layers' outputs differ, on identical inputs.

    Both images on: exactly output block 1 (style) and input block 8 (composition), 20 of 70
    layers. The style image or the style weight: exactly output block 1. The composition image:
    exactly input block 8. Style weight 0: the style layers are plain again. strong_style: the
    whole deepest up level (output 0-2) for style."""
    adapter = load_adapter(pack, models, "sdxl_tiny_vith.safetensors")
    node = pack.NODE_CLASS_MAPPINGS["IPAdapterExactStyleComposition"]()
    style, composition, other = picture(1), picture(2), picture(3)

    def outputs(style_image=style, composition_image=composition, weight_style=1.0, strong=False):
        (model,) = node.apply(sdxl, adapter, vit_h, style_image, composition_image, weight_style, 0.8, strong,
                              "V only", 0.0, 1.0)
        return patched_outputs(model, sdxl_inputs)

    plain = {key: inputs.plain for key, inputs in sdxl_inputs.items()}
    base = outputs()
    assert changed_layers(base, plain) == SDXL_STYLE | SDXL_COMPOSITION
    assert changed_layers(outputs(style_image=other), base) == SDXL_STYLE
    assert changed_layers(outputs(weight_style=0.5), base) == SDXL_STYLE
    assert changed_layers(outputs(composition_image=other), base) == SDXL_COMPOSITION
    assert changed_layers(outputs(weight_style=0.0), plain) == SDXL_COMPOSITION
    assert changed_layers(outputs(strong=True), plain) == SDXL_STRONG_STYLE | SDXL_COMPOSITION
    assert len(encoder_memo) == 3  # three distinct pictures, each encoded once


# --- noise image (the negative image input) ----------------------------------------------------


@torch.inference_mode()
def test_noise_seed_changes_only_the_negative_and_nothing_at_weight_zero(pack, sd15, sd15_adapter, wide, vit_h):
    """Noise Image -> Encode's negative_image. Another noise seed changes every position of the
    unconditional half of every layer and leaves the conditional half bit-identical; at adapter
    weight 0 every layer is the plain layer, whatever the seed."""
    noise = pack.NODE_CLASS_MAPPINGS["IPAdapterExactNoise"]()
    encode = pack.NODE_CLASS_MAPPINGS["IPAdapterExactEncode"]()
    reference = picture(4)

    def embeds(seed):
        (negative,) = noise.make(1.0, seed)
        (encoded,) = encode.encode(sd15_adapter, vit_h, reference, "center", "reference (zero)",
                                   negative_image=negative)
        return encoded

    first, second = embeds(1), embeds(2)
    assert not torch.equal(first.uncond, second.uncond) and torch.equal(first.cond, second.cond)
    one = patched_outputs(apply(pack, sd15, sd15_adapter, first, 0.8), wide)
    two = patched_outputs(apply(pack, sd15, sd15_adapter, second, 0.8), wide)
    zero_one = patched_outputs(apply(pack, sd15, sd15_adapter, first, 0.0), wide)
    zero_two = patched_outputs(apply(pack, sd15, sd15_adapter, second, 0.0), wide)
    for key, inputs in wide.items():
        changed = changed_positions(two[key], one[key], inputs)
        assert changed[CHUNKS.index(UNCOND)].all(), f"{key}: the noise seed must change the negative half"
        assert not changed[CHUNKS.index(COND)].any(), f"{key}: the noise seed moved the conditional half"
        assert torch.equal(zero_one[key], inputs.plain) and torch.equal(zero_two[key], inputs.plain), (
            f"{key}: at weight 0 the layer must be the plain layer")
