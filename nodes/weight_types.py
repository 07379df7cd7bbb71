"""Stage 3, apply (controls): IPAdapter plus's weight types, for Apply IP-Adapter's layer_weights."""

from __future__ import annotations

from ..ip_adapter_core.plus_weights import PLUS_WEIGHT_TYPES, PlusWeightType
from .widgets import CATEGORY

WEIGHT_TYPE_TOOLTIP = (
    "IPAdapter plus's weight types, on its transformer numbering (SD1.5 0-15, SDXL 0-10; every depth sub-block "
    "of an SDXL transformer shares its index). w = Apply's weight. ease in/out/in-out/reverse in-out: "
    "w*(0.05+0.95*curve(i/L)); weak input/middle/output: those blocks x0.2; strong middle: input and output x0.2. "
    "style transfer: SDXL {6}, SD1.5 {0-3, 9-15}; composition: SDXL {3}, SD1.5 {4: 0.25w, 5}; strong style "
    "transfer: every index but the composition ones; style and composition: style indices w, composition "
    "indices 1.0 (as IPAdapter Advanced). Precise types: see the boosts. Unlisted indices: no image term.")
STYLE_BOOST_TOOLTIP = (
    "style transfer precise: the weight of the composition transformers (SDXL 3; SD1.5 5, and 4 at x0.25), where "
    "the reference acts as the negative (conditional side gets zero image tokens, unconditional side the "
    "reference) to keep its content out. An absolute weight, not scaled by Apply's weight (IPAdapter Advanced "
    "uses its weight here: set it equal for the same result).")
COMPOSITION_BOOST_TOOLTIP = (
    "composition precise: the weight of the style transfer layers (SDXL 6, the other non-composition indices at "
    "x0.1; SD1.5 0-3 and 9-15, 6-8 at x0.1), where the reference acts as the negative; the composition "
    "transformers keep Apply's weight. Absolute, not scaled by Apply's weight (0 = only composition acts, as "
    "IPAdapter Precise Composition's default).")
LAYER_WEIGHTS_TOOLTIP = (
    "Optional, as IPAdapter Mad Scientist: 'index:value, index:value' on the same numbering; each value is "
    "multiplied by Apply's weight and unlisted indices get 0. When given, the weight type only keeps its "
    "'precise' swap to the negative (every other type counts as linear).")


class IPAdapterWeightType:
    DESCRIPTION = ("Per-layer weights by IPAdapter plus's weight type names (linear, ease in ... style transfer "
                   "precise, composition precise), for Apply IP-Adapter's layer_weights input: the same per-layer "
                   "weights and the same swap of the reference to the negative side for the 'precise' types, on "
                   "this pack's exact attention. SD1.5 and SDXL adapters (checked when Apply runs).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IP_ADAPTER_LAYER_WEIGHTS",)
    RETURN_NAMES = ("layer_weights",)
    OUTPUT_TOOLTIPS = ("Per-layer weights (and swaps), for the layer_weights input of Apply IP-Adapter.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "weight_type": (list(PLUS_WEIGHT_TYPES), {"default": "linear", "tooltip": WEIGHT_TYPE_TOOLTIP}),
            "style_boost": ("FLOAT", {"default": 1.0, "min": -5.0, "max": 5.0, "step": 0.05,
                                      "tooltip": STYLE_BOOST_TOOLTIP}),
            "composition_boost": ("FLOAT", {"default": 0.0, "min": -5.0, "max": 5.0, "step": 0.05,
                                            "tooltip": COMPOSITION_BOOST_TOOLTIP}),
            "layer_weights": ("STRING", {"default": "", "multiline": True, "tooltip": LAYER_WEIGHTS_TOOLTIP}),
        }}

    def build(self, weight_type: str, style_boost: float, composition_boost: float,
              layer_weights: str = "") -> tuple[PlusWeightType]:
        return (PlusWeightType.parse(weight_type, style_boost, composition_boost, layer_weights),)
