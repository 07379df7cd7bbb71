"""The InstantX SD3.5 negative, as diffusers' SD3 pipeline builds it: all-zero SigLIP states (not an encoding
of zero pixels, which the plus adapters use); an explicit black image stays an encoding, as asked."""

from __future__ import annotations

import torch


def test_sd3_negative_is_zero_states_unless_a_black_image_is_asked(pack, monkeypatch):
    from ipadapter_pack.ip_adapter_core.layout import detect, split_state_dict
    from ipadapter_pack.nodes import comfy_seam, encode
    from tests.fixtures import sd3_models

    shapes = sd3_models.instantx_spec(128, 2, resampler_dim=256, resampler_heads=4)
    spec = detect(split_state_dict({key: torch.empty(shape, device="meta") for key, shape, _ in shapes}))
    assert spec.is_sd3 and spec.uses_hidden_states

    states = torch.randn(2, 729, 1152, generator=torch.Generator().manual_seed(0))

    def siglip(clip_vision, images, output, center_crop):  # stands for the SigLIP tower: no 400M weights here
        return states[: images.shape[0]] + 1.0

    monkeypatch.setattr(comfy_seam, "clip_encode", siglip)
    monkeypatch.setattr(encode, "check_encoder", lambda clip_vision, spec: None)
    image = torch.rand(2, 384, 384, 3, generator=torch.Generator().manual_seed(1))

    embeds = encode.encode_embeds(object(), image, spec, "center", "reference (zero)")
    assert torch.equal(embeds.cond, states + 1.0)
    assert torch.equal(embeds.uncond, torch.zeros(1, 729, 1152))

    black = encode.encode_embeds(object(), image, spec, "center", "black image")
    assert torch.equal(black.uncond, states[:1] + 1.0)  # the encoding of the black picture, as asked
