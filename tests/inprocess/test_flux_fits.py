"""The Apply path refuses, before patching anything, what does not fit, naming both sides.

An XLabs FLUX.1 adapter on an SDXL model, a UNet adapter on a Flux model, an XLabs adapter of another
depth than the model's double blocks, CLIP ViT-H embeddings for a ViT-L adapter, and the controls
Flux adapters do not take (mask, K+V weight types). The Flux model is the stand-in of
tests/fixtures/flux_models.py (2 double blocks), loaded by ComfyUI in bf16.
"""

from __future__ import annotations

import gc

import pytest
import torch
from safetensors.torch import save_file

from tests.fixtures.flux_models import ensure_flux_transformer, xlabs_state_dict
from tests.fixtures.generate import SD15_TINY_HIDDEN, adapter_state_dict
from tests.harness import parity


@pytest.fixture(scope="module")
def flux(comfy_inprocess):
    import comfy.sd

    model = comfy.sd.load_diffusion_model(str(ensure_flux_transformer()), model_options={"dtype": torch.bfloat16})
    yield model
    del model
    gc.collect()


@pytest.fixture(scope="module")
def files(comfy_inprocess, tmp_path_factory):
    _, cache, _ = parity.pack_api()
    folder = tmp_path_factory.mktemp("flux_fits")
    made = {
        "flux-2.safetensors": xlabs_state_dict(4, depth=2, seed=71),
        "flux-3.safetensors": xlabs_state_dict(4, depth=3, seed=72),
        "sd15-base.safetensors": adapter_state_dict("base", SD15_TINY_HIDDEN, 768, seed=73, dtype=torch.float16),
    }
    out = {}
    for name, tensors in made.items():
        save_file(tensors, str(folder / name))
        out[name] = cache.get(str(folder / name))
    return out


def _embeds(width: int):
    _, _, image_embeds = parity.pack_api()
    return image_embeds(torch.randn(1, width), torch.zeros(1, width), "image_embeds")


def test_flux_adapter_on_sdxl_model(files):
    apply_adapter, _, _ = parity.pack_api()
    pair = parity.build_pair("SDXL", narrow=True, share_weights=True)
    try:
        with pytest.raises(ValueError, match=r"flux-2\.safetensors is an XLabs FLUX\.1 IP-Adapter \(2 double blocks\) "
                                             r"but the model is SDXL, not a Flux model"):
            apply_adapter(pair.comfy, files["flux-2.safetensors"], _embeds(768))
    finally:
        del pair
        gc.collect()


def test_unet_adapter_on_flux_model(flux, files):
    apply_adapter, _, _ = parity.pack_api()
    with pytest.raises(ValueError, match=r"sd15-base\.safetensors is an SD1\.5 IP-Adapter .* but the model is Flux, a "
                                         r"Flux model"):
        apply_adapter(flux, files["sd15-base.safetensors"], _embeds(1024))


def test_adapter_depth_must_match_double_blocks(flux, files):
    apply_adapter, _, _ = parity.pack_api()
    with pytest.raises(ValueError, match=r"flux-3\.safetensors covers 3 double blocks but Flux has 2"):
        apply_adapter(flux, files["flux-3.safetensors"], _embeds(768))


@pytest.mark.parametrize("width", [1024, 1280])  # CLIP ViT-H, ViT-bigG image_embeds
def test_vit_l_embeds_required(flux, files, width):
    apply_adapter, _, _ = parity.pack_api()
    with pytest.raises(ValueError, match=rf"takes ViT-L image_embeds of 768; these embeds are image_embeds of {width}"):
        apply_adapter(flux, files["flux-2.safetensors"], _embeds(width))


@pytest.mark.parametrize("control", ["mask", "K+V"])
def test_unet_only_controls_refused(flux, files, control):
    apply_adapter, _, _ = parity.pack_api()
    kwargs = {"attn_mask": torch.ones(1, 16, 16)} if control == "mask" else {"weight_type": "K+V"}
    with pytest.raises(ValueError, match=r"XLabs FLUX\.1 adapter: it takes the 'V only' weight type and no attention"):
        apply_adapter(flux, files["flux-2.safetensors"], _embeds(768), **kwargs)


def test_fitting_adapter_patches_every_double_block(flux, files):
    """The accepted case: one ("double_block", i) replacement per block on a clone; the input model untouched."""
    apply_adapter, _, _ = parity.pack_api()
    patched = apply_adapter(flux, files["flux-2.safetensors"], _embeds(768))
    table = patched.model_options["transformer_options"]["patches_replace"]["dit"]
    assert sorted(table) == [("double_block", 0), ("double_block", 1)]
    assert [patch.block_index for _, patch in sorted(table.items())] == [0, 1]
    assert "dit" not in flux.model_options["transformer_options"].get("patches_replace", {})
    assert files["flux-2.safetensors"].patcher in patched.model_patches_models()


def test_apply_node_takes_flux_adapter_and_refuses_unet_block_controls(flux, files):
    """Apply IP-Adapter patches a Flux MODEL the same way; Layer Weights and Style & Composition name UNet blocks."""
    from ipadapter_pack.ip_adapter_core.layer_weights import LayerWeights
    from ipadapter_pack.nodes.apply import ApplyIPAdapter, IPAdapterStyleComposition

    adapter = files["flux-2.safetensors"]
    (patched,) = ApplyIPAdapter().apply(flux, adapter, _embeds(768), 0.8, "V only", 0.0, 1.0, "concat")
    table = patched.model_options["transformer_options"]["patches_replace"]["dit"]
    assert [patch.application.weight for _, patch in sorted(table.items())] == [0.8, 0.8]
    with pytest.raises(ValueError, match=r"Layer Weights node is for UNet adapters"):
        ApplyIPAdapter().apply(flux, adapter, _embeds(768), 0.8, "V only", 0.0, 1.0, "concat",
                               layer_weights=LayerWeights("linear"))
    with pytest.raises(ValueError, match=r"style and composition pick UNet blocks"):
        IPAdapterStyleComposition().apply(flux, adapter, None, None, None, 1.0, 1.0, False, "V only", 0.0, 1.0)
