"""Where IP-Adapter weights go in a UNet, and what kind of adapter a state dict holds.

An adapter file numbers its `to_k_ip`/`to_v_ip` pairs in diffusers' attention-processor
order (down blocks, up blocks, mid block; attn1 takes the even numbers, attn2 the odd ones).
ComfyUI addresses the same cross-attention layers as `(block_name, block_id, transformer_index)`.
This module is the one place that maps one onto the other, and that reads a state dict to
tell which variant it is. Detection never looks at a file name.

FaceID files (insightface ArcFace embeddings) are told apart by their keys and shapes too:
FaceID and FaceID Portrait have an MLP `proj.0`/`proj.2` + `norm` (Portrait: no LoRA, 16
tokens), FaceID Plus adds `perceiver_resampler.*`, the "unnorm" Portrait is a Resampler whose
`proj_in` takes the 512-wide ArcFace embedding. FaceID and FaceID Plus files also carry a LoRA
for every attention processor (`{i}.to_{q,k,v,out}_lora.{down,up}.weight` in `ip_adapter`).
FaceID Plus v1 and v2 have the same layout: which one a file is cannot be read from it.

XLabs' FLUX.1 IP-Adapter (v1: 4 image tokens, v2: 16) keeps its own key names,
`ip_adapter_proj_model.{proj,norm}.*` and `double_blocks.{i}.processor.ip_adapter_double_stream_
{k,v}_proj.{weight,bias}`: `split_state_dict` renames them the way diffusers' FluxIPAdapterMixin
does (`image_proj.*`, `ip_adapter.{i}.to_{k,v}_ip.*`), and `detect` tells the family from the
result: processor keys numbered from 0, one per Flux double block, with a bias and a 4096-wide
input (the T5 text width), which no UNet adapter has.
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

# FLUX.1: image tokens as wide as its T5 text tokens; the double blocks' hidden width (24 heads x 128).
FLUX_BASE_MODEL = "FLUX.1"
FLUX_CONTEXT_DIM = 4096
FLUX_HIDDEN = 3072
FLUX_DOUBLE_BLOCKS = 19  # in the published FLUX.1 dev/schnell; the adapter's depth is read from its keys
FLUX_XLABS = "flux-xlabs"
_XLABS_PROJ, _XLABS_BLOCKS = "ip_adapter_proj_model.", "double_blocks."


def flux_block(index: int) -> BlockKey:
    """The layer key of Flux double block `index` (ComfyUI's patches_replace["dit"] key is ("double_block", i))."""
    return ("double_block", index, 0)


# InstantX SD3.5-Large IP-Adapter: SigLIP so400m/384 penultimate hidden states (27 x 27 patches of 1152)
# through a time-conditioned resampler into 64 tokens as wide as the MMDiT (2432 in SD3.5 Large), and
# per joint block norm_ip / to_k_ip / to_v_ip / norm_q / norm_k / norm_ip_k. ComfyUI's MMDiT calls its
# joint blocks ("double_block", i) in patches_replace["dit"], as Flux does: the same layer keys.
SD35_INSTANTX = "sd35-instantx"
SIGLIP = "SigLIP so400m/384"
SIGLIP_WIDTH, SIGLIP_TOKENS = 1152, 729
SD35_LARGE_WIDTH = 2432  # 38 heads x 64; ComfyUI builds width // 64 joint blocks (38)

# InstantX FLUX.1-dev IP-Adapter: SigLIP so400m/384 pooler_output (1152, from the attention-pooling head)
# through an MLP (proj.0 1152 -> 2304, GELU, proj.2 -> 128 x 4096, LayerNorm `norm`) into 128 tokens of T5
# width, and per attention processor `{i}.to_k_ip/to_v_ip [3072, 4096]` without bias: FLUX.1's 19 double
# blocks first (0..18), then its 38 single blocks (19..56), diffusers' attn_processors order.
FLUX_INSTANTX = "flux-instantx"
SIGLIP_POOLED = "pooled"  # SigLIP's pooler_output (attention-pooling head), an ImageEmbeds output kind


def flux_processor(index: int) -> BlockKey:
    """The layer key of InstantX FLUX.1 processor `index`: the model's double blocks first, then its single ones."""
    return ("flux_block", index, 0)


# What each CLIP vision tower gives, by size: image_embeds width and penultimate width.
ENCODERS = {
    "ViT-L": {"image_embeds": 768, "penultimate": 1024},
    "ViT-H": {"image_embeds": 1024, "penultimate": 1280},
    "ViT-bigG": {"image_embeds": 1280, "penultimate": 1664},
}


# The face input of FaceID adapters: insightface's ArcFace recognition embedding.
ARCFACE_DIM = 512
FACE_OUTPUTS = {
    "arcface": "insightface normed_embedding (unit length)",
    "arcface_raw": "insightface embedding, not normalised",
}
LORA_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")
# Kolors' text context (ChatGLM hidden states): the width of a Kolors FaceID adapter's image tokens.
KOLORS_CONTEXT_DIM = 4096


def encoder_name(width: int, output: str) -> str:
    """Name the CLIP vision tower whose `output` ('image_embeds' or 'penultimate') is `width` wide."""
    for name, widths in ENCODERS.items():
        if widths[output] == width:
            return name
    return f"an unknown encoder ({width} wide)"


def ip_key(layer_index: int) -> str:
    """State-dict number of the attn2 processor at `layer_index` in processor order."""
    return str(2 * layer_index + 1)


def lora_key(processor: int, projection: str, part: str) -> str:
    """`ip_adapter` key of a FaceID LoRA matrix: processor number (attn1 2n, attn2 2n+1), to_q/k/v/out, down/up."""
    return f"{processor}.{projection}_lora.{part}.weight"


@dataclass(frozen=True)
class AdapterSpec:
    """What an IP-Adapter state dict is, read from its keys and shapes alone."""

    # "base", "plus", "full-face"; FaceID: "faceid", "faceid-plus" (v1 or v2: one layout),
    # "faceid-portrait", "faceid-portrait-unnorm"
    variant: str
    base_model: str  # "SD1.5" or "SDXL"
    # "linear", "resampler", "mlp"; FaceID: "faceid-mlp", "faceid-plus", "faceid-resampler"
    projection: str
    encoder: str  # "ViT-H", "ViT-bigG", ...; "ArcFace" for FaceID
    # "image_embeds" or "penultimate"; FaceID: "arcface" (normed_embedding) or "arcface_raw" (unnorm portrait)
    encoder_output: str
    embed_dim: int  # width the projection takes (512 for FaceID: the face embedding)
    context_dim: int  # width of an image token (= the text context width)
    tokens: int  # image tokens per reference image / per face (257 for full-face: one per patch + class)
    layers: tuple[BlockKey, ...]
    resampler_heads: int = 0
    resampler_depth: int = 0
    crop_encoder: str = ""  # FaceID Plus: CLIP tower for the aligned face crop ("ViT-H"); "" = no crop
    crop_embed_dim: int = 0  # FaceID Plus: its penultimate width (1280)
    lora_rank: int = 0  # rank of the LoRA the file carries for every attention processor; 0 = none
    family: str = "unet"  # "unet" (SD1.5/SDXL cross-attention), FLUX_XLABS (Flux double blocks) or SD35_INSTANTX

    @property
    def is_flux(self) -> bool:
        return self.family == FLUX_XLABS

    @property
    def is_flux_instantx(self) -> bool:
        """InstantX FLUX.1: layers are Flux blocks, double blocks first, then single ones (FLUX.1: 19 + 38)."""
        return self.family == FLUX_INSTANTX

    @property
    def is_sd3(self) -> bool:
        """InstantX SD3.5: layers are MMDiT joint blocks, context_dim their width, tokens per reference."""
        return self.family == SD35_INSTANTX

    @property
    def depth(self) -> int:
        """Flux: how many double blocks the adapter covers (19 in the published files)."""
        return len(self.layers)

    @property
    def uses_hidden_states(self) -> bool:
        return self.encoder_output == "penultimate"

    @property
    def is_faceid(self) -> bool:
        return self.encoder_output in FACE_OUTPUTS

    @property
    def face_input(self) -> str:
        """"arcface" (insightface normed_embedding) or "arcface_raw" (its embedding); "" if not FaceID."""
        return self.encoder_output if self.is_faceid else ""

    @property
    def needs_face_crop(self) -> bool:
        """FaceID Plus: also takes CLIP penultimate hidden states of the aligned face crop."""
        return bool(self.crop_encoder)

    @property
    def has_lora(self) -> bool:
        return self.lora_rank > 0

    def describe(self) -> str:
        if self.is_flux_instantx:
            return (
                f"InstantX IP-Adapter for {self.base_model}: MLP projection of {self.encoder} {self.encoder_output} "
                f"({self.embed_dim}) into {self.tokens} tokens of {self.context_dim}, "
                f"{self.depth} Flux blocks (double blocks first, then single ones: 19 + 38 in FLUX.1)"
            )
        if self.is_sd3:
            return (
                f"InstantX IP-Adapter for {self.base_model}: time-conditioned resampler ({self.resampler_depth} "
                f"layers, {self.resampler_heads} heads) of {self.encoder} {self.encoder_output} hidden states "
                f"({self.embed_dim}) into {self.tokens} tokens of {self.context_dim}, {self.depth} joint blocks"
            )
        if self.is_flux:
            return (
                f"XLabs IP-Adapter for {self.base_model} ({self.variant}): linear projection of {self.encoder} "
                f"{self.encoder_output} ({self.embed_dim}) into {self.tokens} tokens of {self.context_dim}, "
                f"{self.depth} double blocks"
            )
        if self.is_faceid:
            crop = (f" and {self.crop_encoder} penultimate states of the aligned face crop ({self.crop_embed_dim})"
                    if self.needs_face_crop else "")
            lora = f", LoRA rank {self.lora_rank} on every attention layer" if self.has_lora else ", no LoRA"
            plus = "; FaceID Plus v1 and v2 share this layout (v2 = shortcut)" if self.needs_face_crop else ""
            return (
                f"IP-Adapter {self.variant} for {self.base_model}: {self.projection} projection of the ArcFace "
                f"face embedding ({self.embed_dim}, {FACE_OUTPUTS[self.encoder_output]}){crop} into "
                f"{self.tokens} tokens of {self.context_dim} per face{lora}, {len(self.layers)} "
                f"cross-attention layers{plus}"
            )
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
        elif key.startswith(_XLABS_PROJ):
            parts["image_proj"][key.removeprefix(_XLABS_PROJ)] = value
        elif key.startswith(_XLABS_BLOCKS):
            parts["ip_adapter"][_xlabs_block_key(key.removeprefix(_XLABS_BLOCKS))] = value
    return parts


def _xlabs_block_key(rest: str) -> str:
    """`{i}.processor.ip_adapter_double_stream_k_proj.weight` -> `{i}.to_k_ip.weight` (as diffusers renames it)."""
    return (rest.replace("processor.", "", 1)
            .replace("ip_adapter_double_stream_k_proj", "to_k_ip")
            .replace("ip_adapter_double_stream_v_proj", "to_v_ip"))


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
    _refuse_kolors_faceid(proj)
    if not proj or not ip:
        missing = " and ".join(n for n, d in (("image_proj", proj), ("ip_adapter", ip)) if not d)
        raise AdapterFormatError(
            f"not an IP-Adapter file: no {missing} weights (an IP-Adapter holds image_proj.* and "
            "ip_adapter.*.to_k_ip/to_v_ip tensors)"
        )

    if _is_flux_instantx(proj, ip):  # before XLabs: its blocks are numbered 0, 1, 2, ... too
        return _detect_flux_instantx(proj, ip)
    if _is_sd35_instantx(proj):  # before XLabs: its blocks are numbered 0, 1, 2, ... too
        return _detect_sd35_instantx(proj, ip)
    if _is_xlabs_flux(ip):
        return _detect_xlabs_flux(proj, ip)
    base_model, layers, context_dim = _detect_base(ip)
    if _is_faceid_projection(proj):
        try:
            spec = _detect_faceid(proj, ip, base_model, layers, context_dim)
        except _IncompleteFaceID as e:
            raise AdapterFormatError(f"incomplete FaceID IP-Adapter (its layout is not supported): {e}") from None
    elif any("_lora." in k for k in ip):
        raise AdapterFormatError(
            "ip_adapter holds LoRA weights (*_lora.down/up, as FaceID files do) but image_proj is not a FaceID "
            "projection (keys: " + ", ".join(sorted(proj)[:6]) + "): not a FaceID IP-Adapter layout this pack knows"
        )
    elif "latents" in proj:
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
    # FaceID LoRA keys number every processor (attn1 too); the layer count comes from the IP pairs.
    numbers = sorted({int(k.split(".")[0]) for k in ip if k.split(".")[0].isdigit() and "_lora." not in k})
    for name, (layers, context_dim) in BASE_MODELS.items():
        if numbers == [int(ip_key(i)) for i in range(len(layers))]:
            return name, layers, context_dim
    raise AdapterFormatError(
        f"ip_adapter weights cover {len(numbers)} layers; an SD1.5 adapter has 16 (keys 1..31) "
        "and an SDXL adapter 70 (keys 1..139)"
    )


# --------------------------------------------------------------------------------------------
# FaceID
# --------------------------------------------------------------------------------------------


class _IncompleteFaceID(AdapterFormatError):
    """A FaceID-looking image_proj with a tensor missing or of the wrong rank."""


def _is_faceid_projection(proj: dict[str, torch.Tensor]) -> bool:
    if any(k.startswith("perceiver_resampler.") for k in proj):
        return True  # FaceID Plus (v1 / v2)
    if "proj.0.weight" in proj and "norm.weight" in proj and "proj.3.weight" not in proj:
        return True  # FaceID, FaceID Portrait: MLP + norm (full-face has proj.3 and no norm)
    weight = proj.get("proj_in.weight")
    # Portrait "unnorm": a Resampler reading the ArcFace embedding (no CLIP output is 512 wide).
    return "latents" in proj and weight is not None and weight.ndim == 2 and weight.shape[1] == ARCFACE_DIM


def _refuse_kolors_faceid(proj: dict[str, torch.Tensor]) -> None:
    widths = {
        proj[k].shape[0]
        for k in ("norm.weight", "perceiver_resampler.proj_out.weight", "perceiver_resampler.norm_out.weight")
        if k in proj and proj[k].ndim >= 1
    }
    if any(k.startswith("perceiver_resampler.") for k in proj) and KOLORS_CONTEXT_DIM in widths:
        raise AdapterFormatError(
            f"this is a Kolors FaceID Plus IP-Adapter: its image tokens are {KOLORS_CONTEXT_DIM} wide (Kolors' "
            "ChatGLM text width) and reach the UNet through Kolors' own encoder_hid_proj; Kolors is not "
            "supported by this pack (SD1.5 and SDXL adapters only)"
        )


def _need(sd: dict[str, torch.Tensor], key: str, rank: int) -> tuple[int, ...]:
    try:
        return _shape(sd, key, rank)
    except AdapterFormatError as e:
        raise _IncompleteFaceID(str(e)) from None


def _detect_faceid(proj, ip, base_model, layers, context_dim) -> AdapterSpec:
    common = dict(base_model=base_model, encoder="ArcFace", context_dim=context_dim, layers=layers,
                  lora_rank=_detect_lora(ip, layers, context_dim))
    if "latents" in proj:
        return _detect_faceid_resampler(proj, base_model, context_dim, common)
    hidden, face_dim = _need(proj, "proj.0.weight", 2)
    out_dim, hidden_in = _need(proj, "proj.2.weight", 2)
    (width,) = _need(proj, "norm.weight", 1)
    if face_dim != ARCFACE_DIM or hidden_in != hidden:
        raise AdapterFormatError(
            f"image_proj.proj.0/proj.2 are {hidden}x{face_dim} and {out_dim}x{hidden_in}: a FaceID projection "
            f"takes the {ARCFACE_DIM}-wide ArcFace embedding through one hidden layer"
        )
    tokens, rest = divmod(out_dim, width)
    if rest:
        raise AdapterFormatError(f"image_proj.proj.2 gives {out_dim} values: not a whole number of {width}-wide tokens")
    if not any(k.startswith("perceiver_resampler.") for k in proj):
        if width != context_dim:
            raise AdapterFormatError(
                f"image_proj.norm gives {width}-wide tokens but the ip_adapter layers take {context_dim} ({base_model})"
            )
        variant = "faceid" if common["lora_rank"] else "faceid-portrait"
        return AdapterSpec(variant=variant, projection="faceid-mlp", encoder_output="arcface",
                           embed_dim=face_dim, tokens=tokens, **common)

    pr = "perceiver_resampler."
    dim, crop_dim = _need(proj, pr + "proj_in.weight", 2)
    out_width = _need(proj, pr + "proj_out.weight", 2)[0]
    if out_width != context_dim:
        raise AdapterFormatError(
            f"image_proj.perceiver_resampler.proj_out gives {out_width}-wide tokens but the ip_adapter layers "
            f"take {context_dim} ({base_model})"
        )
    if not width == dim == out_width:
        raise AdapterFormatError(
            f"FaceID Plus face tokens are {width} wide, its perceiver works at {dim} and gives {out_width}: "
            "they must agree (the v2 shortcut adds face tokens to the perceiver's output)"
        )
    depth = len({k.split(".")[2] for k in proj if k.startswith(pr + "layers.")})
    heads = _need(proj, pr + "layers.0.0.to_q.weight", 2)[0] // 64
    return AdapterSpec(variant="faceid-plus", projection="faceid-plus", encoder_output="arcface",
                       embed_dim=face_dim, tokens=tokens, resampler_heads=heads, resampler_depth=depth,
                       crop_encoder=encoder_name(crop_dim, "penultimate"), crop_embed_dim=crop_dim, **common)


def _detect_faceid_resampler(proj, base_model, context_dim, common) -> AdapterSpec:
    _, tokens, dim = _need(proj, "latents", 3)
    _, face_dim = _need(proj, "proj_in.weight", 2)
    out_width = _need(proj, "proj_out.weight", 2)[0]
    if out_width != context_dim:
        raise AdapterFormatError(
            f"image_proj.proj_out gives {out_width}-wide tokens but the ip_adapter layers take {context_dim} "
            f"({base_model})"
        )
    depth = len({k.split(".")[1] for k in proj if k.startswith("layers.")})
    heads = _need(proj, "layers.0.0.to_q.weight", 2)[0] // 64
    return AdapterSpec(variant="faceid-portrait-unnorm", projection="faceid-resampler", encoder_output="arcface_raw",
                       embed_dim=face_dim, tokens=tokens, resampler_heads=heads, resampler_depth=depth, **common)


def _detect_lora(ip: dict[str, torch.Tensor], layers: tuple[BlockKey, ...], context_dim: int) -> int:
    """Rank of the FaceID LoRA in `ip` (0 if none), after checking it covers every processor exactly."""
    found = {k for k in ip if "_lora." in k}
    if not found:
        return 0
    expected: set[str] = set()
    rank = None
    for i in range(len(layers)):
        kv = ip.get(f"{ip_key(i)}.to_k_ip.weight")
        if kv is None or kv.ndim != 2:
            raise AdapterFormatError(f"ip_adapter.{ip_key(i)}.to_k_ip.weight is missing or not a matrix")
        hidden = kv.shape[0]
        for processor, kv_in in ((2 * i, hidden), (2 * i + 1, context_dim)):
            for name in LORA_PROJECTIONS:
                d_in = kv_in if name in ("to_k", "to_v") else hidden
                down_key, up_key = lora_key(processor, name, "down"), lora_key(processor, name, "up")
                expected.update((down_key, up_key))
                for key in (down_key, up_key):
                    if key not in ip:
                        raise AdapterFormatError(
                            f"ip_adapter.{key} is missing: a FaceID LoRA covers every attention processor "
                            f"(0..{2 * len(layers) - 1}) with to_q/to_k/to_v/to_out down and up"
                        )
                down, up = ip[down_key], ip[up_key]
                r = down.shape[0] if down.ndim == 2 else -1
                rank = r if rank is None else rank
                if down.shape != (rank, d_in) or up.shape != (hidden, rank):
                    raise AdapterFormatError(
                        f"ip_adapter.{down_key} / .up have shapes {list(down.shape)} / {list(up.shape)}; expected "
                        f"[{rank}, {d_in}] / [{hidden}, {rank}] (rank {rank} LoRA on a {hidden}-wide layer)"
                    )
    unknown = sorted(found - expected)
    if unknown:
        raise AdapterFormatError(
            f"ip_adapter holds LoRA keys this layout does not have: {', '.join(unknown[:4])}"
            + (" ..." if len(unknown) > 4 else "")
        )
    return int(rank)


# --------------------------------------------------------------------------------------------
# Plain IP-Adapters
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# XLabs FLUX.1
# --------------------------------------------------------------------------------------------


def _is_xlabs_flux(ip: dict[str, torch.Tensor]) -> bool:
    # UNet adapters number their processors 1, 3, 5, ... (attn2 only) and have no bias; XLabs'
    # double-block processors are 0, 1, 2, ... with a bias.
    return "0.to_k_ip.weight" in ip or any(k.endswith(("to_k_ip.bias", "to_v_ip.bias")) for k in ip)


def _detect_xlabs_flux(proj: dict[str, torch.Tensor], ip: dict[str, torch.Tensor]) -> AdapterSpec:
    out_dim, embed_dim = _shape(proj, "proj.weight", 2)
    norm = _shape(proj, "norm.weight", 1)
    if _shape(proj, "proj.bias", 1) != (out_dim,) or _shape(proj, "norm.bias", 1) != norm:
        raise AdapterFormatError("ip_adapter_proj_model.proj/norm biases do not match their weights")
    tokens, rest = divmod(out_dim, FLUX_CONTEXT_DIM)
    if rest or norm != (FLUX_CONTEXT_DIM,):
        raise AdapterFormatError(
            f"ip_adapter_proj_model.proj.weight is {out_dim}x{embed_dim} with a {norm[0]}-wide norm: an XLabs FLUX.1 "
            f"IP-Adapter gives whole {FLUX_CONTEXT_DIM}-wide tokens (4 for v1, 16 for v2)"
        )
    if embed_dim != ENCODERS["ViT-L"]["image_embeds"]:
        raise AdapterFormatError(
            f"ip_adapter_proj_model.proj takes {embed_dim}-wide embeddings "
            f"({encoder_name(embed_dim, 'image_embeds')}); "
            f"XLabs FLUX.1 IP-Adapters take CLIP ViT-L/14 image_embeds ({ENCODERS['ViT-L']['image_embeds']})"
        )
    blocks = sorted({int(k.split(".")[0]) for k in ip if k.split(".")[0].isdigit()})
    if not blocks or blocks != list(range(len(blocks))):
        raise AdapterFormatError(
            f"double_blocks.* processors are numbered {blocks[:6]}{' ...' if len(blocks) > 6 else ''}: an XLabs FLUX.1 "
            "IP-Adapter has one per double block, 0, 1, 2, ... without gaps"
        )
    expected = {f"{i}.{name}.{part}" for i in blocks for name in ("to_k_ip", "to_v_ip") for part in ("weight", "bias")}
    if set(ip) != expected:
        odd = sorted(set(ip) ^ expected)
        raise AdapterFormatError(
            "double_blocks.* do not hold exactly ip_adapter_double_stream_{k,v}_proj.{weight,bias} per block "
            f"(missing or unknown: {', '.join(odd[:4])}{' ...' if len(odd) > 4 else ''})"
        )
    for key in sorted(expected):
        shape = tuple(ip[key].shape)
        want = (FLUX_HIDDEN, FLUX_CONTEXT_DIM) if key.endswith("weight") else (FLUX_HIDDEN,)
        if shape != want:
            raise AdapterFormatError(
                f"double_blocks.{key.split('.')[0]} {key.split('.', 1)[1]} has shape {list(shape)}; expected "
                f"{list(want)} (FLUX.1's {FLUX_HIDDEN}-wide double blocks, {FLUX_CONTEXT_DIM}-wide image tokens)"
            )
    return AdapterSpec(
        variant={4: "v1", 16: "v2"}.get(tokens, f"{tokens} tokens"), base_model=FLUX_BASE_MODEL,
        projection="linear", encoder="ViT-L", encoder_output="image_embeds", embed_dim=embed_dim,
        context_dim=FLUX_CONTEXT_DIM, tokens=tokens, layers=tuple(flux_block(i) for i in blocks), family=FLUX_XLABS,
    )


# --------------------------------------------------------------------------------------------
# InstantX SD3.5 Large
# --------------------------------------------------------------------------------------------


def _is_sd35_instantx(proj: dict[str, torch.Tensor]) -> bool:
    # The only image projection with a time embedding of its own.
    return any(k.startswith("time_embedding.") for k in proj)


def _sd35_block_shapes(width: int, head_dim: int, time_dim: int) -> dict[str, tuple[int, ...]]:
    return {"norm_ip.linear.weight": (2 * width, time_dim), "norm_ip.linear.bias": (2 * width,),
            "to_k_ip.weight": (width, width), "to_v_ip.weight": (width, width),
            "norm_q.weight": (head_dim,), "norm_k.weight": (head_dim,), "norm_ip_k.weight": (head_dim,)}


def _detect_sd35_instantx(proj: dict[str, torch.Tensor], ip: dict[str, torch.Tensor]) -> AdapterSpec:
    _, tokens, dim = _shape(proj, "latents", 3)
    inner, embed_dim = _shape(proj, "proj_in.weight", 2)
    width, inner_out = _shape(proj, "proj_out.weight", 2)
    time_out, _ = _shape(proj, "time_embedding.linear_1.weight", 2)
    if not dim == inner == inner_out == time_out:
        raise AdapterFormatError(
            f"image_proj latents ({dim}), proj_in ({inner}), proj_out ({inner_out}) and time_embedding ({time_out}) "
            "disagree on the resampler's width: not an InstantX SD3.5 IP-Adapter layout"
        )
    if embed_dim != SIGLIP_WIDTH:
        raise AdapterFormatError(
            f"image_proj.proj_in takes {embed_dim}-wide hidden states ({encoder_name(embed_dim, 'penultimate')}); the "
            f"InstantX SD3.5 IP-Adapter takes {SIGLIP} penultimate hidden states ({SIGLIP_TOKENS} x {SIGLIP_WIDTH})"
        )
    # InstantX's names (layers.{i}.0.to_q) or diffusers' converted ones (layers.{i}.attn.to_q).
    q_key = next((k for k in ("layers.0.0.to_q.weight", "layers.0.attn.to_q.weight") if k in proj),
                 "layers.0.0.to_q.weight")
    heads = _shape(proj, q_key, 2)[0] // 64
    depth = len({k.split(".")[1] for k in proj if k.startswith("layers.")})
    blocks = sorted({int(k.split(".")[0]) for k in ip if k.split(".")[0].isdigit()})
    if not blocks or blocks != list(range(len(blocks))):
        raise AdapterFormatError(
            f"ip_adapter blocks are numbered {blocks[:6]}{' ...' if len(blocks) > 6 else ''}: the InstantX SD3.5 "
            "IP-Adapter has one per joint block, 0, 1, 2, ... without gaps"
        )
    head_dim = _shape(ip, "0.norm_q.weight", 1)[0] if "0.norm_q.weight" in ip else 0
    if not head_dim or width % head_dim:
        raise AdapterFormatError(f"ip_adapter.0.norm_q.weight is missing or does not divide the {width}-wide blocks")
    want = _sd35_block_shapes(width, head_dim, dim)
    expected = {f"{i}.{name}" for i in blocks for name in want}
    if set(ip) != expected:
        odd = sorted(set(ip) ^ expected)
        raise AdapterFormatError(
            "ip_adapter.{i} do not hold exactly norm_ip.linear, to_k_ip, to_v_ip, norm_q, norm_k and norm_ip_k per "
            f"joint block (missing or unknown: {', '.join(odd[:4])}{' ...' if len(odd) > 4 else ''})"
        )
    for key in sorted(expected):
        shape = tuple(ip[key].shape)
        if shape != want[key.split(".", 1)[1]]:
            raise AdapterFormatError(
                f"ip_adapter.{key} has shape {list(shape)}; expected {list(want[key.split('.', 1)[1]])} ({width}-wide "
                f"joint blocks of {head_dim}-wide heads, a {dim}-wide time embedding)"
            )
    base = "SD3.5 Large" if width == SD35_LARGE_WIDTH else f"SD3 ({width} wide)"
    return AdapterSpec(
        variant="instantx", base_model=base, projection="time-resampler", encoder=SIGLIP,
        encoder_output="penultimate", embed_dim=embed_dim, context_dim=width, tokens=tokens,
        layers=tuple(flux_block(i) for i in blocks), resampler_heads=heads, resampler_depth=depth,
        family=SD35_INSTANTX,
    )


# --------------------------------------------------------------------------------------------
# InstantX FLUX.1-dev
# --------------------------------------------------------------------------------------------


def _is_flux_instantx(proj: dict[str, torch.Tensor], ip: dict[str, torch.Tensor]) -> bool:
    # An MLP projection whose output is cut into T5-wide tokens, and processors numbered from 0 without
    # bias: full-face has proj.3 and odd numbers, FaceID's MLP feeds 768/2048-wide UNet tokens.
    norm = proj.get("norm.weight")
    return ("proj.0.weight" in proj and "proj.2.weight" in proj and "proj.3.weight" not in proj
            and norm is not None and tuple(norm.shape) == (FLUX_CONTEXT_DIM,) and "0.to_k_ip.weight" in ip)


def _detect_flux_instantx(proj: dict[str, torch.Tensor], ip: dict[str, torch.Tensor]) -> AdapterSpec:
    inner, embed_dim = _shape(proj, "proj.0.weight", 2)
    out_dim, inner_in = _shape(proj, "proj.2.weight", 2)
    if _shape(proj, "proj.0.bias", 1) != (inner,) or _shape(proj, "proj.2.bias", 1) != (out_dim,):
        raise AdapterFormatError("image_proj.proj.0/proj.2 biases do not match their weights")
    if _shape(proj, "norm.bias", 1) != (FLUX_CONTEXT_DIM,):
        raise AdapterFormatError(f"image_proj.norm.bias is not {FLUX_CONTEXT_DIM} wide like its weight")
    tokens, rest = divmod(out_dim, FLUX_CONTEXT_DIM)
    if rest or inner_in != inner:
        raise AdapterFormatError(
            f"image_proj.proj.2.weight is {out_dim}x{inner_in} after a {inner}-wide proj.0: the InstantX FLUX.1 "
            f"IP-Adapter's MLP gives whole {FLUX_CONTEXT_DIM}-wide tokens (128) from proj.0's output"
        )
    if embed_dim != SIGLIP_WIDTH:
        raise AdapterFormatError(
            f"image_proj.proj.0 takes {embed_dim}-wide embeddings ({encoder_name(embed_dim, 'image_embeds')}); the "
            f"InstantX FLUX.1 IP-Adapter takes {SIGLIP} pooled embeddings ({SIGLIP_WIDTH})"
        )
    blocks = sorted({int(k.split(".")[0]) for k in ip if k.split(".")[0].isdigit()})
    if not blocks or blocks != list(range(len(blocks))):
        raise AdapterFormatError(
            f"ip_adapter processors are numbered {blocks[:6]}{' ...' if len(blocks) > 6 else ''}: the InstantX FLUX.1 "
            "IP-Adapter has one per Flux block, 0, 1, 2, ... without gaps"
        )
    expected = {f"{i}.{name}.weight" for i in blocks for name in ("to_k_ip", "to_v_ip")}
    if set(ip) != expected:
        odd = sorted(set(ip) ^ expected)
        raise AdapterFormatError(
            "ip_adapter.{i} do not hold exactly to_k_ip.weight and to_v_ip.weight per Flux block, without bias "
            f"(missing or unknown: {', '.join(odd[:4])}{' ...' if len(odd) > 4 else ''})"
        )
    for key in sorted(expected):
        if tuple(ip[key].shape) != (FLUX_HIDDEN, FLUX_CONTEXT_DIM):
            raise AdapterFormatError(
                f"ip_adapter.{key} has shape {list(ip[key].shape)}; expected {[FLUX_HIDDEN, FLUX_CONTEXT_DIM]} "
                f"(FLUX.1's {FLUX_HIDDEN}-wide blocks, {FLUX_CONTEXT_DIM}-wide image tokens)"
            )
    layers = tuple(flux_processor(i) for i in blocks)  # which are double or single: the model says
    return AdapterSpec(
        variant="instantx", base_model=FLUX_BASE_MODEL, projection="mlp-tokens", encoder=SIGLIP,
        encoder_output=SIGLIP_POOLED, embed_dim=embed_dim, context_dim=FLUX_CONTEXT_DIM, tokens=tokens,
        layers=layers, family=FLUX_INSTANTX,
    )
