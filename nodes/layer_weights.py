"""Stage 3, apply (controls): per-layer weights for Apply IP-Adapter."""

from __future__ import annotations

from ..ip_adapter_core.layer_weights import PRESETS, LayerWeights
from .widgets import CATEGORY

TABLE_TOOLTIP = ("Optional per-layer table refining the preset: 'default=0, output 1=1, input 8=0.5', 'input 7.3=0.2' "
                 "(one transformer), '#5=0' (adapter layer 5), or one number per adapter layer. Or IPAdapter "
                 "plus's form 'index:value, index:value' (e.g. '3:1.0, 6:0.5'): its transformer numbering, SD1.5 "
                 "0-15 (0-5 input 1,2,4,5,7,8; 6 middle; 7-15 output 3-11), SDXL 0-10 (0-3 input 4,5,7,8; 4 middle; "
                 "5-10 output 0-5; all depth sub-blocks of a transformer share its index); indices not listed get "
                 "0, so it replaces the preset (keep preset linear).")
DICT_TOOLTIP = ('Optional diffusers/InstantStyle block dictionary, e.g. {"up": {"block_0": [0, 1, 0]}}; blocks not '
                "named get 0, exactly as diffusers' set_ip_adapter_scale. Replaces preset and table.")


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
