"""Stage 3, apply: Apply IP-Adapter, the all-in-one node, and style + composition.

`apply_adapter` checks everything, builds the image tokens and hands them to the seam, which
patches a clone of the model (stage 4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..ip_adapter_core.attention import IPApplication
from ..ip_adapter_core.embeds import ImageEmbeds, image_tokens
from ..ip_adapter_core.layer_weights import LayerWeights
from ..ip_adapter_core.masks import check_mask
from ..ip_adapter_core.schedule import ScheduleWindow
from . import comfy_seam as seam
from .encode import encode_embeds
from .widgets import CATEGORY, CLIP_VISION, COMBINE, END, IPADAPTER, MODEL, START, WEIGHT, WEIGHT_TYPE


def check_embeds(adapter: seam.LoadedAdapter, embeds: ImageEmbeds) -> None:
    spec = adapter.spec
    if embeds.output != spec.encoder_output or embeds.width != spec.embed_dim:
        raise ValueError(
            f"{adapter.name} takes {spec.encoder} {spec.encoder_output} of {spec.embed_dim}; these embeds are "
            f"{embeds.output} of {embeds.width}: encode the image for this adapter (same CLIP vision model)"
        )


def apply_adapter(model, adapter: seam.LoadedAdapter, embeds: ImageEmbeds, weight: float = 1.0,
                  weight_type: str = "V only", start_at: float = 0.0, end_at: float = 1.0,
                  combine_embeds: str = "concat", attn_mask: torch.Tensor | None = None,
                  layer_weights: Sequence[float] | None = None, one_per_latent: bool = False):
    """A patched clone of `model`; every check runs before anything is built."""
    window = ScheduleWindow(start_at, end_at)
    if layer_weights is not None and len(layer_weights) != len(adapter.spec.layers):
        raise ValueError(f"{len(layer_weights)} layer weights for {len(adapter.spec.layers)} adapter layers")
    mask = None if attn_mask is None else check_mask(attn_mask)
    check_embeds(adapter, embeds)
    seam.check_fits(model, adapter)
    cond_tokens, uncond_tokens = image_tokens(seam.token_projector(model, adapter), embeds, combine_embeds,
                                              one_per_latent)
    application = IPApplication(
        adapter=adapter.model,
        cond_tokens=cond_tokens,
        uncond_tokens=uncond_tokens,
        weight=weight,
        weight_type=weight_type,
        layer_weights=None if layer_weights is None else tuple(layer_weights),
        mask=mask,
    )
    return seam.patch_model(model, adapter, application, window)


class ApplyIPAdapter:
    DESCRIPTION = ("Adds the image prompt to every cross-attention layer of a clone of the model. The input model "
                   "is not changed; chaining several Apply nodes stacks their adapters.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the image prompt attached.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL,
                "ipadapter": IPADAPTER,
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
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the image prompt attached.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": MODEL,
            "ipadapter": IPADAPTER,
            "clip_vision": CLIP_VISION,
            "image": ("IMAGE", {"tooltip": "Reference image(s); several are concatenated."}),
            "weight": WEIGHT,
        }}

    def apply(self, model, ipadapter, clip_vision, image, weight):
        embeds = encode_embeds(clip_vision, image, ipadapter.spec, "center", "reference (zero)")
        return (apply_adapter(model, ipadapter, embeds, weight),)


class IPAdapterStyleComposition:
    DESCRIPTION = ("Two references at once: one steers style (deepest up-block attention), the other composition "
                   "(deepest down-block attention), each with its own weight. Made for SDXL; works on SD1.5.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with both image prompts attached.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to attach the image prompts to."}),
            "ipadapter": IPADAPTER,
            "clip_vision": CLIP_VISION,
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
