"""The InstantX FLUX.1-dev IP-Adapter as modules, key for key with its file.

    image_proj.proj.0   Linear(1152 -> 2304)        on SigLIP so400m/384's pooler_output
                GELU (exact, torch's default)
    image_proj.proj.2   Linear(2304 -> 128 * 4096)  cut into 128 tokens of 4096
    image_proj.norm     LayerNorm(4096)
    ip_adapter.{i}.to_k_ip / to_v_ip   [3072, 4096], no bias: one pair per Flux block, the 19 double
                blocks first, then the 38 single ones (the processor's RMSNorm on the keys has no weights)

The projection runs in the dtype and on the device asked for (weights cast per call, never stored twice).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..ip_adapter_core.layout import AdapterSpec, detect, split_state_dict
from .state_dicts import assign_weights, checked_flat


class PooledMLPProjection(nn.Module):
    """`image_proj`: pooled embedding [B, 1152] -> [B, tokens, 4096]."""

    def __init__(self, embed_dim: int, inner_dim: int, context_dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Sequential(nn.Linear(embed_dim, inner_dim), nn.GELU(),
                                  nn.Linear(inner_dim, tokens * context_dim))
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.norm(rearrange(self.proj(pooled), "b (t c) -> b t c", t=self.tokens))


class _KeyValue(nn.Module):
    def __init__(self, hidden: int, context_dim: int):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, hidden, bias=False)
        self.to_v_ip = nn.Linear(context_dim, hidden, bias=False)


class FluxInstantXAdapterModel(nn.Module):
    """`image_proj` and `ip_adapter` mirror the two halves of the weight file."""

    def __init__(self, spec: AdapterSpec, parts: dict[str, dict[str, torch.Tensor]]):
        super().__init__()
        self.spec = spec
        self.lora: dict[str, torch.Tensor] = {}  # none; the seam's LoRA hook reads it
        inner = parts["image_proj"]["proj.0.weight"].shape[0]
        self.image_proj = PooledMLPProjection(spec.embed_dim, inner, spec.context_dim, spec.tokens)
        hidden = parts["ip_adapter"]["0.to_k_ip.weight"].shape[0]
        self.ip_adapter = nn.ModuleDict({str(i): _KeyValue(hidden, spec.context_dim) for i in range(spec.depth)})

    @classmethod
    def from_parts(cls, spec: AdapterSpec, parts: dict[str, dict[str, torch.Tensor]]) -> FluxInstantXAdapterModel:
        with torch.device("meta"):
            model = cls(spec, parts)
        flat = checked_flat(parts)
        return assign_weights(model, flat, spec)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> FluxInstantXAdapterModel:
        parts = state_dict if "image_proj" in state_dict else split_state_dict(state_dict)
        return cls.from_parts(detect(parts), parts)

    def key_value(self, layer_index: int) -> _KeyValue:
        return self.ip_adapter[str(layer_index)]

    def lora_patches(self) -> dict:
        return {}

    @torch.no_grad()
    def image_tokens(self, encoding: torch.Tensor, dtype: torch.dtype | None = None,
                     device: torch.device | None = None) -> torch.Tensor:
        """SigLIP pooled embeddings [B, 1152] -> image tokens [B, 128, 4096] in dtype on device."""
        if encoding.ndim != 2:
            raise ValueError(f"the InstantX FLUX.1 adapter projects pooled embeddings [B, {self.spec.embed_dim}]; got "
                             f"{list(encoding.shape)}")
        weight = self.image_proj.proj[0].weight
        dtype, device = dtype or weight.dtype, device or weight.device
        x = encoding.to(device, dtype)
        p0, p2, norm = self.image_proj.proj[0], self.image_proj.proj[2], self.image_proj.norm
        x = F.linear(F.gelu(F.linear(x, p0.weight.to(x), p0.bias.to(x))), p2.weight.to(x), p2.bias.to(x))
        x = rearrange(x, "b (t c) -> b t c", t=self.image_proj.tokens)
        return F.layer_norm(x, norm.normalized_shape, norm.weight.to(x), norm.bias.to(x), norm.eps)
