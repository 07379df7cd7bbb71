"""Control nodes: layer weights, style + composition, combining, noise, saving and loading embeds."""

from __future__ import annotations

import os

import folder_paths
import torch

from ..ip_adapter_core.blocks import PRESETS, LayerWeights
from ..ip_adapter_core.embeds import COMBINE_MODES, ImageEmbeds, combine, merge
from ..models.files import load_embeds, save_embeds
from .apply import END, START, WEIGHT, WEIGHT_TYPE
from .apply_logic import apply_adapter
from .clip_encode import encode_embeds
from .loader import CATEGORY, file_stamp

EMBEDS_FOLDER = "ipadapter_embeds"

TABLE_TOOLTIP = ("Optional per-layer table refining the preset: 'default=0, output 1=1, input 8=0.5', 'input 7.3=0.2' "
                 "(one transformer), '#5=0' (adapter layer 5), or one number per adapter layer.")
DICT_TOOLTIP = ('Optional diffusers/InstantStyle block dictionary, e.g. {"up": {"block_0": [0, 1, 0]}}; blocks not '
                "named get 0, exactly as diffusers' set_ip_adapter_scale. Replaces preset and table.")


def register_embeds_folder() -> None:
    paths = [os.path.join(folder_paths.models_dir, EMBEDS_FOLDER),
             os.path.join(folder_paths.get_output_directory(), EMBEDS_FOLDER)]
    known, exts = folder_paths.folder_names_and_paths.get(EMBEDS_FOLDER, ([], set()))
    folder_paths.folder_names_and_paths[EMBEDS_FOLDER] = (known + [p for p in paths if p not in known],
                                                          set(exts) | {".safetensors"})


class IPAdapterLayerWeights:
    DESCRIPTION = ("Per-layer weights for Apply IP-Adapter: a preset (ease curves, weak/strong blocks, style "
                   "transfer = SDXL output 1 / SD1.5 output 4, composition = input 8), a free table, or a "
                   "diffusers block dictionary. Checked when the node runs, before sampling.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IP_ADAPTER_LAYER_WEIGHTS",)
    RETURN_NAMES = ("layer_weights",)
    OUTPUT_TOOLTIPS = ("Per-layer multipliers, for the layer_weights input of Apply IP-Adapter.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "preset": (list(PRESETS), {"default": "linear",
                                       "tooltip": "How the weight is spread over the UNet's layers."}),
            "table": ("STRING", {"default": "", "multiline": True, "tooltip": TABLE_TOOLTIP}),
            "block_dict": ("STRING", {"default": "", "multiline": True, "tooltip": DICT_TOOLTIP}),
        }}

    def build(self, preset: str, table: str, block_dict: str) -> tuple[LayerWeights]:
        return (LayerWeights.parse(preset, table, block_dict),)


class IPAdapterStyleComposition:
    DESCRIPTION = ("Two references at once: one steers style (deepest up-block attention), the other composition "
                   "(deepest down-block attention), each with its own weight. Made for SDXL; works on SD1.5.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with both image prompts attached.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to attach the image prompts to."}),
            "ipadapter": ("IP_ADAPTER", {"tooltip": "From Load IP-Adapter."}),
            "clip_vision": ("CLIP_VISION", {"tooltip": "The CLIP vision model the adapter was trained with."}),
            "image_style": ("IMAGE", {"tooltip": "Reference for colours, textures, brush work."}),
            "image_composition": ("IMAGE", {"tooltip": "Reference for layout and shapes."}),
            "weight_style": WEIGHT,
            "weight_composition": WEIGHT,
            "strong_style": ("BOOLEAN", {"default": False,
                                         "tooltip": "Use every attention of the deepest up level for style."}),
            "weight_type": WEIGHT_TYPE,
            "start_at": START,
            "end_at": END,
        }}

    def apply(self, model, ipadapter, clip_vision, image_style, image_composition, weight_style,
              weight_composition, strong_style, weight_type, start_at, end_at):
        layers = ipadapter.spec.layers
        style_preset = "strong style transfer" if strong_style else "style transfer"
        parts = ((image_style, style_preset, weight_style), (image_composition, "composition", weight_composition))
        for image, preset, weight in parts:
            embeds = encode_embeds(clip_vision, image, ipadapter.spec, "center", "reference (zero)")
            model = apply_adapter(model, ipadapter, embeds, weight, weight_type, start_at, end_at,
                                  layer_weights=LayerWeights(preset).for_layers(layers))
        return (model,)


class IPAdapterCombineEmbeds:
    DESCRIPTION = ("Merges encodings: concat keeps every reference (Apply attends to all their tokens); add, "
                   "subtract (first minus the rest), average and norm average fold them into one.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IP_ADAPTER_EMBEDS",)
    RETURN_NAMES = ("image_embeds",)
    OUTPUT_TOOLTIPS = ("The combined encodings, for Apply IP-Adapter.",)
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls):
        embeds = ("IP_ADAPTER_EMBEDS", {"tooltip": "Encodings from IP-Adapter Encode Image."})
        return {
            "required": {"embeds_1": embeds, "method": (list(COMBINE_MODES), {
                "default": "concat",
                "tooltip": "concat keeps every reference's tokens; add, subtract (first minus the rest), "
                           "average and norm average merge them into one."})},
            "optional": {"embeds_2": embeds, "embeds_3": embeds, "embeds_4": embeds},
        }

    def combine(self, embeds_1: ImageEmbeds, method: str, embeds_2=None, embeds_3=None, embeds_4=None):
        merged = merge(embeds_1, *[e for e in (embeds_2, embeds_3, embeds_4) if e is not None])
        if method == "concat":
            return (merged,)
        uncond = merged.uncond.expand(merged.count, *merged.uncond.shape[1:])
        return (ImageEmbeds(combine(merged.cond, method), combine(uncond, method), merged.output),)


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
        folder = os.path.join(folder_paths.get_output_directory(), EMBEDS_FOLDER)
        full_folder, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, folder)
        os.makedirs(full_folder, exist_ok=True)
        path = os.path.join(full_folder, f"{name}_{counter:05}.safetensors")
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
        return {"required": {"embeds_file": (folder_paths.get_filename_list(EMBEDS_FOLDER),
                                             {"tooltip": "A saved embeddings file."})}}

    @classmethod
    def IS_CHANGED(cls, embeds_file: str) -> str:
        return file_stamp(EMBEDS_FOLDER, embeds_file)

    def load(self, embeds_file: str):
        return (load_embeds(folder_paths.get_full_path_or_raise(EMBEDS_FOLDER, embeds_file)),)
