"""Where IP-Adapter weights go in a UNet, and what kind of adapter a state dict holds.

An adapter file numbers its `to_k_ip`/`to_v_ip` pairs in diffusers' attention-processor
order (down blocks, up blocks, mid block; attn1 takes the even numbers, attn2 the odd ones).
ComfyUI addresses the same cross-attention layers as `(block_name, block_id, transformer_index)`.
This module is the one place that maps one onto the other, and that reads a state dict to
tell which variant it is. Detection never looks at a file name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BlockKey = tuple[str, int, int]  # ("input" | "middle" | "output", block id, transformer index)


def _blocks(name: str, depths: dict[int, int]) -> list[BlockKey]:
    return [(name, block, t) for block, depth in depths.items() for t in range(depth)]


# Cross-attention layers in diffusers' processor order: down, up, mid.
SD15_LAYERS: tuple[BlockKey, ...] = tuple(
    _blocks("input", {1: 1, 2: 1, 4: 1, 5: 1, 7: 1, 8: 1})
    + _blocks("output", {i: 1 for i in range(3, 12)})
    + _blocks("middle", {0: 1})
)
SDXL_LAYERS: tuple[BlockKey, ...] = tuple(
    _blocks("input", {4: 2, 5: 2, 7: 10, 8: 10})
    + _blocks("output", {0: 10, 1: 10, 2: 10, 3: 2, 4: 2, 5: 2})
    + _blocks("middle", {0: 10})
)

BASE_MODELS = {"SD1.5": (SD15_LAYERS, 768), "SDXL": (SDXL_LAYERS, 2048)}

# What each CLIP vision tower gives, by size: image_embeds width and penultimate width.
ENCODERS = {
    "ViT-L": {"image_embeds": 768, "penultimate": 1024},
    "ViT-H": {"image_embeds": 1024, "penultimate": 1280},
    "ViT-bigG": {"image_embeds": 1280, "penultimate": 1664},
}


def encoder_name(width: int, output: str) -> str:
    """Name the CLIP vision tower whose `output` ('image_embeds' or 'penultimate') is `width` wide."""
    for name, widths in ENCODERS.items():
        if widths[output] == width:
            return name
    return f"an unknown encoder ({width} wide)"


def ip_key(layer_index: int) -> str:
    """State-dict number of the attn2 processor at `layer_index` in processor order."""
    return str(2 * layer_index + 1)


@dataclass(frozen=True)
class AdapterSpec:
    """What an IP-Adapter state dict is, read from its keys and shapes alone."""

    variant: str  # "base", "plus", "full-face"
    base_model: str  # "SD1.5" or "SDXL"
    projection: str  # "linear", "resampler", "mlp"
    encoder: str  # "ViT-H", "ViT-bigG", ...
    encoder_output: str  # "image_embeds" or "penultimate"
    embed_dim: int  # width the projection takes
    context_dim: int  # width of an image token (= the text context width)
    tokens: int  # image tokens per reference image (257 for full-face: one per patch + class)
    layers: tuple[BlockKey, ...]
    resampler_heads: int = 0
    resampler_depth: int = 0

    @property
    def uses_hidden_states(self) -> bool:
        return self.encoder_output == "penultimate"

    def describe(self) -> str:
        return (
            f"IP-Adapter {self.variant} for {self.base_model}: {self.projection} projection of "
            f"{self.encoder} {self.encoder_output} ({self.embed_dim}) into {self.tokens} tokens of "
            f"{self.context_dim}, {len(self.layers)} cross-attention layers"
        )


class AdapterFormatError(ValueError):
    """The state dict is not an IP-Adapter this pack can use; the message says why."""


def split_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Turn a flat `image_proj.*` / `ip_adapter.*` dict into {"image_proj": ..., "ip_adapter": ...}."""
    parts: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state_dict.items():
        head, _, rest = key.partition(".")
        if head in parts and rest:
            parts[head][rest] = value
    return parts


def _shape(sd: dict[str, torch.Tensor], key: str, rank: int | None = None) -> tuple[int, ...]:
    """The shape of image_proj tensor `key`, refusing a missing tensor or one of the wrong rank."""
    if key not in sd:
        raise AdapterFormatError(f"image_proj.{key} is missing: the projection weights are incomplete")
    shape = tuple(sd[key].shape)
    if rank is not None and len(shape) != rank:
        raise AdapterFormatError(f"image_proj.{key} has shape {list(shape)}; expected {rank} dimensions")
    return shape


def detect(parts: dict[str, dict[str, torch.Tensor]]) -> AdapterSpec:
    """Read the variant, base model, encoder and token count from a split state dict."""
    proj, ip = parts.get("image_proj", {}), parts.get("ip_adapter", {})
    if not proj or not ip:
        missing = " and ".join(n for n, d in (("image_proj", proj), ("ip_adapter", ip)) if not d)
        raise AdapterFormatError(
            f"not an IP-Adapter file: no {missing} weights (an IP-Adapter holds image_proj.* and "
            "ip_adapter.*.to_k_ip/to_v_ip tensors)"
        )
    if any(k.endswith("_lora.down.weight") for k in ip) or "perceiver_resampler.proj_in.weight" in proj:
        raise AdapterFormatError(
            "this is a FaceID IP-Adapter (ArcFace embeddings and a LoRA); FaceID needs insightface "
            "and is not supported by this pack: use a base, plus, plus-face or full-face adapter"
        )

    base_model, layers, context_dim = _detect_base(ip)
    if "latents" in proj:
        spec = _detect_resampler(proj, base_model, layers, context_dim)
    elif "proj.0.weight" in proj and "proj.3.weight" in proj:
        spec = _detect_mlp(proj, base_model, layers, context_dim)
    elif "proj.weight" in proj and "norm.weight" in proj:
        spec = _detect_linear(proj, base_model, layers, context_dim)
    else:
        raise AdapterFormatError(
            "unknown image_proj layout (keys: "
            + ", ".join(sorted(proj)[:6])
            + "); expected proj+norm (base), latents+layers (plus) or proj.0-3 (full-face)"
        )
    _check_ip_shapes(ip, spec)
    return spec


def _detect_base(ip: dict[str, torch.Tensor]) -> tuple[str, tuple[BlockKey, ...], int]:
    numbers = sorted({int(k.split(".")[0]) for k in ip if k.split(".")[0].isdigit()})
    for name, (layers, context_dim) in BASE_MODELS.items():
        if numbers == [int(ip_key(i)) for i in range(len(layers))]:
            return name, layers, context_dim
    raise AdapterFormatError(
        f"ip_adapter weights cover {len(numbers)} layers; an SD1.5 adapter has 16 (keys 1..31) "
        "and an SDXL adapter 70 (keys 1..139)"
    )


def _detect_linear(proj, base_model, layers, context_dim) -> AdapterSpec:
    out_dim, embed_dim = _shape(proj, "proj.weight", 2)
    tokens, rest = divmod(out_dim, context_dim)
    if rest or _shape(proj, "norm.weight", 1) != (context_dim,):
        raise AdapterFormatError(
            f"image_proj.proj.weight is {out_dim}x{embed_dim}: not a whole number of "
            f"{context_dim}-wide tokens for {base_model}"
        )
    return AdapterSpec(
        variant="base", base_model=base_model, projection="linear",
        encoder=encoder_name(embed_dim, "image_embeds"), encoder_output="image_embeds",
        embed_dim=embed_dim, context_dim=context_dim, tokens=tokens, layers=layers,
    )


def _detect_resampler(proj, base_model, layers, context_dim) -> AdapterSpec:
    _, tokens, dim = _shape(proj, "latents", 3)
    _, embed_dim = _shape(proj, "proj_in.weight", 2)
    out_dim = _shape(proj, "proj_out.weight", 2)[0]
    if out_dim != context_dim:
        raise AdapterFormatError(
            f"image_proj.proj_out gives {out_dim}-wide tokens but the ip_adapter layers take "
            f"{context_dim} ({base_model})"
        )
    depth = len({k.split(".")[1] for k in proj if k.startswith("layers.")})
    return AdapterSpec(
        variant="plus", base_model=base_model, projection="resampler",
        encoder=encoder_name(embed_dim, "penultimate"), encoder_output="penultimate",
        embed_dim=embed_dim, context_dim=context_dim, tokens=tokens, layers=layers,
        resampler_heads=dim // 64, resampler_depth=depth,
    )


def _detect_mlp(proj, base_model, layers, context_dim) -> AdapterSpec:
    _, embed_dim = _shape(proj, "proj.0.weight", 2)
    width = _shape(proj, "proj.2.weight", 2)[0]
    if width != context_dim:
        raise AdapterFormatError(
            f"image_proj.proj.2 gives {width}-wide tokens but the "
            f"ip_adapter layers take {context_dim} ({base_model})"
        )
    return AdapterSpec(
        variant="full-face", base_model=base_model, projection="mlp",
        encoder=encoder_name(embed_dim, "penultimate"), encoder_output="penultimate",
        embed_dim=embed_dim, context_dim=context_dim, tokens=257, layers=layers,
    )


def _check_ip_shapes(ip: dict[str, torch.Tensor], spec: AdapterSpec) -> None:
    for i in range(len(spec.layers)):
        for name in ("to_k_ip", "to_v_ip"):
            key = f"{ip_key(i)}.{name}.weight"
            if key not in ip:
                raise AdapterFormatError(f"ip_adapter.{key} is missing ({spec.base_model} adapter)")
            shape = _shape(ip, key)
            if len(shape) != 2 or shape[1] != spec.context_dim:
                raise AdapterFormatError(
                    f"ip_adapter.{key} has shape {list(shape)}; expected [hidden, {spec.context_dim}]"
                )
