"""IP-Adapter Encode Image (SigLIP pooled): the encoding the InstantX FLUX.1-dev IP-Adapter takes.

SigLIP so400m/384's pooled output comes from its attention-pooling head, which ComfyUI's CLIP vision
model does not keep, so this node reads the clip_vision file itself (through the seam, with transformers'
SiglipVisionModel) instead of taking a CLIP_VISION input. A file without the head is refused by name.
"""

from __future__ import annotations

import torch

from ..ip_adapter_core.embeds import ImageEmbeds
from ..ip_adapter_core.images import check_image, square, tiles
from ..ip_adapter_core.layout import SIGLIP_POOLED, SIGLIP_WIDTH
from .comfy_seam import flux_instantx as seam_instantx
from .encode import CROP_CHOICES, NEGATIVE_MODES
from .widgets import CATEGORY


def encode_pooled(name: str, image: torch.Tensor, crop: str) -> torch.Tensor:
    image = check_image(image)
    image = tiles(image) if crop == "tiles" else square(image, crop)
    return seam_instantx.siglip_pooled_encode(name, image, center_crop=crop != "squash")


class EncodeIPAdapterSigLIPPooled:
    DESCRIPTION = ("Encodes reference images into SigLIP so400m/384 pooled embeddings (1152), what the InstantX "
                   "FLUX.1-dev IP-Adapter takes. Reads a SigLIP so400m-patch14-384 file from models/clip_vision "
                   "that keeps its attention-pooling head (vision_model.head.*).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IP_ADAPTER_EMBEDS",)
    RETURN_NAMES = ("image_embeds",)
    OUTPUT_TOOLTIPS = ("SigLIP pooled encodings of the references and of the negative.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "siglip_name": (seam_instantx.siglip_files(), {
                    "tooltip": "SigLIP so400m-patch14-384 with its pooling head, in models/clip_vision."}),
                "image": ("IMAGE", {"tooltip": "Reference images; a batch gives several references."}),
                # SigLIP's own image processor squashes to 384 x 384 (no crop), as InstantX's pipeline feeds it.
                "crop": (list(CROP_CHOICES), {
                    "default": "squash",
                    "tooltip": "How a non-square image becomes square: 'squash' as SigLIP's own processor does, a "
                               "crop position, grey padding, or 'tiles' (square tiles, all used as references)."}),
                "negative": (list(NEGATIVE_MODES), {
                    "default": "reference (zero)",
                    "tooltip": "Unconditional input (only used with CFG > 1): a zero pooled embedding, or the "
                               "encoding of a black image."}),
            }
        }

    def encode(self, siglip_name: str, image: torch.Tensor, crop: str, negative: str):
        cond = encode_pooled(siglip_name, image, crop)
        if negative == "black image":
            uncond = encode_pooled(siglip_name, torch.zeros(1, 384, 384, 3), "squash")
        else:
            uncond = torch.zeros(1, SIGLIP_WIDTH)
        return (ImageEmbeds(cond, uncond, SIGLIP_POOLED),)
