"""XLabs FLUX.1 IP-Adapter files: told apart by their tensors, refused with reasons when they are not right.

Full-size layouts (19 double blocks, v1 4 tokens and v2 16) are checked on meta tensors: detection reads
shapes only. The projection and per-block key/value modules are built from a small real file and
compared with an independent formula on its tensors.
"""

from __future__ import annotations

import pytest
import torch

from ipadapter_pack.ip_adapter_core.layout import AdapterFormatError, detect, split_state_dict
from ipadapter_pack.models.ip_adapter import IPAdapterModel
from tests.fixtures.flux_models import _xlabs_spec, xlabs_state_dict


def meta_file(tokens: int, depth: int = 19) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, device="meta") for key, shape, _ in _xlabs_spec(tokens, depth)}


@pytest.mark.parametrize(("tokens", "variant"), [(4, "v1"), (16, "v2")])
def test_detects_published_layouts(tokens, variant):
    spec = detect(split_state_dict(meta_file(tokens)))
    assert (spec.family, spec.variant, spec.tokens, spec.depth) == ("flux-xlabs", variant, tokens, 19)
    assert (spec.encoder, spec.encoder_output, spec.embed_dim, spec.context_dim) == ("ViT-L", "image_embeds", 768, 4096)
    assert spec.layers == tuple(("double_block", i, 0) for i in range(19))
    assert spec.is_flux and not spec.is_faceid and not spec.has_lora


def test_renames_keys_as_diffusers_does():
    parts = split_state_dict(meta_file(4, depth=2))
    assert sorted(parts["image_proj"]) == ["norm.bias", "norm.weight", "proj.bias", "proj.weight"]
    assert sorted(parts["ip_adapter"]) == [f"{i}.to_{kv}_ip.{p}" for i in range(2) for kv in "kv" for p in ("bias",
                                                                                                            "weight")]


def _without(sd: dict, key: str) -> dict:
    return {k: v for k, v in sd.items() if k != key}


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda sd: _without(sd, "double_blocks.1.processor.ip_adapter_double_stream_v_proj.bias"), "missing or unknown"),
    (lambda sd: {k.replace("double_blocks.1.", "double_blocks.2."): v for k, v in sd.items()}, "without gaps"),
    (lambda sd: sd | {"ip_adapter_proj_model.proj.weight": torch.empty(4 * 4096, 1024, device="meta")},
     "ViT-L/14 image_embeds (768)"),
    (lambda sd: sd | {"ip_adapter_proj_model.proj.weight": torch.empty(4 * 4096 + 8, 768, device="meta"),
                      "ip_adapter_proj_model.proj.bias": torch.empty(4 * 4096 + 8, device="meta")}, "whole 4096-wide"),
    (lambda sd: sd | {"double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight":
                      torch.empty(2048, 4096, device="meta")}, "[3072, 4096]"),
])
def test_refuses_broken_files_with_reason(mutate, message):
    with pytest.raises(AdapterFormatError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        detect(split_state_dict(mutate(meta_file(4, depth=3))))


def test_modules_compute_the_published_formula():
    """tokens = LayerNorm(reshape(proj(e))), K = tokens @ W_k^T + b_k: the model's modules on the file's tensors."""
    flat = {k: v.float() for k, v in xlabs_state_dict(16, depth=2, seed=7).items()}
    model = IPAdapterModel.from_state_dict(flat)
    embeds = torch.randn(3, 768, generator=torch.Generator().manual_seed(8))
    p = "ip_adapter_proj_model."
    x = (embeds @ flat[p + "proj.weight"].T + flat[p + "proj.bias"]).reshape(3, 16, 4096)
    expected = torch.nn.functional.layer_norm(x, (4096,), flat[p + "norm.weight"], flat[p + "norm.bias"], eps=1e-5)
    tokens = model.image_tokens(embeds)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    for i in range(2):
        kv = model.key_value(i)
        name = f"double_blocks.{i}.processor.ip_adapter_double_stream_v_proj."
        torch.testing.assert_close(kv.to_v_ip(tokens), tokens @ flat[name + "weight"].T + flat[name + "bias"],
                                   rtol=1e-5, atol=1e-5)
