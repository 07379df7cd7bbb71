"""Preparing reference images for the CLIP encoder: crop position, padding, tiles.

Images are ComfyUI IMAGE tensors: [B, H, W, C] floats in [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CROP_MODES = ("center", "top", "bottom", "left", "right", "pad", "squash")
MAX_TILES = 16  # per image: each tile is one CLIP encode and adds its tokens


def check_image(image: torch.Tensor) -> torch.Tensor:
    """Validate an IMAGE and return it as RGB [B, H, W, 3] in [0, 1]."""
    if image.ndim != 4 or image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"image has shape {list(image.shape)}; expected a non-empty [batch, height, width, channels]")
    channels = image.shape[-1]
    if channels == 1:
        image = image.expand(-1, -1, -1, 3)
    elif channels == 4:
        image = image[..., :3]
    elif channels != 3:
        raise ValueError(f"image has {channels} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA)")
    if not torch.isfinite(image).all():
        raise ValueError("image holds NaN or infinite values")
    return image.float().clamp(0.0, 1.0)


def square(image: torch.Tensor, mode: str) -> torch.Tensor:
    """Make [B, H, W, C] square by cropping at `mode`'s position or padding; squash leaves it."""
    _, h, w, _ = image.shape
    if mode == "squash" or h == w:
        return image
    side = min(h, w)
    if mode == "pad":
        big = max(h, w)
        top, left = (big - h) // 2, (big - w) // 2
        # Pad with mid grey: the colour closest to CLIP's normalisation mean, least informative.
        return F.pad(image.movedim(-1, 1), (left, big - w - left, top, big - h - top), value=0.5).movedim(1, -1)
    offsets = {
        "center": ((h - side) // 2, (w - side) // 2),
        "top": (0, (w - side) // 2),
        "bottom": (h - side, (w - side) // 2),
        "left": ((h - side) // 2, 0),
        "right": ((h - side) // 2, w - side),
    }
    if mode not in offsets:
        raise ValueError(f"unknown crop mode {mode!r}; expected one of {', '.join(CROP_MODES)}")
    y, x = offsets[mode]
    return image[:, y : y + side, x : x + side, :]


def tiles(image: torch.Tensor) -> torch.Tensor:
    """Cut each image of [B, H, W, C] into square tiles along its long side: [B * n, s, s, C].

    The short side is the tile side; tiles overlap evenly so the whole image is covered.
    """
    _, h, w, _ = image.shape
    side = min(h, w)
    count = max(1, math.ceil(max(h, w) / side))
    if count > MAX_TILES:
        raise ValueError(f"a {w}x{h} image would make {count} tiles (at most {MAX_TILES}): crop or pad it instead, "
                         "or cut it to an aspect ratio of at most 1:16")
    starts = [round(i * (max(h, w) - side) / max(count - 1, 1)) for i in range(count)]
    out = [image[:, s : s + side, :, :] if h > w else image[:, :, s : s + side, :] for s in starts]
    return torch.stack(out, dim=1).flatten(0, 1)
