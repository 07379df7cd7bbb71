"""The layer map and variant detection, checked against diffusers' and ComfyUI's own tables."""

from __future__ import annotations

import re

import pytest
import torch

from tests.fixtures.generate import adapter_state_dict
from tests.harness.reference_unets import SD15_COMFY, SD15_UNET, SDXL_COMFY, SDXL_UNET


def processor_blocks(unet_config: dict, comfy_config: dict) -> list[tuple[str, int, int]]:
    """ComfyUI block keys of diffusers' attn2 processors, in diffusers' order, via ComfyUI's key map."""
    import comfy.utils
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    to_ldm = comfy.utils.unet_to_diffusers(dict(comfy_config))
    blocks = []
    for name in unet.attn_processors:
        if not name.endswith("attn2.processor"):
            continue
        ldm = to_ldm[name.replace("processor", "to_k.weight")]
        m = re.match(r"(input_blocks|middle_block|output_blocks)\.?(\d*)\.\d+\.transformer_blocks\.(\d+)\.", ldm)
        kind = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[m[1]]
        blocks.append((kind, int(m[2] or 0), int(m[3])))
    return blocks


@pytest.mark.parametrize("base", ["SD1.5", "SDXL"])
def test_layer_map_matches_diffusers_order(base, comfy_inprocess):
    from ipadapter_pack.ip_adapter_core.layout import SD15_LAYERS, SDXL_LAYERS

    ours, configs = {
        "SD1.5": (SD15_LAYERS, (SD15_UNET, SD15_COMFY)),
        "SDXL": (SDXL_LAYERS, (SDXL_UNET, SDXL_COMFY)),
    }[base]
    assert list(ours) == processor_blocks(*configs)
    assert ("middle", 0, 0) in ours and len(ours) == {"SD1.5": 16, "SDXL": 70}[base]


SD15_TINY = [320] * 16
SDXL_TINY = [640] * 70
EXPECTED = [
    # kind, hidden, context -> variant, base, encoder, output, embed, tokens
    ("base", SD15_TINY, 768, "base", "SD1.5", "ViT-H", "image_embeds", 1024, 4),
    ("vitg", SD15_TINY, 768, "base", "SD1.5", "ViT-bigG", "image_embeds", 1280, 4),
    ("plus", SD15_TINY, 768, "plus", "SD1.5", "ViT-H", "penultimate", 1280, 16),
    ("fullface", SD15_TINY, 768, "full-face", "SD1.5", "ViT-H", "penultimate", 1280, 257),
    ("base", SDXL_TINY, 2048, "base", "SDXL", "ViT-bigG", "image_embeds", 1280, 4),
    ("vith", SDXL_TINY, 2048, "base", "SDXL", "ViT-H", "image_embeds", 1024, 4),
    ("plus_vith", SDXL_TINY, 2048, "plus", "SDXL", "ViT-H", "penultimate", 1280, 16),
]


@pytest.mark.parametrize("case", EXPECTED, ids=lambda c: f"{c[0]}-{c[4]}")
def test_detects_variant_from_weights(case):
    from ipadapter_pack.models.ip_adapter import IPAdapterModel

    kind, hidden, context, variant, base, encoder, output, embed, tokens = case
    model = IPAdapterModel.from_state_dict(adapter_state_dict(kind, hidden, context, seed=0))
    spec = model.spec
    assert (spec.variant, spec.base_model, spec.encoder, spec.encoder_output, spec.embed_dim, spec.tokens) == (
        variant, base, encoder, output, embed, tokens)
    shape = (2, 257, embed) if output == "penultimate" else (2, embed)
    assert model.image_tokens(torch.randn(shape)).shape == (2, tokens, context)


def test_refuses_faceid_and_foreign_files():
    from ipadapter_pack.ip_adapter_core.layout import AdapterFormatError
    from ipadapter_pack.models.ip_adapter import IPAdapterModel

    sd = adapter_state_dict("base", SD15_TINY, 768, seed=0)
    faceid = dict(sd, **{"ip_adapter.1.to_q_lora.down.weight": torch.zeros(128, 320)})
    with pytest.raises(AdapterFormatError, match="FaceID"):
        IPAdapterModel.from_state_dict(faceid)
    with pytest.raises(AdapterFormatError, match="not an IP-Adapter"):
        IPAdapterModel.from_state_dict({"model.diffusion_model.x": torch.zeros(1)})
    partial = {k: v for k, v in sd.items() if not k.startswith("ip_adapter.31.")}
    with pytest.raises(AdapterFormatError, match="15 layers"):
        IPAdapterModel.from_state_dict(partial)
    bad = dict(sd, **{"ip_adapter.5.to_v_ip.weight": torch.zeros(320, 1024)})
    with pytest.raises(AdapterFormatError, match=r"ip_adapter.5.to_v_ip.weight has shape \[320, 1024\]"):
        IPAdapterModel.from_state_dict(bad)
    nan = dict(sd, **{"image_proj.norm.bias": torch.full((768,), float("nan"))})
    with pytest.raises(AdapterFormatError, match="NaN"):
        IPAdapterModel.from_state_dict(nan)
