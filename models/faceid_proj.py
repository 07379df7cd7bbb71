"""Projection models of the FaceID adapters: an ArcFace face embedding (512) into image tokens.

Attribute names follow the published weight files, so `load_state_dict` takes their
`image_proj.*` tensors as they are, strictly:

* FaceID, FaceID Portrait: `proj.0` [1024, 512], GELU, `proj.2` [tokens*context, 1024], then
  `norm` (LayerNorm over each token): 4 tokens (FaceID) or 16 (Portrait) per face.
* FaceID Plus (v1 and v2, one layout): the same MLP and norm make 4 tokens that are the
  latents of a perceiver stack (`perceiver_resampler.*`, no learned latents) reading the CLIP
  penultimate hidden states of the aligned face crop. v2 adds `tokens + s_scale * stack(...)`
  (the "shortcut"); nothing in the file says which one it was trained as.
* FaceID Portrait "unnorm": a plain plus-style Resampler (learned `latents`) whose input is the
  raw (not normalised) ArcFace embedding as a one-token sequence.

Several faces are projected independently ([N, 512] -> [N, T, C]); attending to all of them
at once is concatenating their tokens, as the reference's multi-face portrait does.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .image_proj import PerceiverResampler, Resampler


def _id_mlp(face_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    # Indices 0 and 2 carry weights in the files: Linear, (GELU), Linear.
    return nn.Sequential(nn.Linear(face_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


class FaceIDProjection(nn.Module):
    """FaceID / FaceID Portrait: MLP of the face embedding, cut into `tokens` tokens, LayerNorm."""

    def __init__(self, face_dim: int, hidden_dim: int, context_dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.proj = _id_mlp(face_dim, hidden_dim, tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, face_embeds: torch.Tensor) -> torch.Tensor:
        # [N, face_dim] -> [N, tokens, context_dim]
        return self.norm(rearrange(self.proj(face_embeds), "n (t c) -> n t c", t=self.tokens))


class FaceIDPlusProjection(nn.Module):
    """FaceID Plus / Plus v2: face tokens refined by a perceiver over the face crop's CLIP states."""

    def __init__(self, face_dim: int, hidden_dim: int, dim: int, tokens: int, depth: int, heads: int,
                 crop_dim: int, context_dim: int):
        super().__init__()
        self.tokens = tokens
        self.proj = _id_mlp(face_dim, hidden_dim, tokens * dim)
        self.norm = nn.LayerNorm(dim)
        self.perceiver_resampler = PerceiverResampler(dim, depth, heads, crop_dim, context_dim)

    def forward(self, face_embeds: torch.Tensor, crop_states: torch.Tensor, shortcut: bool,
                s_scale: float = 1.0) -> torch.Tensor:
        """face_embeds [N, face_dim], crop_states [N, S, crop_dim] (one crop per face) -> [N, tokens, C].

        shortcut: v2's `face_tokens + s_scale * perceiver(...)`; without it s_scale is unused.
        """
        if crop_states.shape[0] != face_embeds.shape[0]:
            raise ValueError(
                f"{face_embeds.shape[0]} face embeddings but {crop_states.shape[0]} face crops: "
                "FaceID Plus takes one aligned crop per face"
            )
        face_tokens = self.norm(rearrange(self.proj(face_embeds), "n (t c) -> n t c", t=self.tokens))
        out = self.perceiver_resampler(crop_states, face_tokens)
        if shortcut:
            out = face_tokens + s_scale * out
        return out


class FaceIDPortraitResampler(Resampler):
    """FaceID Portrait "unnorm": a Resampler whose input sequence is one raw ArcFace embedding."""

    def forward(self, face_embeds: torch.Tensor) -> torch.Tensor:
        # [N, face_dim] (or [N, 1, face_dim]) -> [N, tokens, context_dim]
        if face_embeds.ndim == 2:
            face_embeds = face_embeds[:, None]
        return super().forward(face_embeds)
