"""Stage 2, encode: reference images to CLIP encodings, with their negative; a noise image."""

from __future__ import annotations

import torch

from ..ip_adapter_core.embeds import ImageEmbeds, scale_references
from ..ip_adapter_core.image_ops import NOISE_TYPES, noise_image
from ..ip_adapter_core.images import CROP_MODES, check_image, square, tiles
from ..ip_adapter_core.layout import AdapterSpec, encoder_name
from . import comfy_seam as seam
from .widgets import CATEGORY, CLIP_VISION

NEGATIVE_MODES = ("reference (zero)", "black image")
CROP_CHOICES = CROP_MODES + ("tiles",)

TOOLTIPS = {
    "crop": "How a non-square image becomes square for CLIP: crop at a position, pad with grey, squash, or "
            "'tiles' (square tiles along the long side, all used as references).",
    "negative": "Unconditional image: 'reference (zero)' as the original implementation (zero embedding for "
                "base, zero pixels for plus/full-face); 'black image' encodes a black picture instead.",
}


def check_encoder(clip_vision, spec: AdapterSpec) -> None:
    if spec.is_flux_instantx:
        # SigLIP's pooled output needs its attention-pooling head, which ComfyUI's CLIP vision model drops.
        raise ValueError("this is the InstantX FLUX.1 IP-Adapter: it takes SigLIP so400m/384 pooled embeddings, which "
                         "a CLIP_VISION input cannot give (ComfyUI drops SigLIP's pooling head); use IP-Adapter Encode "
                         "Image (SigLIP pooled) with the SigLIP file")
    if spec.is_faceid:
        raise ValueError(f"this is an IP-Adapter {spec.variant}: it takes a face, not a CLIP image encoding; use "
                         "IP-Adapter Encode Face (with Load InsightFace)")
    width = seam.clip_vision_widths(clip_vision)[spec.encoder_output]
    if width != spec.embed_dim:
        raise ValueError(
            f"this adapter expects {spec.encoder} {spec.encoder_output} of {spec.embed_dim}, the CLIP vision "
            f"model gives {width} ({encoder_name(width, spec.encoder_output)}): load the {spec.encoder} "
            f"CLIP vision model for this adapter"
        )


def encode(clip_vision, image: torch.Tensor, spec: AdapterSpec, crop: str = "center") -> torch.Tensor:
    """[B, H, W, C] images -> [B, D] or [B, 257, D], the encoder output the adapter uses."""
    check_encoder(clip_vision, spec)
    image = check_image(image)
    image = tiles(image) if crop == "tiles" else square(image, crop)
    return seam.clip_encode(clip_vision, image, spec.encoder_output, center_crop=crop != "squash")


def unconditional(clip_vision, spec: AdapterSpec, negative: str) -> torch.Tensor:
    """The negative encoding: the reference convention, or a black image when asked.

    Reference: base adapters project a zero image_embeds; plus and full-face encode an all-zero
    pixel tensor *after* normalisation (the CLIP mean colour).
    """
    if negative == "black image":
        return encode(clip_vision, torch.zeros(1, 224, 224, 3), spec)
    if not spec.uses_hidden_states:
        return torch.zeros(1, spec.embed_dim)
    return seam.clip_encode_zero_pixels(clip_vision)


def encode_embeds(clip_vision, image: torch.Tensor, spec: AdapterSpec, crop: str, negative: str,
                  negative_image: torch.Tensor | None = None) -> ImageEmbeds:
    cond = encode(clip_vision, image, spec, crop)
    if negative_image is not None:
        uncond = encode(clip_vision, negative_image, spec, crop)
        if uncond.shape[0] not in (1, cond.shape[0]):
            raise ValueError(
                f"{uncond.shape[0]} negative images for {cond.shape[0]} references; give 1 or {cond.shape[0]}")
    elif spec.is_sd3 and negative != "black image":
        # InstantX SD3.5 (diffusers' SD3 pipeline): the negative is all-zero SigLIP states, not an encoding.
        uncond = torch.zeros_like(cond[:1])
    else:
        uncond = unconditional(clip_vision, spec, negative)
    return ImageEmbeds(cond, uncond, spec.encoder_output)


class EncodeIPAdapterImage:
    DESCRIPTION = ("Encodes reference images with the CLIP vision model the adapter needs. A batch of images "
                   "gives several references. Uses ComfyUI's own CLIP preprocessing (224 px).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IP_ADAPTER_EMBEDS",)
    RETURN_NAMES = ("image_embeds",)
    OUTPUT_TOOLTIPS = ("Encodings of the references and of the negative image.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ipadapter": ("IP_ADAPTER", {"tooltip": "The adapter: decides which encoder output is used."}),
                "clip_vision": CLIP_VISION,
                "image": ("IMAGE", {"tooltip": "Reference image(s); each image of a batch is one reference."}),
                "crop": (list(CROP_CHOICES), {"default": "center", "tooltip": TOOLTIPS["crop"]}),
                "negative": (list(NEGATIVE_MODES), {"default": NEGATIVE_MODES[0], "tooltip": TOOLTIPS["negative"]}),
            },
            "optional": {
                "negative_image": ("IMAGE", {
                    "tooltip": "An explicit negative image (e.g. noise); overrides 'negative'."}),
                "weight": ("FLOAT", {
                    "default": 1.0, "min": -1.0, "max": 3.0, "step": 0.01,
                    "tooltip": "Multiplies the references' CLIP encodings (not the negative) before the adapter's "
                               "projection, as IPAdapter plus's Encoder weight; 1.0 = unchanged. For plus adapters "
                               "(resampler) this differs from Apply's weight, which scales the attention output."}),
            },
        }

    def encode(self, ipadapter: seam.LoadedAdapter, clip_vision, image, crop: str, negative: str,
               negative_image=None, weight: float = 1.0) -> tuple[ImageEmbeds]:
        embeds = encode_embeds(clip_vision, image, ipadapter.spec, crop, negative, negative_image)
        return (scale_references(embeds, weight),)


def encode_faces(face_models, image: torch.Tensor, spec: AdapterSpec, face_index: int,
                 clip_vision=None) -> tuple[ImageEmbeds, torch.Tensor]:
    """Face embeddings of every picture of `image` (its `face_index`-th face by size; -1: all its faces),
    and the aligned face crops [N, 224, 224, 3]. FaceID Plus also encodes each crop with CLIP.

    The negative follows the reference implementation: a zero face embedding (and, for Plus, the
    CLIP states of an all-zero normalised pixel tensor).
    """
    from ..models.face_analysis import analyse

    if not spec.is_faceid:
        raise ValueError(f"this is an IP-Adapter {spec.variant}, not a FaceID adapter: use IP-Adapter Encode Image")
    if spec.needs_face_crop:
        if clip_vision is None:
            raise ValueError(f"FaceID Plus also encodes the face crop with CLIP: connect the {spec.crop_encoder} "
                             "CLIP vision model to clip_vision")
        width = seam.clip_vision_widths(clip_vision)["penultimate"]
        if width != spec.crop_embed_dim:
            raise ValueError(f"this adapter expects {spec.crop_encoder} penultimate states of {spec.crop_embed_dim} "
                             f"for the face crop, the CLIP vision model gives {width} "
                             f"({encoder_name(width, 'penultimate')}): load the {spec.crop_encoder} CLIP vision model")
    image = check_image(image)
    faces = []
    for i in range(image.shape[0]):
        label = f"image {i + 1} of {image.shape[0]}"
        first = analyse(face_models, image[i], index=max(face_index, 0), label=label)
        faces.append(first)
        if face_index == -1:
            faces += [analyse(face_models, image[i], index=k, label=label) for k in range(1, first.face_count)]
    raw = spec.face_input == "arcface_raw"
    cond = torch.stack([f.raw_embedding if raw else f.embedding for f in faces])
    crops = torch.stack([f.aligned_crop for f in faces])
    embeds = ImageEmbeds(cond, torch.zeros(1, cond.shape[-1]), spec.face_input)
    if spec.needs_face_crop:
        crop_cond = seam.clip_encode(clip_vision, crops, "penultimate", center_crop=True)
        embeds = ImageEmbeds(cond, embeds.uncond, spec.face_input, crop_cond, seam.clip_encode_zero_pixels(clip_vision))
    return embeds, crops


class EncodeIPAdapterFace:
    DESCRIPTION = ("Finds the face in each reference picture (insightface), and gives its identity embedding for a "
                   "FaceID adapter, plus the CLIP encoding of the aligned face for FaceID Plus. Several pictures "
                   "(or all faces) give several faces: Portrait uses them all.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IP_ADAPTER_EMBEDS", "IMAGE")
    RETURN_NAMES = ("image_embeds", "faces")
    OUTPUT_TOOLTIPS = ("Face encodings and their negative, for Apply IP-Adapter FaceID.",
                       "The aligned faces that were used (224 px), to check what was found.")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ipadapter": ("IP_ADAPTER", {"tooltip": "A FaceID adapter: decides what is encoded."}),
                "insightface": ("INSIGHTFACE", {"tooltip": "From Load InsightFace."}),
                "image": ("IMAGE", {"tooltip": "Picture(s) with the face; each picture gives one face."}),
                "face_index": ("INT", {"default": 0, "min": -1, "max": 63,
                                       "tooltip": "Which face of each picture: 0 = the largest, 1 the next largest, "
                                                  "...; -1 = every face found."}),
            },
            "optional": {
                "clip_vision": ("CLIP_VISION", {"tooltip": "FaceID Plus: the ViT-H CLIP vision model, for the face "
                                                           "crop."}),
            },
        }

    def encode(self, ipadapter: seam.LoadedAdapter, insightface, image, face_index: int, clip_vision=None):
        return encode_faces(insightface, image, ipadapter.spec, face_index, clip_vision)


NOISE_TYPE_TOOLTIP = (
    "grey blend: this node's original (grey, or the image at its own size, mixed with uniform noise by strength). "
    "IPAdapter plus's types, on black 224 px or the image centre-cropped and resized to 224 (bicubic): fade = mixed "
    "with uniform noise by strength; dissolve = each value replaced by uniform noise with probability strength; "
    "gaussian = plus normal noise x strength; shuffle = elastically warped (alpha 75, sigma (1-strength)*3.5), "
    "flipped both ways, then x*(1-n)+n with n normal x 0.75 strength. Clamped to 0..1. Seeded by seed (that pack "
    "seeds from the image's pixel sum).")


class IPAdapterNoiseImage:
    DESCRIPTION = ("A noise image to use as the negative image of IP-Adapter Encode Image (less 'default' look): "
                   "this node's grey blend, or IPAdapter plus's fade, dissolve, gaussian and shuffle, optionally "
                   "blurred; deterministic for a seed.")
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
            # Optional and after the original widgets: saved workflows keep their values and API prompts
            # without them stay valid (both get grey blend, unblurred: the node's original output).
            "optional": {
                "image": ("IMAGE", {"tooltip": "The picture to put the noise on: grey blend takes it at its own size "
                                               "instead of grey; the other types centre-crop and resize it to 224 "
                                               "instead of black."}),
                "type": (list(NOISE_TYPES), {"default": "grey blend", "tooltip": NOISE_TYPE_TOOLTIP}),
                "blur": ("INT", {"default": 0, "min": 0, "max": 32, "step": 1,
                                 "tooltip": "Gaussian blur of the result, kernel size in pixels (an even size is made "
                                            "odd; sigma 0.15 x size + 0.35, reflected borders); 0 = none."}),
            },
        }

    def make(self, strength: float, seed: int, image=None, type: str = "grey blend", blur: int = 0):  # noqa: A002
        # `type` is the widget's name in IPAdapter plus's node, kept so its users find it.
        return (noise_image(type, strength, seed, None if image is None else check_image(image), blur),)
