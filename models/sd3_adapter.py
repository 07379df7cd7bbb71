"""The InstantX SD3.5-Large IP-Adapter as modules, key for key with its file.

`image_proj` is a time-conditioned resampler (diffusers' IPAdapterTimeImageProjection semantics):

    temb    = time_embedding(sinusoid(t))                                     [B, hidden]
    x       = proj_in(SigLIP states) + temb                                   [B, L, hidden]
    latents = learned queries, through `depth` blocks, each adaLN-modulated by temb:
              attention of LN(latents) over [LN(x); LN(latents)], then a GELU feed-forward
    tokens  = norm_out(proj_out(latents))                                     [B, 64, width]

and returns (tokens, temb). The file keeps InstantX's own names (`layers.{i}.0.{norm1, norm2, to_q,
to_kv, to_out}`, `layers.{i}.1.{0 LayerNorm, 1, 3}` the feed-forward, `layers.{i}.2.1` the adaLN
projection); files with diffusers' converted names (`ln0`, `attn.to_q`, `ff.net.0.proj`, ...) are
renamed back on load. `ip_adapter.{i}` holds one joint block's weights: `norm_ip.linear` (AdaLayerNorm
on temb, no affine of its own), `to_k_ip` / `to_v_ip` (no bias) and the RMSNorm scales `norm_q`,
`norm_k`, `norm_ip_k` (one head wide).

Weights are used in the dtype and on the device of the tensors they meet (cast per call, never
stored twice): ComfyUI loads and offloads the one stored copy; a model computing in another dtype
gets casts, not copies kept alive.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..ip_adapter_core.layout import AdapterSpec, detect, split_state_dict
from ..ip_adapter_core.sd3 import RMS_EPS, rms_norm, timestep_sinusoid
from .state_dicts import assign_weights, checked_flat

RESAMPLER_HEAD_DIM = 64
LAYER_NORM_EPS = 1e-5  # the resampler's LayerNorms (torch's default)


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.to(x)
    return F.linear(x, layer.weight.to(x), bias)


def _layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight.to(x), norm.bias.to(x), norm.eps)


class _ResamplerAttention(nn.Module):
    """`layers.{i}.0`: the latents attend over [image features; latents] (keys and values fused)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)  # on the image features
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)  # on the latents (then adaLN-modulated)
        inner = heads * RESAMPLER_HEAD_DIM
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)


class TimeResamplerBlock(nn.ModuleList):
    """`layers.{i}`: [0] attention, [1] feed-forward (LayerNorm, Linear, GELU, Linear), [2] adaLN (SiLU, Linear)."""

    def __init__(self, dim: int, heads: int, ffn_ratio: int = 4):
        super().__init__([
            _ResamplerAttention(dim, heads),
            nn.Sequential(nn.LayerNorm(dim, eps=LAYER_NORM_EPS), nn.Linear(dim, dim * ffn_ratio, bias=False), nn.GELU(),
                          nn.Linear(dim * ffn_ratio, dim, bias=False)),
            nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim)),
        ])

    def forward(self, x: torch.Tensor, latents: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        attn, ff, adaln = self[0], self[1], self[2]
        shift_msa, scale_msa, shift_mlp, scale_mlp = (
            m[:, None] for m in _linear(F.silu(temb), adaln[1]).chunk(4, dim=-1))
        residual = latents
        x = _layer_norm(x, attn.norm1)
        latents = _layer_norm(latents, attn.norm2) * (1 + scale_msa) + shift_msa
        q = _linear(latents, attn.to_q)
        k, v = _linear(torch.cat([x, latents], dim=1), attn.to_kv).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=attn.heads) for t in (q, k, v))
        # Scaled on both sides by d^-1/4 (the reference's way; same product as d^-1/2 on one side),
        # softmax in fp32.
        scale = RESAMPLER_HEAD_DIM ** -0.25
        weights = torch.softmax(((q * scale) @ (k * scale).transpose(-2, -1)).float(), dim=-1).to(q.dtype)
        out = rearrange(weights @ v, "b h n d -> b n (h d)")
        latents = _linear(out, attn.to_out) + residual
        hidden = _layer_norm(latents, ff[0]) * (1 + scale_mlp) + shift_mlp
        return _linear(F.gelu(_linear(hidden, ff[1])), ff[3]) + latents


class _TimeEmbedding(nn.Module):
    """`time_embedding`: Linear, SiLU, Linear on the timestep sinusoid."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)


class TimeResampler(nn.Module):
    """`image_proj`: SigLIP hidden states + timestep -> (image tokens, time embedding)."""

    def __init__(self, embed_dim: int, dim: int, width: int, depth: int, heads: int, tokens: int, time_dim: int):
        super().__init__()
        self.time_dim = time_dim
        self.latents = nn.Parameter(torch.empty(1, tokens, dim))
        self.proj_in = nn.Linear(embed_dim, dim)
        self.proj_out = nn.Linear(dim, width)
        self.norm_out = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.layers = nn.ModuleList([TimeResamplerBlock(dim, heads) for _ in range(depth)])
        self.time_embedding = _TimeEmbedding(time_dim, dim)

    def forward(self, states: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states [B, L, embed_dim], timesteps [B] -> (tokens [B, T, width], temb [B, dim]), in states' dtype."""
        te = self.time_embedding
        temb = timestep_sinusoid(timesteps, self.time_dim).to(states)
        temb = _linear(F.silu(_linear(temb, te.linear_1)), te.linear_2)
        x = _linear(states, self.proj_in) + temb[:, None]
        latents = self.latents.to(states).expand(states.shape[0], -1, -1)
        for block in self.layers:
            latents = block(x, latents, temb)
        return _layer_norm(_linear(latents, self.proj_out), self.norm_out), temb


class _AdaNorm(nn.Module):
    """`norm_ip`: LayerNorm without affine, then (1 + scale) and shift from the time embedding."""

    def __init__(self, time_dim: int, width: int):
        super().__init__()
        self.linear = nn.Linear(time_dim, 2 * width)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = _linear(F.silu(temb), self.linear).chunk(2, dim=-1)  # shift first (as the reference)
        return F.layer_norm(x, x.shape[-1:], eps=RMS_EPS) * (1 + scale[:, None]) + shift[:, None]


class _RMSScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, RMS_EPS)


class SD3BlockAdapter(nn.Module):
    """`ip_adapter.{i}`: one joint block's image keys/values and the processor's own norms."""

    def __init__(self, width: int, head_dim: int, time_dim: int):
        super().__init__()
        self.norm_ip = _AdaNorm(time_dim, width)
        self.to_k_ip = nn.Linear(width, width, bias=False)
        self.to_v_ip = nn.Linear(width, width, bias=False)
        self.norm_q = _RMSScale(head_dim)
        self.norm_k = _RMSScale(head_dim)
        self.norm_ip_k = _RMSScale(head_dim)

    def image_keys_values(self, tokens: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ip = self.norm_ip(tokens, temb.to(tokens))
        return _linear(ip, self.to_k_ip), _linear(ip, self.to_v_ip)


# diffusers' converted resampler names -> InstantX's (the inverse of diffusers' SD3 loader's renaming).
_DIFFUSERS_NAMES = (
    (r"layers\.(\d+)\.ln0\.", r"layers.\1.0.norm1."),
    (r"layers\.(\d+)\.ln1\.", r"layers.\1.0.norm2."),
    (r"layers\.(\d+)\.attn\.to_q\.", r"layers.\1.0.to_q."),
    (r"layers\.(\d+)\.attn\.to_kv\.", r"layers.\1.0.to_kv."),
    (r"layers\.(\d+)\.attn\.to_out\.0\.", r"layers.\1.0.to_out."),
    (r"layers\.(\d+)\.adaln_norm\.", r"layers.\1.1.0."),
    (r"layers\.(\d+)\.ff\.net\.0\.proj\.", r"layers.\1.1.1."),
    (r"layers\.(\d+)\.ff\.net\.2\.", r"layers.\1.1.3."),
    (r"layers\.(\d+)\.adaln_proj\.", r"layers.\1.2.1."),
)


def instantx_names(image_proj: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The resampler's keys in InstantX's naming, whichever of the two namings the file uses."""
    out = {}
    for key, value in image_proj.items():
        for pattern, replacement in _DIFFUSERS_NAMES:
            key = re.sub("^" + pattern, replacement, key)
        out[key] = value
    return out


class SD3IPAdapterModel(nn.Module):
    """`image_proj` (TimeResampler) and `ip_adapter` (one SD3BlockAdapter per joint block)."""

    def __init__(self, spec: AdapterSpec, parts: dict[str, dict[str, torch.Tensor]]):
        super().__init__()
        proj = parts["image_proj"]
        self.spec = spec
        dim, time_dim = proj["proj_in.weight"].shape[0], proj["time_embedding.linear_1.weight"].shape[1]
        self.image_proj = TimeResampler(spec.embed_dim, dim, spec.context_dim, spec.resampler_depth,
                                        spec.resampler_heads, spec.tokens, time_dim)
        head_dim = parts["ip_adapter"]["0.norm_q.weight"].shape[0]
        self.ip_adapter = nn.ModuleDict({str(i): SD3BlockAdapter(spec.context_dim, head_dim, dim)
                                         for i in range(len(spec.layers))})

    @classmethod
    def from_parts(cls, spec: AdapterSpec, parts: dict[str, dict[str, torch.Tensor]]) -> SD3IPAdapterModel:
        parts = {"image_proj": instantx_names(parts["image_proj"]), "ip_adapter": parts["ip_adapter"]}
        with torch.device("meta"):
            model = cls(spec, parts)
        flat = checked_flat(parts)
        return assign_weights(model, flat, spec)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> SD3IPAdapterModel:
        """Build from a flat (`image_proj.` / `ip_adapter.` prefixed) or nested state dict."""
        parts = state_dict if "image_proj" in state_dict else split_state_dict(state_dict)
        parts = {"image_proj": instantx_names(parts["image_proj"]), "ip_adapter": parts["ip_adapter"]}
        return cls.from_parts(detect(parts), parts)

    @torch.no_grad()
    def resample(self, states: torch.Tensor, timesteps: torch.Tensor, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """SigLIP states [B, L, 1152] at timesteps [B] -> (tokens [B, 64, width], temb [B, dim]) in dtype on device."""
        return self.image_proj(states.to(device, dtype), timesteps.to(device))

    def block(self, index: int) -> SD3BlockAdapter:
        return self.ip_adapter[str(index)]
