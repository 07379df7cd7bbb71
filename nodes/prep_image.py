"""Stage 2, encode (helpers): IPAdapter plus's picture preparation for CLIP vision."""

from __future__ import annotations

import torch

from ..ip_adapter_core.image_ops import CROP_POSITIONS, INTERPOLATIONS, prep_for_clip_vision
from ..ip_adapter_core.images import check_image
from .widgets import CATEGORY


class IPAdapterPrepImage:
    DESCRIPTION = ("Prepares a reference for CLIP vision as IPAdapter plus's Prep Image For ClipVision does: a "
                   "square crop at a chosen position (or black padding), a resize to 224 x 224 with a PIL filter, "
                   "and optional contrast-adaptive sharpening. Works in float (no 8-bit round trip: that pack "
                   "truncates to 8 bits before PIL, which moves pixels by up to 1/255).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The prepared 224 x 224 image(s), for IP-Adapter Encode Image.",)
    FUNCTION = "prep"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The reference image(s)."}),
            "interpolation": (list(INTERPOLATIONS), {
                "default": "LANCZOS",
                "tooltip": "PIL's resampling filter for the resize to 224 (antialiased when shrinking; NEAREST "
                           "picks one pixel). Computed in float with PIL's kernels."}),
            "crop_position": (list(CROP_POSITIONS), {
                "default": "top",
                "tooltip": "Which square is kept: anchored at the top/bottom (centred left-right), left/right "
                           "(centred top-bottom) or the centre; 'pad' keeps everything and pads the short side "
                           "with black."}),
            "sharpening": ("FLOAT", {
                "default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05,
                "tooltip": "Contrast-adaptive sharpening (AMD CAS) after the resize; 0 = none. The outermost "
                           "pixel ring is left as it is, as in IPAdapter plus."}),
        }}

    def prep(self, image: torch.Tensor, interpolation: str, crop_position: str,
             sharpening: float) -> tuple[torch.Tensor]:
        return (prep_for_clip_vision(check_image(image), interpolation, crop_position, sharpening),)
