"""The pack's patched ComfyUI UNet against diffusers' IP-Adapter on identical weights and inputs.

For each base model: first the bare UNets (so a mismatch is put on the right side), then
each adapter variant loaded through diffusers' own loader and through our loader node path.
Tolerance: max |ours - diffusers| / max |diffusers| <= 1e-4 in fp32.
"""

from __future__ import annotations

import gc
import json

import pytest
import torch
from safetensors.torch import save_file

from tests.fixtures.generate import adapter_state_dict
from tests.harness.parity import TOLERANCE, nested, record
from tests.harness.reference_unets import (
    build_pair,
    comfy_forward,
    relative_difference,
    sdxl_added_cond,
    set_diffusers_scale,
)

CASES = {
    "SD1.5": [("base", 1024), ("plus", 1280), ("fullface", 1280), ("vitg", 1280)],
    "SDXL": [("base", 1280), ("vith", 1024), ("plus_vith", 1280)],
}
SPATIAL = {"SD1.5": 32, "SDXL": 32}  # latent side: 256 px


def encodings(kind: str, width: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-ins for CLIP outputs: cond and uncond, as the reference would feed them."""
    if kind in ("plus", "fullface", "plus_vith"):
        shape = (1, 257, width)
        return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    return torch.randn(1, width, generator=gen), torch.zeros(1, width)


@pytest.fixture(scope="module", params=["SD1.5", "SDXL"])
def pair(request, comfy_inprocess):
    built = build_pair(request.param, seed=1)
    yield built
    del built
    gc.collect()


@pytest.mark.slow
@torch.inference_mode()
def test_adapter_matches_diffusers(pair, tmp_path):
    from ipadapter_pack.ip_adapter_core.embeds import ImageEmbeds
    from ipadapter_pack.nodes.apply import apply_adapter
    from ipadapter_pack.nodes.comfy_seam import ADAPTERS

    gen = torch.Generator().manual_seed(7)
    side = SPATIAL[pair.base_model]
    latents = torch.randn(1, 4, side, side, generator=gen).repeat(2, 1, 1, 1)
    text = torch.randn(2, 77, pair.context_dim, generator=gen)  # [uncond, cond] prompts
    timesteps = torch.tensor([500.0, 500.0])
    added, y = ({}, None)
    if pair.base_model == "SDXL":
        added, y = sdxl_added_cond(pair.diffusers, 2, gen)

    # 1. The bare UNets agree: whatever differs below is the adapter.
    bare_ref = pair.diffusers(latents, timesteps, text, added_cond_kwargs=added).sample
    bare_ours = comfy_forward(pair.comfy, latents, timesteps, text, [1, 0], y=y)
    bare = relative_difference(bare_ours, bare_ref)
    record(f"{pair.base_model} bare UNet", bare)
    assert bare <= TOLERANCE, f"the bare UNets differ by {bare:.2e}: the comparison itself is off"

    for kind, width in CASES[pair.base_model]:
        flat = adapter_state_dict(kind, pair.hidden_sizes, pair.context_dim, seed=11)
        path = tmp_path / f"{pair.base_model}_{kind}.safetensors"
        save_file(flat, str(path))
        adapter = ADAPTERS.get(str(path))
        assert len(adapter.spec.layers) == {"SD1.5": 16, "SDXL": 70}[pair.base_model]

        cond, uncond = encodings(kind, width, gen)
        weight = 0.8
        patched = apply_adapter(pair.comfy, adapter, ImageEmbeds(cond, uncond, adapter.spec.encoder_output), weight)
        table = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
        assert len(table) == len(adapter.spec.layers) and ("middle", 0, 0) in table
        assert "patches_replace" not in pair.comfy.model_options["transformer_options"], "input MODEL was changed"

        pair.diffusers._load_ip_adapter_weights([nested(flat)], low_cpu_mem_usage=False)
        set_diffusers_scale(pair.diffusers, weight)
        images = torch.cat([uncond, cond])[:, None]  # [batch, 1 image, ...], negative first
        ref = pair.diffusers(latents, timesteps, text, added_cond_kwargs={**added, "image_embeds": [images]}).sample
        ours = comfy_forward(patched, latents, timesteps, text, [1, 0], y=y)

        diff = relative_difference(ours, ref)
        effect = relative_difference(ref, bare_ref)
        record(f"{pair.base_model} {kind}", diff)
        record(f"{pair.base_model} {kind} adapter effect", effect)
        assert effect > 0.01, f"{kind}: the adapter barely changes the output ({effect:.2e}); the test has no teeth"
        assert diff <= TOLERANCE, f"{pair.base_model} {kind}: ours vs diffusers differ by {diff:.2e}"


BLOCK_DICTS = {
    "SD1.5": [{"down": {"block_2": [0.0, 1.0]}, "up": {"block_1": [0.5, 1.0, 0.0]}, "mid": 0.3}],
    "SDXL": [{"up": {"block_0": [0.0, 1.0, 0.0]}},
             {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}],
}


@pytest.mark.slow
@torch.inference_mode()
def test_controls_match_diffusers(pair, tmp_path):
    """Block dictionaries (set_ip_adapter_scale), attention masks, and sigma gating."""
    from types import SimpleNamespace

    from diffusers.image_processor import IPAdapterMaskProcessor
    from diffusers.loaders.ip_adapter import IPAdapterMixin

    from ipadapter_pack.ip_adapter_core.embeds import ImageEmbeds
    from ipadapter_pack.ip_adapter_core.layer_weights import LayerWeights
    from ipadapter_pack.nodes.apply import apply_adapter
    from ipadapter_pack.nodes.comfy_seam import ADAPTERS

    gen = torch.Generator().manual_seed(9)
    side = SPATIAL[pair.base_model]
    latents = torch.randn(1, 4, side, side, generator=gen).repeat(2, 1, 1, 1)
    text = torch.randn(2, 77, pair.context_dim, generator=gen)
    timesteps = torch.tensor([300.0, 300.0])
    added, y = ({}, None)
    if pair.base_model == "SDXL":
        added, y = sdxl_added_cond(pair.diffusers, 2, gen)
    kind, width = CASES[pair.base_model][0]
    flat = adapter_state_dict(kind, pair.hidden_sizes, pair.context_dim, seed=12)
    path = tmp_path / "controls.safetensors"
    save_file(flat, str(path))
    adapter = ADAPTERS.get(str(path))
    cond, uncond = encodings(kind, width, gen)
    embeds = ImageEmbeds(cond, uncond, adapter.spec.encoder_output)
    pair.diffusers._load_ip_adapter_weights([nested(flat)], low_cpu_mem_usage=False)
    images = torch.cat([uncond, cond])[:, None]

    def reference(**kwargs):
        return pair.diffusers(latents, timesteps, text, added_cond_kwargs={**added, "image_embeds": [images]},
                              **kwargs).sample

    # Block dictionaries: diffusers' own set_ip_adapter_scale against our parser.
    for scales in BLOCK_DICTS[pair.base_model]:
        IPAdapterMixin.set_ip_adapter_scale(SimpleNamespace(unet=pair.diffusers), scales)
        weights = LayerWeights.parse("linear", dict_text=json.dumps(scales)).for_layers(adapter.spec.layers)
        ours = comfy_forward(apply_adapter(pair.comfy, adapter, embeds, layer_weights=weights),
                             latents, timesteps, text, [1, 0], y=y)
        diff = relative_difference(ours, reference())
        record(f"{pair.base_model} block dict {json.dumps(scales)}", diff)
        assert diff <= TOLERANCE, f"block dict {scales}: {diff:.2e}"

    # One attention mask (left half), prepared by diffusers' IPAdapterMaskProcessor.
    set_diffusers_scale(pair.diffusers, 0.9)
    pixels = side * 8
    mask_image = torch.zeros(1, 1, pixels, pixels)
    mask_image[..., : pixels // 2] = 1.0
    masks = IPAdapterMaskProcessor().preprocess(mask_image, height=pixels, width=pixels)  # [1, 1, H, W]
    expected = reference(cross_attention_kwargs={"ip_adapter_masks": [masks]})
    ours = comfy_forward(apply_adapter(pair.comfy, adapter, embeds, 0.9, attn_mask=masks[:, 0]),
                         latents, timesteps, text, [1, 0], y=y)
    diff = relative_difference(ours, expected)
    record(f"{pair.base_model} attention mask", diff)
    assert diff <= TOLERANCE, f"mask: {diff:.2e}"
    assert relative_difference(expected, reference()) > 1e-3, "the mask changed nothing; the test has no teeth"

    # Sigma gating: outside [end, start] the patched model is the bare model, bit for bit.
    gated = apply_adapter(pair.comfy, adapter, embeds, 1.0, start_at=0.5, end_at=0.8)
    sampling = pair.comfy.get_model_object("model_sampling")
    early, late = float(sampling.sigma_max), float(sampling.percent_to_sigma(0.9))
    inside = float(sampling.percent_to_sigma(0.6))
    bare = comfy_forward(pair.comfy, latents, timesteps, text, [1, 0], y=y)
    for sigma in (early, late):
        assert torch.equal(comfy_forward(gated, latents, timesteps, text, [1, 0], sigma=sigma, y=y), bare)
    active = comfy_forward(gated, latents, timesteps, text, [1, 0], sigma=inside, y=y)
    assert relative_difference(active, bare) > 0.01
