"""The nodes inside ComfyUI (in-process): loading, encoding conventions, patching, clear refusals."""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch


@pytest.fixture(scope="module")
def sdxl(comfy_inprocess, models):
    import comfy.sd

    path = models["checkpoints/sdxl_tiny.safetensors"]
    return comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)[0]


def load(pack, models, name):
    node = pack.NODE_CLASS_MAPPINGS["IPAdapterExactLoader"]()
    models.ensure(f"ipadapter/{name}")
    adapter, info = node.load(name)
    return adapter, info


def snapshot(model):
    """Everything about a MODEL that applying an adapter could change."""
    state = {k: v.clone() for k, v in model.model.state_dict().items()}
    return state, copy.copy(model.model_options), repr(model.model_options)


def assert_unchanged(model, before):
    state, options, text = before
    assert repr(model.model_options) == text
    now = model.model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


@pytest.mark.parametrize("name,expected", [
    ("sd15_tiny_base.safetensors", "IP-Adapter base for SD1.5: linear projection of ViT-H image_embeds (1024)"),
    ("sd15_tiny_base.bin", "IP-Adapter base for SD1.5: linear projection of ViT-H image_embeds (1024)"),
    ("sd15_tiny_plus.bin", "IP-Adapter plus for SD1.5: resampler projection of ViT-H penultimate (1280)"),
    ("sd15_tiny_fullface.safetensors", "IP-Adapter full-face for SD1.5: mlp projection of ViT-H penultimate"),
    ("sdxl_tiny_base.safetensors", "IP-Adapter base for SDXL: linear projection of ViT-bigG image_embeds (1280)"),
])
def test_loader_reports_variant(pack, models, name, expected):
    _, info = load(pack, models, name)
    assert info.startswith(expected)


def test_loader_reads_each_file_once_and_rereads_changes(pack, models, tmp_path, comfy_inprocess):
    from ipadapter_pack.nodes.comfy_seam import ADAPTERS

    src = models["ipadapter/sd15_tiny_base.safetensors"]
    copy_path = tmp_path / "copy.safetensors"
    shutil.copy(src, copy_path)
    reads = ADAPTERS.reads
    first = ADAPTERS.get(str(copy_path))
    assert ADAPTERS.get(str(copy_path)) is first and ADAPTERS.reads == reads + 1
    os.utime(copy_path, ns=(1, 1))
    assert ADAPTERS.get(str(copy_path)) is not first and ADAPTERS.reads == reads + 2


def test_apply_patches_every_layer_and_never_the_input(pack, models, sd15):
    from ipadapter_pack.ip_adapter_core.embeds import ImageEmbeds

    adapter, _ = load(pack, models, "sd15_tiny_base.safetensors")
    embeds = ImageEmbeds(torch.randn(1, 1024), torch.zeros(1, 1024), "image_embeds")
    apply = pack.NODE_CLASS_MAPPINGS["IPAdapterExactApply"]()
    before = snapshot(sd15)
    (one,) = apply.apply(sd15, adapter, embeds, 0.8, "V only", 0.0, 1.0, "concat")
    (two,) = apply.apply(one, adapter, embeds, 0.4, "K+V", 0.0, 1.0, "concat")
    assert_unchanged(sd15, before)
    table = two.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert len(table) == 16 and ("middle", 0, 0) in table
    assert [a.weight for a in table[("middle", 0, 0)].applications()] == [0.8, 0.4]
    # the stacked model loads one copy of the weights, shared by both applications
    assert table[("input", 1, 0)].models() == [adapter.patcher]
    first = one.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1, 0)]
    assert first.applications()[0].weight == 0.8
    # ComfyUI deep-copies model options on every clone: the adapter weights must not follow
    clone_table = two.clone().model_options["transformer_options"]["patches_replace"]["attn2"]
    shared = clone_table[("input", 1, 0)].applications()[0].adapter.key_value(0).to_k_ip.weight
    assert shared.data_ptr() == adapter.model.key_value(0).to_k_ip.weight.data_ptr()


def test_mismatches_are_named(pack, models, sd15, sdxl):
    from ipadapter_pack.ip_adapter_core.embeds import ImageEmbeds

    apply = pack.NODE_CLASS_MAPPINGS["IPAdapterExactApply"]()
    sd15_adapter, _ = load(pack, models, "sd15_tiny_base.safetensors")
    sdxl_adapter, _ = load(pack, models, "sdxl_tiny_vith.safetensors")
    embeds = ImageEmbeds(torch.randn(1, 1024), torch.zeros(1, 1024), "image_embeds")
    before = snapshot(sdxl)
    with pytest.raises(ValueError, match="is an SD1.5 adapter .* the model is SDXL"):
        apply.apply(sdxl, sd15_adapter, embeds, 1.0, "V only", 0.0, 1.0, "concat")
    assert_unchanged(sdxl, before)
    with pytest.raises(ValueError, match="is an SDXL adapter .* the model is SD15"):
        apply.apply(sd15, sdxl_adapter, embeds, 1.0, "V only", 0.0, 1.0, "concat")
    plus, _ = load(pack, models, "sd15_tiny_plus.safetensors")
    with pytest.raises(ValueError, match="takes ViT-H penultimate of 1280; these embeds are image_embeds of 1024"):
        apply.apply(sd15, plus, embeds, 1.0, "V only", 0.0, 1.0, "concat")
    with pytest.raises(ValueError, match="after end_at"):
        apply.apply(sd15, sd15_adapter, embeds, 1.0, "V only", 0.9, 0.1, "concat")
    wide = load(pack, models, "sd15_base.safetensors")[0]  # real SD1.5 widths on a 320-wide UNet
    with pytest.raises(ValueError, match="640-wide image keys .* 320 wide"):
        apply.apply(sd15, wide, embeds, 1.0, "V only", 0.0, 1.0, "concat")


@torch.inference_mode()
def test_encoder_conventions_match_transformers(pack, models, vit_h):
    """Our encodings against transformers' CLIP on the same weights and pixels.

    Base: image_embeds, zero unconditional. Plus: hidden_states[-2], and the unconditional is
    the encoding of an all-zero (normalised) pixel tensor, as the reference implementation does.
    """
    import comfy.clip_vision
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    sd = load_file(str(models["clip_vision/vit_h.safetensors"]))
    config = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                              patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu")
    reference = CLIPVisionModelWithProjection(config).eval()
    missing, unexpected = reference.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    assert not [m for m in missing if "position_ids" not in m] and not unexpected

    encode = pack.NODE_CLASS_MAPPINGS["IPAdapterExactEncode"]()
    base, _ = load(pack, models, "sd15_tiny_base.safetensors")
    plus, _ = load(pack, models, "sd15_tiny_plus.safetensors")
    image = torch.rand(1, 300, 200, 3, generator=torch.Generator().manual_seed(0))
    pixels = comfy.clip_vision.clip_preprocess(image, size=224).float()

    (e_base,) = encode.encode(base, vit_h, image, "center", "reference (zero)")
    (e_plus,) = encode.encode(plus, vit_h, image, "center", "reference (zero)")
    ref = reference(pixel_values=pixels, output_hidden_states=True)
    ref_zero = reference(pixel_values=torch.zeros_like(pixels), output_hidden_states=True)

    def close(a, b):
        return float((a.float() - b).abs().max() / b.abs().max())

    # ComfyUI runs the fp16 fixture encoder partly in half precision: 3e-2 covers that, and each
    # check also demands that the right tensor is far closer than its nearest wrong alternative.
    tol = 3e-2
    assert close(e_base.cond, ref.image_embeds) < tol
    assert torch.equal(e_base.uncond, torch.zeros(1, 1024))
    hs = ref.hidden_states
    assert close(e_plus.cond, hs[-2]) < tol
    assert close(e_plus.cond, hs[-2]) * 3 < min(close(e_plus.cond, hs[-1]), close(e_plus.cond, hs[-3]))
    assert close(e_plus.uncond, ref_zero.hidden_states[-2]) < tol
    (black,) = encode.encode(plus, vit_h, image, "center", "black image")
    assert close(black.uncond, ref_zero.hidden_states[-2]) > 3 * close(e_plus.uncond, ref_zero.hidden_states[-2]), (
        "a black image must differ from the reference's zero pixel tensor")


def test_encoder_width_mismatch_is_named(pack, models, comfy_inprocess):
    import comfy.clip_vision

    vit_l = comfy.clip_vision.load(str(models["clip_vision/vit_l.safetensors"]))
    encode = pack.NODE_CLASS_MAPPINGS["IPAdapterExactEncode"]()
    base, _ = load(pack, models, "sd15_tiny_base.safetensors")
    expected = r"expects ViT-H image_embeds of 1024, the CLIP vision model gives 768 \(ViT-L\)"
    with pytest.raises(ValueError, match=expected):
        encode.encode(base, vit_l, torch.rand(1, 64, 64, 3), "center", "reference (zero)")
