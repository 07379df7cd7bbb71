"""The projection models that turn a CLIP image encoding into image tokens.

Attribute names follow the published weight files, so `load_state_dict` takes their
`image_proj.*` tensors as they are, strictly.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn


class LinearProjection(nn.Module):
    """Base / light / vit-G / SDXL: one linear layer cut into `tokens` tokens, then LayerNorm."""

    def __init__(self, embed_dim: int, context_dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(embed_dim, tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        # [B, embed_dim] -> [B, tokens, context_dim]
        x = self.proj(image_embeds)
        return self.norm(rearrange(x, "b (t c) -> b t c", t=self.tokens))


class MLPProjection(nn.Module):
    """Full-face: a two-layer MLP applied to every penultimate hidden state (257 tokens)."""

    def __init__(self, embed_dim: int, context_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(embed_dim, embed_dim),
            nn.GELU(),
            nn.Linear(embed_dim, context_dim),
            nn.LayerNorm(context_dim),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # [B, 257, embed_dim] -> [B, 257, context_dim]
        return self.proj(hidden_states)


class PerceiverAttention(nn.Module):
    """Learned latents attend to [image features; latents] (Flamingo's perceiver resampler)."""

    def __init__(self, dim: int, heads: int, dim_head: int = 64):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(dim)  # image features
        self.norm2 = nn.LayerNorm(dim)  # latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features, latents = self.norm1(features), self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((features, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        # The reference splits 1/sqrt(d) between q and k (more stable in half precision).
        scale = 1 / math.sqrt(math.sqrt(q.shape[-1]))
        weights = ((q * scale) @ (k * scale).transpose(-2, -1)).float().softmax(dim=-1).to(q.dtype)
        out = rearrange(weights @ v, "b h n d -> b n (h d)")
        return self.to_out(out)


def _feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    # Indices 0, 1, 3 carry weights in the files: LayerNorm, Linear, (GELU), Linear.
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class PerceiverResampler(nn.Module):
    """Given latents read projected features through `depth` attention + feed-forward layers.

    The stack shared by plus adapters (learned latents, `Resampler`) and FaceID Plus (latents
    made from the face embedding, models/faceid_proj.py). Keys: proj_in, proj_out, norm_out,
    layers.{i}.0 (attention), layers.{i}.1 (feed-forward).
    """

    def __init__(self, dim: int, depth: int, heads: int, embed_dim: int, context_dim: int):
        super().__init__()
        self.proj_in = nn.Linear(embed_dim, dim)
        self.proj_out = nn.Linear(dim, context_dim)
        self.norm_out = nn.LayerNorm(context_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads), _feed_forward(dim)]) for _ in range(depth)
        )

    def forward(self, hidden_states: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # hidden_states [B, S, embed_dim], latents [B, T, dim] -> [B, T, context_dim]
        features = self.proj_in(hidden_states)
        for attention, feed_forward in self.layers:
            latents = attention(features, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


class Resampler(PerceiverResampler):
    """Plus / plus-face: `tokens` learned queries read the penultimate hidden states."""

    def __init__(self, dim: int, depth: int, heads: int, tokens: int, embed_dim: int, context_dim: int):
        super().__init__(dim, depth, heads, embed_dim, context_dim)
        self.latents = nn.Parameter(torch.randn(1, tokens, dim) / dim**0.5)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # [B, 257, embed_dim] -> [B, tokens, context_dim]
        latents = self.latents.repeat(hidden_states.shape[0], 1, 1)
        return super().forward(hidden_states, latents)
