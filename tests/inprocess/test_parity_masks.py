"""Attention masks on non-square pictures: the pack against diffusers' IP-Adapter mask path.

diffusers: `IPAdapterMaskProcessor.preprocess(mask, height, width)` brings a mask of any size
to the picture's size (resize, grayscale, binarise), and the attention processor downsamples it
to each layer's query grid (bicubic) from `cross_attention_kwargs={"ip_adapter_masks": [...]}`.
The pack gets the same preprocessed mask as its `attn_mask` and resizes it per layer from the
latent's grid. Pictures: 384x256 and 256x384 px (latents 48x32 and 32x48, the proportions of
768x512 / 512x768), each with a drawn mask of another, non-square aspect (a wide mask on the
tall picture and a tall one on the wide picture), one latent, cond and uncond batched, through
ComfyUI's sampler (tests/harness/parity.py).

Model: the SD1.5 topology with every level 320 wide (ComfyUI detects it as SD15): what masks
test is the spatial path (token grids per level, 48x32 -> 24x16 -> 12x8 -> 6x4), which the widths
do not change, and the narrow UNet keeps a 48x32 step a few seconds on this CPU.
Tolerance: 1e-4 (fp32). Teeth: the mask changes the step, and the same mask turned upside down
fails the comparison.
"""

from __future__ import annotations

import gc

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from tests.fixtures.generate import adapter_state_dict
from tests.harness import parity
from tests.harness.parity import TOLERANCE, record, relative_difference

WEIGHT = 0.9
# latent (h, w) -> the drawn mask's (width, height) in px: another aspect, also non-square
PICTURES = {(48, 32): (300, 140), (32, 48): (120, 260)}


@pytest.fixture(scope="module")
def pair(comfy_inprocess):
    built = parity.build_pair("SD1.5", seed=13, narrow=True, share_weights=True)
    yield built
    del built
    gc.collect()


@pytest.fixture(scope="module")
def adapter(pair, tmp_path_factory):
    _, cache, _ = parity.pack_api()
    flat = adapter_state_dict("base", parity.hidden_sizes(pair.diffusers), pair.context_dim, seed=41)
    path = tmp_path_factory.mktemp("mask_adapter") / "base.safetensors"
    save_file(flat, str(path))
    parity.load_diffusers_adapter(pair.diffusers, flat, WEIGHT)
    return cache.get(str(path))


def drawn_mask(size: tuple[int, int]) -> Image.Image:
    """A white ellipse and bar, off-centre, on black: edges at odd places on every grid."""
    width, height = size
    image = Image.new("L", size, 0)
    draw = ImageDraw.Draw(image)
    draw.ellipse([0.12 * width, 0.2 * height, 0.61 * width, 0.83 * height], fill=255)
    draw.rectangle([0.7 * width, 0.05 * height, 0.83 * width, 0.55 * height], fill=255)
    return image


@pytest.mark.slow
@pytest.mark.parametrize("latent", list(PICTURES), ids=lambda hw: f"{hw[0] * 8}x{hw[1] * 8}px")
@torch.inference_mode()
def test_mask_on_non_square_picture(pair, adapter, latent):
    from diffusers.image_processor import IPAdapterMaskProcessor

    apply_adapter, _, image_embeds = parity.pack_api()
    gen = torch.Generator().manual_seed(14)
    cond, uncond = parity.encodings("base", 1, gen)
    embeds = image_embeds(cond, uncond, adapter.spec.encoder_output)
    step = parity.make_step(pair, latent, batch=1, seed=15)
    height, width = step.pixels
    mask_size = PICTURES[latent]
    assert mask_size[0] / mask_size[1] != width / height and mask_size[0] != mask_size[1]

    masks = IPAdapterMaskProcessor().preprocess(drawn_mask(mask_size), height=height, width=width)
    assert masks.shape == (1, 1, height, width)
    coverage = float(masks.mean())
    assert 0.1 < coverage < 0.7, f"the mask covers {coverage:.0%} of the picture"

    images = torch.cat([uncond, cond])[:, None]
    unmasked = parity.reference(pair, step, image_embeds=images)
    ref = parity.reference(pair, step, image_embeds=images, ip_masks=masks)
    effect = relative_difference(ref.eps, unmasked.eps)

    name = f"{height}x{width}px"
    diff, _ = parity.sampler_parity(apply_adapter(pair.comfy, adapter, embeds, WEIGHT, attn_mask=masks[:, 0]), ref)
    record(f"sampler SD1.5-narrow mask {name} (mask {mask_size[0]}x{mask_size[1]}px)", diff)
    record(f"sampler SD1.5-narrow mask {name} mask effect", effect)
    assert effect > 0.01, f"{name}: the mask barely changes the step ({effect:.2e}); the test has no teeth"
    assert diff <= TOLERANCE, f"{name}: ours vs diffusers differ by {diff:.2e}"

    flipped = apply_adapter(pair.comfy, adapter, embeds, WEIGHT, attn_mask=masks[:, 0].flip(-2))
    mutant, _ = parity.sampler_parity(flipped, ref)
    record(f"mutant: sampler SD1.5-narrow mask {name} upside down", mutant)
    assert mutant > TOLERANCE, f"{name}: the mask turned upside down went unseen ({mutant:.2e})"
