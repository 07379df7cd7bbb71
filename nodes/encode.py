"""Stage 2, encode: reference images to CLIP encodings, with their negative; a noise image."""

from __future__ import annotations

import torch

from ..ip_adapter_core.embeds import ImageEmbeds
from ..ip_adapter_core.images import CROP_MODES, check_image, square, tiles
from ..ip_adapter_core.layout import AdapterSpec, encoder_name
from . import comfy_seam as seam
from .widgets import CATEGORY, CLIP_VISION

NEGATIVE_MODES = ("reference (zero)", "black image")
CROP_CHOICES = CROP_MODES + ("tiles",)

TOOLTIPS = {
    "crop": "How a non-square image becomes square for CLIP: crop at a position, pad with grey, squash, or "
            "'tiles' (square tiles along the long side, all used as references).",
    "negative": "Unconditional image: 'reference (zero)' as the original implementation (zero embedding for "
                "base, zero pixels for plus/full-face); 'black image' encodes a black picture instead.",
}


def check_encoder(clip_vision, spec: AdapterSpec) -> None:
    width = seam.clip_vision_widths(clip_vision)[spec.encoder_output]
    if width != spec.embed_dim:
        raise ValueError(
            f"this adapter expects {spec.encoder} {spec.encoder_output} of {spec.embed_dim}, the CLIP vision "
            f"model gives {width} ({encoder_name(width, spec.encoder_output)}): load the {spec.encoder} "
            f"CLIP vision model for this adapter"
        )


def encode(clip_vision, image: torch.Tensor, spec: AdapterSpec, crop: str = "center") -> torch.Tensor:
    """[B, H, W, C] images -> [B, D] or [B, 257, D], the encoder output the adapter uses."""
    check_encoder(clip_vision, spec)
    image = check_image(image)
    image = tiles(image) if crop == "tiles" else square(image, crop)
    return seam.clip_encode(clip_vision, image, spec.encoder_output, center_crop=crop != "squash")


def unconditional(clip_vision, spec: AdapterSpec, negative: str) -> torch.Tensor:
    """The negative encoding: the reference convention, or a black image when asked.

    Reference: base adapters project a zero image_embeds; plus and full-face encode an all-zero
    pixel tensor *after* normalisation (the CLIP mean colour).
    """
    if negative == "black image":
        return encode(clip_vision, torch.zeros(1, 224, 224, 3), spec)
    if not spec.uses_hidden_states:
        return torch.zeros(1, spec.embed_dim)
    return seam.clip_encode_zero_pixels(clip_vision)


def encode_embeds(clip_vision, image: torch.Tensor, spec: AdapterSpec, crop: str, negative: str,
                  negative_image: torch.Tensor | None = None) -> ImageEmbeds:
    cond = encode(clip_vision, image, spec, crop)
    if negative_image is not None:
        uncond = encode(clip_vision, negative_image, spec, crop)
        if uncond.shape[0] not in (1, cond.shape[0]):
            raise ValueError(
                f"{uncond.shape[0]} negative images for {cond.shape[0]} references; give 1 or {cond.shape[0]}")
    else:
        uncond = unconditional(clip_vision, spec, negative)
    return ImageEmbeds(cond, uncond, spec.encoder_output)


class EncodeIPAdapterImage:
    DESCRIPTION = ("Encodes reference images with the CLIP vision model the adapter needs. A batch of images "
                   "gives several references. Uses ComfyUI's own CLIP preprocessing (224 px).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IP_ADAPTER_EMBEDS",)
    RETURN_NAMES = ("image_embeds",)
    OUTPUT_TOOLTIPS = ("Encodings of the references and of the negative image.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ipadapter": ("IP_ADAPTER", {"tooltip": "The adapter: decides which encoder output is used."}),
                "clip_vision": CLIP_VISION,
                "image": ("IMAGE", {"tooltip": "Reference image(s); each image of a batch is one reference."}),
                "crop": (list(CROP_CHOICES), {"default": "center", "tooltip": TOOLTIPS["crop"]}),
                "negative": (list(NEGATIVE_MODES), {"default": NEGATIVE_MODES[0], "tooltip": TOOLTIPS["negative"]}),
            },
            "optional": {
                "negative_image": ("IMAGE", {
                    "tooltip": "An explicit negative image (e.g. noise); overrides 'negative'."}),
            },
        }

    def encode(self, ipadapter: seam.LoadedAdapter, clip_vision, image, crop: str, negative: str,
               negative_image=None) -> tuple[ImageEmbeds]:
        return (encode_embeds(clip_vision, image, ipadapter.spec, crop, negative, negative_image),)


class IPAdapterNoiseImage:
    DESCRIPTION = "A noise image to use as the negative image of IP-Adapter Encode Image (less 'default' look)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("A 224 px noise image (or the given image with noise blended in).",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
                                       "tooltip": "0 gives the reference itself (or grey), 1 pure noise."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "control_after_generate": True,
                                  "tooltip": "Noise seed."}),
            },
            "optional": {"image": ("IMAGE", {"tooltip": "Blend the noise into this image instead of grey."})},
        }

    def make(self, strength: float, seed: int, image=None):
        base = torch.full((1, 224, 224, 3), 0.5) if image is None else image.float()
        noise = torch.rand(base.shape, generator=torch.Generator().manual_seed(seed))
        return ((base * (1 - strength) + noise * strength).clamp(0, 1),)
