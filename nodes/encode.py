"""IP-Adapter Encode Image: CLIP vision encodings of reference images, with their negative."""

from __future__ import annotations

from ..ip_adapter_core.embeds import ImageEmbeds
from ..ip_adapter_core.images import CROP_MODES
from .clip_encode import encode_embeds
from .host import LoadedAdapter
from .loader import CATEGORY

NEGATIVE_MODES = ("reference (zero)", "black image")
CROP_CHOICES = CROP_MODES + ("tiles",)

TOOLTIPS = {
    "crop": "How a non-square image becomes square for CLIP: crop at a position, pad with grey, squash, or "
            "'tiles' (square tiles along the long side, all used as references).",
    "negative": "Unconditional image: 'reference (zero)' as the original implementation (zero embedding for "
                "base, zero pixels for plus/full-face); 'black image' encodes a black picture instead.",
}


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
                "clip_vision": ("CLIP_VISION", {"tooltip": "The CLIP vision model the adapter was trained with."}),
                "image": ("IMAGE", {"tooltip": "Reference image(s); each image of a batch is one reference."}),
                "crop": (list(CROP_CHOICES), {"default": "center", "tooltip": TOOLTIPS["crop"]}),
                "negative": (list(NEGATIVE_MODES), {"default": NEGATIVE_MODES[0], "tooltip": TOOLTIPS["negative"]}),
            },
            "optional": {
                "negative_image": ("IMAGE", {
                    "tooltip": "An explicit negative image (e.g. noise); overrides 'negative'."}),
            },
        }

    def encode(self, ipadapter: LoadedAdapter, clip_vision, image, crop: str, negative: str,
               negative_image=None) -> tuple[ImageEmbeds]:
        return (encode_embeds(clip_vision, image, ipadapter.spec, crop, negative, negative_image),)
