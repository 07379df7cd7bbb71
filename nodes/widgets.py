"""Inputs shared by several nodes, with their tooltips, in one place."""

from __future__ import annotations

from ..ip_adapter_core.attention import WEIGHT_TYPES
from ..ip_adapter_core.embeds import COMBINE_MODES

CATEGORY = "IP-Adapter Exact"

IPADAPTER = ("IP_ADAPTER", {"tooltip": "From Load IP-Adapter."})
CLIP_VISION = ("CLIP_VISION", {"tooltip": "The CLIP vision model the adapter was trained with."})
MODEL = ("MODEL", {"tooltip": "The diffusion model to attach the image prompt to."})
EMBEDS = ("IP_ADAPTER_EMBEDS", {"tooltip": "Encodings from IP-Adapter Encode Image."})

WEIGHT = ("FLOAT", {"default": 1.0, "min": -1.0, "max": 5.0, "step": 0.05,
                    "tooltip": "Strength of the image prompt. 0 leaves the model as it was; negative pushes away."})
START = ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                   "tooltip": "Fraction of the sampling schedule at which the adapter starts acting."})
END = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                 "tooltip": "Fraction of the sampling schedule after which the adapter stops acting."})
# Choices are lists: ComfyUI checks a submitted value against the options only when they are a list.
WEIGHT_TYPE = (list(WEIGHT_TYPES), {"default": "V only",
                                    "tooltip": "How the weight acts: on the output (V only, as diffusers' scale), on "
                                               "keys and values (K+V), optionally with a channel penalty C/1280."})
COMBINE = (list(COMBINE_MODES), {"default": "concat",
                                 "tooltip": "With several references: concat attends to all tokens; the others merge "
                                            "the encodings (add, first minus the rest, mean, norm-weighted mean). "
                                            "A negative shared by all references stays as it is."})

