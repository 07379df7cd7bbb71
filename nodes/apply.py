"""Apply IP-Adapter, and the all-in-one node for the common case."""

from __future__ import annotations

from ..ip_adapter_core.attention import WEIGHT_TYPES
from ..ip_adapter_core.embeds import COMBINE_MODES
from .apply_logic import apply_adapter
from .clip_encode import encode_embeds
from .loader import CATEGORY

WEIGHT = ("FLOAT", {"default": 1.0, "min": -1.0, "max": 5.0, "step": 0.05,
                    "tooltip": "Strength of the image prompt. 0 leaves the model as it was; negative pushes away."})
START = ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                   "tooltip": "Fraction of the sampling schedule at which the adapter starts acting."})
END = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                 "tooltip": "Fraction of the sampling schedule after which the adapter stops acting."})
# Choices are lists: ComfyUI checks a submitted value against the options only when they are a list.
WEIGHT_TYPE = (list(WEIGHT_TYPES), {"default": "V only",
                              "tooltip": "How the weight acts: on the output (V only, as diffusers' scale), on keys "
                                         "and values (K+V), optionally with a channel penalty C/1280."})
COMBINE = (list(COMBINE_MODES), {"default": "concat",
                           "tooltip": "With several references: concat attends to all tokens; the others merge "
                                      "the encodings (add, first minus the rest, mean, norm-weighted mean)."})


class ApplyIPAdapter:
    DESCRIPTION = ("Adds the image prompt to every cross-attention layer of a clone of the model. The input model "
                   "is not changed; chaining several Apply nodes stacks their adapters.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the image prompt attached.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to attach the image prompt to."}),
                "ipadapter": ("IP_ADAPTER", {"tooltip": "From Load IP-Adapter."}),
                "image_embeds": ("IP_ADAPTER_EMBEDS", {"tooltip": "From IP-Adapter Encode Image."}),
                "weight": WEIGHT,
                "weight_type": WEIGHT_TYPE,
                "start_at": START,
                "end_at": END,
                "combine_embeds": COMBINE,
            },
            "optional": {
                "attn_mask": ("MASK", {"tooltip": "Where in the picture the image prompt acts (white = fully)."}),
                "layer_weights": ("IP_ADAPTER_LAYER_WEIGHTS", {
                    "tooltip": "Per-layer multipliers from the IP-Adapter Layer Weights node."}),
                "one_image_per_latent": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Batch mode: reference i steers latent i (for batches and animation); with more "
                                "latents than references the last reference repeats."}),
            },
        }

    def apply(self, model, ipadapter, image_embeds, weight, weight_type, start_at, end_at, combine_embeds,
              attn_mask=None, layer_weights=None, one_image_per_latent=False):
        weights = None if layer_weights is None else layer_weights.for_layers(ipadapter.spec.layers)
        return (apply_adapter(model, ipadapter, image_embeds, weight, weight_type, start_at, end_at,
                              combine_embeds, attn_mask, weights, one_image_per_latent),)


class IPAdapterAllInOne:
    DESCRIPTION = "Encode the reference image and apply the adapter in one step, with the reference settings."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the image prompt attached.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to attach the image prompt to."}),
            "ipadapter": ("IP_ADAPTER", {"tooltip": "From Load IP-Adapter."}),
            "clip_vision": ("CLIP_VISION", {"tooltip": "The CLIP vision model the adapter was trained with."}),
            "image": ("IMAGE", {"tooltip": "Reference image(s); several are concatenated."}),
            "weight": WEIGHT,
        }}

    def apply(self, model, ipadapter, clip_vision, image, weight):
        embeds = encode_embeds(clip_vision, image, ipadapter.spec, "center", "reference (zero)")
        return (apply_adapter(model, ipadapter, embeds, weight),)
