"""The learned half of an IP-Adapter: a projection model and one to_k_ip/to_v_ip pair per layer."""

from __future__ import annotations

import torch
from torch import nn

from ..ip_adapter_core.layout import AdapterFormatError, AdapterSpec, detect, ip_key, split_state_dict
from .image_proj import LinearProjection, MLPProjection, Resampler


class IPKeyValue(nn.Module):
    """The image key/value projections added to one cross-attention layer (no bias)."""

    def __init__(self, hidden_dim: int, context_dim: int):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, hidden_dim, bias=False)
        self.to_v_ip = nn.Linear(context_dim, hidden_dim, bias=False)


def build_projection(spec: AdapterSpec, proj_sd: dict[str, torch.Tensor]) -> nn.Module:
    if spec.projection == "linear":
        return LinearProjection(spec.embed_dim, spec.context_dim, spec.tokens)
    if spec.projection == "mlp":
        return MLPProjection(spec.embed_dim, spec.context_dim)
    dim = proj_sd["latents"].shape[-1]
    return Resampler(dim, spec.resampler_depth, spec.resampler_heads, spec.tokens, spec.embed_dim, spec.context_dim)


class IPAdapterModel(nn.Module):
    """`image_proj` and `ip_adapter` mirror the two halves of the weight file, key for key."""

    def __init__(self, spec: AdapterSpec, parts: dict[str, dict[str, torch.Tensor]]):
        super().__init__()
        self.spec = spec
        self.image_proj = build_projection(spec, parts["image_proj"])
        self.ip_adapter = nn.ModuleDict({
            ip_key(i): IPKeyValue(parts["ip_adapter"][f"{ip_key(i)}.to_k_ip.weight"].shape[0], spec.context_dim)
            for i in range(len(spec.layers))
        })

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> IPAdapterModel:
        """Build from a flat (`image_proj.` / `ip_adapter.` prefixed) or nested state dict."""
        parts = state_dict if "image_proj" in state_dict else split_state_dict(state_dict)
        spec = detect(parts)
        with torch.device("meta"):
            model = cls(spec, parts)
        flat = {f"{head}.{k}": v for head, sd in parts.items() for k, v in sd.items()}
        for name, tensor in flat.items():
            if not tensor.is_floating_point():
                raise AdapterFormatError(f"{name} holds {tensor.dtype} values; adapter weights are floating point "
                                         "(fp32, fp16 or bf16): the file is damaged or not an IP-Adapter")
            if not torch.isfinite(tensor).all():
                raise AdapterFormatError(f"{name} holds NaN or infinite values: the file is damaged")
        try:
            model.load_state_dict(flat, strict=True, assign=True)
        except RuntimeError as e:
            raise AdapterFormatError(f"weights do not fit a {spec.describe()}: {e}") from e
        return model.eval().requires_grad_(False)

    def key_value(self, layer_index: int) -> IPKeyValue:
        return self.ip_adapter[ip_key(layer_index)]

    @torch.no_grad()
    def image_tokens(self, encoding: torch.Tensor) -> torch.Tensor:
        """Project image_embeds [B, D] or hidden states [B, 257, D] to tokens [B, T, context_dim]."""
        weight = next(self.image_proj.parameters())
        return self.image_proj(encoding.to(weight.device, weight.dtype))
