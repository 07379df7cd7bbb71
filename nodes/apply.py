"""Stage 3, apply: Apply IP-Adapter, the all-in-one node, and style + composition.

`apply_adapter` checks everything, builds the image tokens and hands them to the seam, which
patches a clone of the model (stage 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..ip_adapter_core.attention import IPApplication
from ..ip_adapter_core.embeds import ImageEmbeds, image_tokens
from ..ip_adapter_core.flux_instantx import FluxInstantXApplication
from ..ip_adapter_core.layer_weights import LayerWeights, resolve_layer_weights
from ..ip_adapter_core.layout import encoder_name
from ..ip_adapter_core.masks import check_mask
from ..ip_adapter_core.schedule import ScheduleWindow
from ..ip_adapter_core.sd3 import SD3Application, sd3_encodings
from . import comfy_seam as seam
from .encode import encode_embeds
from .widgets import CATEGORY, CLIP_VISION, COMBINE, END, IPADAPTER, MODEL, START, WEIGHT, WEIGHT_TYPE


@dataclass(frozen=True)
class FaceIDOptions:
    """FaceID controls: Plus v2's shortcut and its face-structure weight s_scale, and the strength of
    the LoRA the file carries (1.0 = as the reference implementation and diffusers load it)."""

    plus_v2: bool = True
    s_scale: float = 1.0
    lora_strength: float = 1.0


def check_embeds(adapter: seam.LoadedAdapter, embeds: ImageEmbeds) -> None:
    spec = adapter.spec
    if spec.is_sd3 and (embeds.output != spec.encoder_output or embeds.width != spec.embed_dim):
        given = f"{encoder_name(embeds.width, embeds.output)} {embeds.output} ({embeds.width} wide)"
        raise ValueError(f"{adapter.name} is an InstantX SD3.5 adapter: it takes {spec.encoder} penultimate hidden "
                         f"states ({spec.embed_dim} wide); these embeds are {given}: encode the reference with a "
                         "SigLIP so400m vision model")
    if spec.is_flux_instantx and (embeds.output != spec.encoder_output or embeds.width != spec.embed_dim):
        given = f"{encoder_name(embeds.width, embeds.output)} {embeds.output} ({embeds.width} wide)"
        raise ValueError(f"{adapter.name} is an InstantX FLUX.1 adapter: it takes {spec.encoder} pooled embeddings "
                         f"({spec.embed_dim} wide, the attention-pooling head's output); these embeds are {given}: "
                         "encode the reference with a SigLIP so400m vision model that has its head")
    if spec.is_faceid and embeds.output not in ("arcface", "arcface_raw"):
        raise ValueError(f"{adapter.name} is a FaceID adapter: it takes face embeddings from IP-Adapter Encode Face, "
                         f"not {embeds.output} from IP-Adapter Encode Image")
    if embeds.output != spec.encoder_output or embeds.width != spec.embed_dim:
        raise ValueError(
            f"{adapter.name} takes {spec.encoder} {spec.encoder_output} of {spec.embed_dim}; these embeds are "
            f"{embeds.output} of {embeds.width}: encode the image for this adapter (same encoder and adapter)"
        )
    if spec.needs_face_crop and embeds.crop_cond is None:
        raise ValueError(f"{adapter.name} is FaceID Plus: it also needs the CLIP encodings of the face crops; connect "
                         "a ViT-H CLIP vision model to IP-Adapter Encode Face")
    if embeds.crop_cond is not None and embeds.crop_cond.shape[-1] != spec.crop_embed_dim:
        raise ValueError(f"{adapter.name} takes {spec.crop_encoder} face-crop states of {spec.crop_embed_dim}; these "
                         f"are {embeds.crop_cond.shape[-1]} wide: use the {spec.crop_encoder} CLIP vision model")


def apply_adapter(model, adapter: seam.LoadedAdapter, embeds: ImageEmbeds, weight: float = 1.0,
                  weight_type: str = "V only", start_at: float = 0.0, end_at: float = 1.0,
                  combine_embeds: str = "concat", attn_mask: torch.Tensor | None = None,
                  layer_weights: Sequence[float] | None = None, one_per_latent: bool = False,
                  faceid: FaceIDOptions = FaceIDOptions(), swap_to_uncond: Sequence[bool] | None = None):
    """A patched clone of `model`; every check runs before anything is built.

    swap_to_uncond: per layer, whether the reference acts as the negative there (the precise weight types).
    """
    window = ScheduleWindow(start_at, end_at)
    if layer_weights is not None and len(layer_weights) != len(adapter.spec.layers):
        raise ValueError(f"{len(layer_weights)} layer weights for {len(adapter.spec.layers)} adapter layers")
    mask = None if attn_mask is None else check_mask(attn_mask)
    if adapter.spec.is_flux and (mask is not None or weight_type != "V only"):
        raise ValueError(f"{adapter.name} is an XLabs FLUX.1 adapter: it takes the 'V only' weight type and no "
                         "attention mask (both are for UNet adapters only, so far)")
    if adapter.spec.is_flux_instantx and (mask is not None or weight_type != "V only"):
        raise ValueError(f"{adapter.name} is an InstantX FLUX.1 adapter: it takes the 'V only' weight type and no "
                         "attention mask (its published processor has neither)")
    if adapter.spec.is_sd3 and (mask is not None or weight_type != "V only"):
        raise ValueError(f"{adapter.name} is an InstantX SD3.5 adapter: it takes the 'V only' weight type and no "
                         "attention mask (both are for UNet adapters only, so far)")
    check_embeds(adapter, embeds)
    seam.check_fits(model, adapter)
    if adapter.spec.is_sd3:  # its image tokens depend on each step's time: the patch projects them per call
        cond, uncond = sd3_encodings(embeds, combine_embeds, one_per_latent)
        weights = None if layer_weights is None else tuple(layer_weights)
        return seam.patch_model(model, adapter, SD3Application(adapter.model, cond, uncond, weight, weights), window)
    shortcut = faceid.plus_v2 if adapter.spec.needs_face_crop else None
    project = seam.token_projector(model, adapter, shortcut, faceid.s_scale)
    cond_tokens, uncond_tokens = image_tokens(project, embeds, combine_embeds, one_per_latent)
    # InstantX FLUX.1: the same image attention with its processor's RMSNorm on the image keys.
    application_class = FluxInstantXApplication if adapter.spec.is_flux_instantx else IPApplication
    application = application_class(
        adapter=adapter.model,
        cond_tokens=cond_tokens,
        uncond_tokens=uncond_tokens,
        weight=weight,
        weight_type=weight_type,
        layer_weights=None if layer_weights is None else tuple(layer_weights),
        mask=mask,
        swap_to_uncond=None if swap_to_uncond is None else tuple(swap_to_uncond),
    )
    patched = seam.patch_model(model, adapter, application, window)
    seam.add_adapter_lora(patched, adapter, faceid.lora_strength)
    return patched


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
                    "tooltip": "Per-layer weights from the IP-Adapter Layer Weights or Weight Type node."}),
                "one_image_per_latent": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Batch mode: reference i steers latent i (for batches and animation); with more "
                                "latents than references the last reference repeats."}),
            },
        }

    def apply(self, model, ipadapter, image_embeds, weight, weight_type, start_at, end_at, combine_embeds,
              attn_mask=None, layer_weights=None, one_image_per_latent=False):
        if layer_weights is not None and ipadapter.spec.is_flux_instantx:
            raise ValueError(f"{ipadapter.name} is an InstantX FLUX.1 adapter: the Layer Weights node is for UNet "
                             "adapters (SD1.5/SDXL blocks); disconnect it")
        if layer_weights is not None and ipadapter.spec.is_flux:
            # The presets and tables name UNet blocks (input/middle/output); Flux has double blocks.
            raise ValueError(f"{ipadapter.name} is an XLabs FLUX.1 adapter: the Layer Weights node is for UNet "
                             "adapters (SD1.5/SDXL blocks); disconnect it")
        # IPAdapter plus weight types resolve to absolute per-layer weights (the weight passed on is then 1.0).
        weight, weights, swaps = resolve_layer_weights(layer_weights, ipadapter.spec.layers, weight)
        return (apply_adapter(model, ipadapter, image_embeds, weight, weight_type, start_at, end_at,
                              combine_embeds, attn_mask, weights, one_image_per_latent, swap_to_uncond=swaps),)


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
        if ipadapter.spec.is_flux_instantx:
            raise ValueError(f"{ipadapter.name} is an InstantX FLUX.1 adapter: style and composition pick UNet "
                             "blocks (SD1.5/SDXL); use Apply IP-Adapter with it")
        if ipadapter.spec.is_flux:
            raise ValueError(f"{ipadapter.name} is an XLabs FLUX.1 adapter: style and composition pick UNet blocks "
                             "(SD1.5/SDXL); use Apply IP-Adapter with it")
        layers = ipadapter.spec.layers
        style_preset = "strong style transfer" if strong_style else "style transfer"
        parts = ((image_style, style_preset, weight_style), (image_composition, "composition", weight_composition))
        for image, preset, weight in parts:
            embeds = encode_embeds(clip_vision, image, ipadapter.spec, "center", "reference (zero)")
            model = apply_adapter(model, ipadapter, embeds, weight, weight_type, start_at, end_at,
                                  layer_weights=LayerWeights(preset).for_layers(layers))
        return (model,)


class ApplyIPAdapterFaceID:
    DESCRIPTION = ("Adds a face reference (FaceID, FaceID Plus / Plus v2, Portrait) to a clone of the model, with "
                   "the LoRA the FaceID file carries applied through ComfyUI's LoRA patching. The input model is "
                   "not changed; it stacks with other adapters and LoRA nodes.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the face reference attached.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL,
                "ipadapter": ("IP_ADAPTER", {"tooltip": "A FaceID adapter from Load IP-Adapter."}),
                "image_embeds": ("IP_ADAPTER_EMBEDS", {"tooltip": "From IP-Adapter Encode Face."}),
                "weight": WEIGHT,
                "faceid_plus_version": (["v2", "v1"], {
                    "default": "v2",
                    "tooltip": "FaceID Plus only: v1 and v2 files have the same weights, so say which this is. v2 "
                               "adds the face embedding's own tokens (the shortcut), scaled by face_structure."}),
                "face_structure": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.05,
                                             "tooltip": "FaceID Plus v2: weight of the face-crop (CLIP) path added to "
                                                        "the identity tokens (s_scale)."}),
                "lora_strength": ("FLOAT", {"default": 1.0, "min": -1.0, "max": 3.0, "step": 0.05,
                                            "tooltip": "Strength of the LoRA stored in the FaceID file (1.0 as the "
                                                       "reference implementation; Portrait files have none)."}),
                "weight_type": WEIGHT_TYPE,
                "start_at": START,
                "end_at": END,
                "combine_embeds": COMBINE,
            },
            "optional": {
                "attn_mask": ("MASK", {"tooltip": "Where in the picture the face reference acts (white = fully)."}),
                "layer_weights": ("IP_ADAPTER_LAYER_WEIGHTS", {
                    "tooltip": "Per-layer weights from the IP-Adapter Layer Weights or Weight Type node."}),
            },
        }

    def apply(self, model, ipadapter, image_embeds, weight, faceid_plus_version, face_structure, lora_strength,
              weight_type, start_at, end_at, combine_embeds, attn_mask=None, layer_weights=None):
        if not ipadapter.spec.is_faceid:
            raise ValueError(f"{ipadapter.name} is not a FaceID adapter: use Apply IP-Adapter for it")
        weight, weights, swaps = resolve_layer_weights(layer_weights, ipadapter.spec.layers, weight)
        options = FaceIDOptions(faceid_plus_version == "v2", face_structure, lora_strength)
        return (apply_adapter(model, ipadapter, image_embeds, weight, weight_type, start_at, end_at, combine_embeds,
                              attn_mask, weights, faceid=options, swap_to_uncond=swaps),)
