"""Attention masks: where in the image an adapter acts, resized to each layer's token grid."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .batching import pad_batch


def token_grid(latent_hw: tuple[int, int], num_queries: int) -> tuple[int, int]:
    """The (h, w) grid of a layer whose `num_queries` tokens cover a latent of `latent_hw`.

    Each UNet level halves the latent (rounding up on odd sizes), so try 1, 2, 4, ... .
    """
    height, width = latent_hw
    for level in range(8):
        h, w = math.ceil(height / 2**level), math.ceil(width / 2**level)
        if h * w == num_queries:
            return h, w
    raise ValueError(f"{num_queries} queries do not tile a {height}x{width} latent at any UNet level")


def mask_for_queries(mask: torch.Tensor, latent_hw: tuple[int, int], num_queries: int, batch: int) -> torch.Tensor:
    """Resize a [1 or B, H, W] mask to [batch, num_queries] for one layer of a latent of `latent_hw`."""
    h, w = token_grid(latent_hw, num_queries)
    # Bicubic, unclamped, as diffusers' IPAdapterMaskProcessor resizes: the same mask gives the
    # same result in both implementations (the grid here comes from the latent, so any aspect works).
    resized = F.interpolate(mask[None].float(), size=(h, w), mode="bicubic")[0]
    return pad_batch(resized.flatten(1), batch, "attention masks")  # [batch, h*w]


def check_mask(mask: torch.Tensor) -> torch.Tensor:
    """Validate a MASK ([H, W] or [B, H, W], values in [0, 1]) and return it as [B, H, W]."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or mask.shape[-1] == 0 or mask.shape[-2] == 0 or mask.shape[0] == 0:
        raise ValueError(f"attention mask has shape {list(mask.shape)}; expected a non-empty [H, W] or [B, H, W]")
    if not torch.isfinite(mask).all():
        raise ValueError("attention mask holds NaN or infinite values")
    return mask.clamp(0.0, 1.0)
