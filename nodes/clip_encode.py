"""Encoding reference images with ComfyUI's CLIP vision model, as each adapter variant needs."""

from __future__ import annotations

import comfy.clip_vision
import comfy.model_management
import comfy.utils
import torch

from ..ip_adapter_core.embeds import ImageEmbeds
from ..ip_adapter_core.images import check_image, square, tiles
from ..ip_adapter_core.layout import AdapterSpec, encoder_name

ENCODE_CHUNK = 8  # images per encoder call; a progress bar ticks per chunk


def encoder_widths(clip_vision: comfy.clip_vision.ClipVisionModel) -> dict[str, int]:
    """Widths of the encoder's image_embeds and penultimate hidden states, from its weights."""
    model = clip_vision.model
    hidden = model.vision_model.post_layernorm.weight.shape[0]
    projection = getattr(model, "visual_projection", None)
    embeds = projection.weight.shape[0] if hasattr(projection, "weight") else hidden
    return {"image_embeds": embeds, "penultimate": hidden}


def check_encoder(clip_vision: comfy.clip_vision.ClipVisionModel, spec: AdapterSpec) -> None:
    width = encoder_widths(clip_vision)[spec.encoder_output]
    if width != spec.embed_dim:
        raise ValueError(
            f"this adapter expects {spec.encoder} {spec.encoder_output} of {spec.embed_dim}, the CLIP vision "
            f"model gives {width} ({encoder_name(width, spec.encoder_output)}): load the {spec.encoder} "
            f"CLIP vision model for this adapter"
        )


def _pick(output, spec: AdapterSpec) -> torch.Tensor:
    return output["penultimate_hidden_states"] if spec.uses_hidden_states else output["image_embeds"]


def encode(clip_vision, image: torch.Tensor, spec: AdapterSpec, crop: str = "center") -> torch.Tensor:
    """[B, H, W, C] images -> [B, D] or [B, 257, D], with a progress bar over chunks."""
    check_encoder(clip_vision, spec)
    image = check_image(image)
    image = tiles(image) if crop == "tiles" else square(image, crop)
    bar = comfy.utils.ProgressBar(image.shape[0])
    out = []
    for start in range(0, image.shape[0], ENCODE_CHUNK):
        chunk = image[start : start + ENCODE_CHUNK]
        out.append(_pick(clip_vision.encode_image(chunk, crop=crop != "squash"), spec))
        bar.update(chunk.shape[0])
    return torch.cat(out).float()


def unconditional(clip_vision, spec: AdapterSpec, negative: str) -> torch.Tensor:
    """The negative encoding: the reference convention, or a black image when asked.

    Reference: base adapters project a zero image_embeds; plus and full-face encode an all-zero
    pixel tensor *after* normalisation (the CLIP mean colour), which no [0, 1] image reproduces
    exactly, so the encoder is called on zeros directly.
    """
    if negative == "black image":
        return encode(clip_vision, torch.zeros(1, 224, 224, 3), spec)
    if not spec.uses_hidden_states:
        return torch.zeros(1, spec.embed_dim)
    comfy.model_management.load_model_gpu(clip_vision.patcher)
    size = clip_vision.image_size
    pixels = torch.zeros(1, 3, size, size, device=clip_vision.load_device)
    out = clip_vision.model(pixel_values=pixels, intermediate_output=-2)
    return out[1].to(comfy.model_management.intermediate_device()).float()


def encode_embeds(clip_vision, image, spec: AdapterSpec, crop: str, negative: str,
                  negative_image: torch.Tensor | None = None) -> ImageEmbeds:
    cond = encode(clip_vision, image, spec, crop)
    if negative_image is not None:
        uncond = encode(clip_vision, negative_image, spec, crop)
        if uncond.shape[0] not in (1, cond.shape[0]):
            raise ValueError(
                f"{uncond.shape[0]} negative images for {cond.shape[0]} references; give 1 or {cond.shape[0]}")
    else:
        uncond = unconditional(clip_vision, spec, negative)
    return ImageEmbeds(cond, uncond, spec.encoder_output)
