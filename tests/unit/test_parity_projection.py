"""Our projection models against diffusers' classes, built by diffusers' own converter."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.generate import adapter_state_dict

CASES = [
    # kind, hidden sizes, context, input shape
    ("base", [320] * 16, 768, (3, 1024)),
    ("vitg", [320] * 16, 768, (3, 1280)),
    ("plus", [320] * 16, 768, (3, 257, 1280)),
    ("fullface", [320] * 16, 768, (3, 257, 1280)),
    ("vith", [640] * 70, 2048, (3, 1024)),
    ("plus_vith", [640] * 70, 2048, (3, 257, 1280)),
]


@pytest.mark.parametrize("kind,hidden,context,shape", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
@torch.no_grad()
def test_projection_matches_diffusers(kind, hidden, context, shape):
    from diffusers import UNet2DConditionModel

    from ipadapter_pack.models.ip_adapter import IPAdapterModel

    flat = adapter_state_dict(kind, hidden, context, seed=3)
    ours = IPAdapterModel.from_state_dict(flat)
    proj_sd = {k.removeprefix("image_proj."): v.clone() for k, v in flat.items() if k.startswith("image_proj.")}
    # The converter only needs `self` for meta-device loading, which is off here.
    reference = UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(None, proj_sd, low_cpu_mem_usage=False)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    expected = reference(x)
    got = ours.image_tokens(x)
    assert got.shape == expected.shape
    diff = float((got - expected).abs().max() / expected.abs().max())
    assert diff <= 1e-5, f"{kind}: projection differs from diffusers by {diff:.2e}"
