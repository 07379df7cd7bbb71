"""Stage 2, encode (continued): combining encodings, and keeping them in files."""

from __future__ import annotations

import os

from ..ip_adapter_core.embeds import COMBINE_NODE_MODES, ImageEmbeds, combine_embeds, merge
from ..models.files import load_embeds, save_embeds
from . import comfy_seam as seam
from .widgets import CATEGORY, EMBEDS


class IPAdapterCombineEmbeds:
    DESCRIPTION = ("Merges encodings: concat keeps every reference (Apply attends to all their tokens); add, "
                   "subtract (first minus the rest), average, norm average, max and min fold them into one.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IP_ADAPTER_EMBEDS",)
    RETURN_NAMES = ("image_embeds",)
    OUTPUT_TOOLTIPS = ("The combined encodings, for Apply IP-Adapter.",)
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"embeds_1": EMBEDS, "method": (list(COMBINE_NODE_MODES), {
                "default": "concat",
                "tooltip": "concat keeps every reference's tokens; add, subtract (first minus the rest), "
                           "average, norm average, and max / min (element-wise, as IPAdapter plus's Combine "
                           "Embeds) merge them into one. A negative shared by all references stays as it is; "
                           "separate negatives are merged the same way."})},
            "optional": {"embeds_2": EMBEDS, "embeds_3": EMBEDS, "embeds_4": EMBEDS},
        }

    def combine(self, embeds_1: ImageEmbeds, method: str, embeds_2=None, embeds_3=None, embeds_4=None):
        merged = merge(embeds_1, *[e for e in (embeds_2, embeds_3, embeds_4) if e is not None])
        return (combine_embeds(merged, method),)


class IPAdapterSaveEmbeds:
    DESCRIPTION = "Saves encodings as .safetensors in output/ipadapter_embeds (never pickle)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image_embeds": ("IP_ADAPTER_EMBEDS", {"tooltip": "Encodings to keep."}),
            "filename_prefix": ("STRING", {"default": "embeds", "tooltip": "File name prefix; a counter is added."}),
        }}

    def save(self, image_embeds: ImageEmbeds, filename_prefix: str):
        path = seam.numbered_output_path(seam.embeds_output_folder(), filename_prefix, ".safetensors")
        save_embeds(path, image_embeds, source="ComfyUI-IPAdapter-Exact")
        return {"ui": {"text": [os.path.basename(path)]}}


class IPAdapterLoadEmbeds:
    DESCRIPTION = "Loads encodings saved by Save IP-Adapter Embeds (from output/ or models/ipadapter_embeds)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IP_ADAPTER_EMBEDS",)
    RETURN_NAMES = ("image_embeds",)
    OUTPUT_TOOLTIPS = ("The saved encodings, as IP-Adapter Encode Image gives them.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"embeds_file": (seam.list_files(seam.EMBEDS_FOLDER),
                                             {"tooltip": "A saved embeddings file."})}}

    @classmethod
    def IS_CHANGED(cls, embeds_file: str) -> str:
        return seam.file_stamp(seam.EMBEDS_FOLDER, embeds_file)

    def load(self, embeds_file: str):
        return (load_embeds(seam.full_path(seam.EMBEDS_FOLDER, embeds_file)),)
