"""CLIP vision calls: widths, encodings, the zero-pixel negative, loading a file."""

from __future__ import annotations

import os

import comfy.clip_vision
import comfy.model_management
import comfy.utils
import torch


def load_clip_vision_file(path: str) -> comfy.clip_vision.ClipVisionModel:
    clip_vision = comfy.clip_vision.load(path)
    if clip_vision is None:
        raise ValueError(f"{os.path.basename(path)}: ComfyUI's CLIP vision loader does not know this model")
    return clip_vision


ENCODE_CHUNK = 8  # images per encoder call; the progress bar ticks per chunk


def clip_vision_widths(clip_vision: comfy.clip_vision.ClipVisionModel) -> dict[str, int]:
    """Widths of the encoder's image_embeds and penultimate hidden states, from its weights."""
    model = clip_vision.model
    hidden = model.vision_model.post_layernorm.weight.shape[0]
    projection = getattr(model, "visual_projection", None)
    embeds = projection.weight.shape[0] if hasattr(projection, "weight") else hidden
    return {"image_embeds": embeds, "penultimate": hidden}


def clip_encode(clip_vision, images: torch.Tensor, output: str, center_crop: bool) -> torch.Tensor:
    """[B, H, W, C] images -> [B, D] ('image_embeds') or [B, T, D] ('penultimate'), float32,
    with ComfyUI's own CLIP preprocessing and a progress bar."""
    key = "penultimate_hidden_states" if output == "penultimate" else "image_embeds"
    bar = comfy.utils.ProgressBar(images.shape[0])
    out = []
    for start in range(0, images.shape[0], ENCODE_CHUNK):
        chunk = images[start : start + ENCODE_CHUNK]
        out.append(clip_vision.encode_image(chunk, crop=center_crop)[key])
        bar.update(chunk.shape[0])
    return torch.cat(out).float()


def clip_encode_zero_pixels(clip_vision) -> torch.Tensor:
    """Penultimate hidden states of an all-zero *normalised* pixel tensor (the CLIP mean colour),
    which no [0, 1] image reproduces exactly, so the encoder is called on zeros directly."""
    comfy.model_management.load_model_gpu(clip_vision.patcher)
    size = clip_vision.image_size
    pixels = torch.zeros(1, 3, size, size, device=clip_vision.load_device)
    out = clip_vision.model(pixel_values=pixels, intermediate_output=-2)
    return out[1].to(comfy.model_management.intermediate_device()).float()
