"""The learned half of an IP-Adapter: a projection model and one to_k_ip/to_v_ip pair per layer.

FaceID files also carry a LoRA for every attention processor of the UNet: it is kept as plain
tensors (`IPAdapterModel.lora`), to be applied to the UNet's own weights (`lora_patches()`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ip_adapter_core.faceid_lora import lora_patches
from ..ip_adapter_core.layout import AdapterSpec, detect, ip_key, split_state_dict
from .faceid_proj import FaceIDPlusProjection, FaceIDPortraitResampler, FaceIDProjection
from .flux_instantx import FluxInstantXAdapterModel
from .image_proj import LinearProjection, MLPProjection, Resampler
from .sd3_adapter import SD3IPAdapterModel
from .state_dicts import assign_weights, checked_flat


class IPKeyValue(nn.Module):
    """The image key/value projections added to one layer: no bias in UNet adapters (one
    cross-attention layer each); with a bias in XLabs FLUX.1 adapters (one Flux double block each)."""

    def __init__(self, hidden_dim: int, context_dim: int, bias: bool = False):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, hidden_dim, bias=bias)
        self.to_v_ip = nn.Linear(context_dim, hidden_dim, bias=bias)


def build_projection(spec: AdapterSpec, proj_sd: dict[str, torch.Tensor]) -> nn.Module:
    """The projection model `spec` describes, with the sizes of `proj_sd` (the file's image_proj)."""
    if spec.projection == "linear":
        return LinearProjection(spec.embed_dim, spec.context_dim, spec.tokens)
    if spec.projection == "mlp":
        return MLPProjection(spec.embed_dim, spec.context_dim)
    if spec.projection == "faceid-mlp":
        hidden = proj_sd["proj.0.weight"].shape[0]
        return FaceIDProjection(spec.embed_dim, hidden, spec.context_dim, spec.tokens)
    if spec.projection == "faceid-plus":
        hidden = proj_sd["proj.0.weight"].shape[0]
        dim = proj_sd["norm.weight"].shape[0]
        return FaceIDPlusProjection(spec.embed_dim, hidden, dim, spec.tokens, spec.resampler_depth,
                                    spec.resampler_heads, spec.crop_embed_dim, spec.context_dim)
    dim = proj_sd["latents"].shape[-1]
    cls = FaceIDPortraitResampler if spec.projection == "faceid-resampler" else Resampler
    return cls(dim, spec.resampler_depth, spec.resampler_heads, spec.tokens, spec.embed_dim, spec.context_dim)


class IPAdapterModel(nn.Module):
    """`image_proj` and `ip_adapter` mirror the two halves of the weight file, key for key.

    A FaceID LoRA (`ip_adapter.{i}.to_*_lora.*`) is not a module: it lives in `self.lora`.
    """

    def __init__(self, spec: AdapterSpec, parts: dict[str, dict[str, torch.Tensor]]):
        super().__init__()
        self.spec = spec
        self.lora: dict[str, torch.Tensor] = {}
        self.image_proj = build_projection(spec, parts["image_proj"])
        self.ip_adapter = nn.ModuleDict({
            self._key(i): IPKeyValue(parts["ip_adapter"][f"{self._key(i)}.to_k_ip.weight"].shape[0], spec.context_dim,
                                     bias=spec.is_flux)
            for i in range(len(spec.layers))
        })

    def _key(self, layer_index: int) -> str:
        # Flux double blocks are numbered 0, 1, 2, ...; UNet adapters number attn2 processors 2n+1.
        return str(layer_index) if self.spec.is_flux else ip_key(layer_index)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> IPAdapterModel:
        """Build from a flat (`image_proj.` / `ip_adapter.` prefixed) or nested state dict."""
        parts = state_dict if "image_proj" in state_dict else split_state_dict(state_dict)
        spec = detect(parts)
        if spec.is_sd3:  # a time-conditioned resampler and joint-block modules: models/sd3_adapter.py
            return SD3IPAdapterModel.from_parts(spec, parts)
        if spec.is_flux_instantx:  # a pooled-embedding MLP, k/v per Flux block: models/flux_instantx.py
            return FluxInstantXAdapterModel.from_parts(spec, parts)
        with torch.device("meta"):
            model = cls(spec, parts)
        flat = checked_flat(parts)
        model.lora = {k.removeprefix("ip_adapter."): flat.pop(k) for k in list(flat)
                      if k.startswith("ip_adapter.") and "_lora." in k}
        return assign_weights(model, flat, spec)

    def key_value(self, layer_index: int) -> IPKeyValue:
        return self.ip_adapter[self._key(layer_index)]

    def lora_patches(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{ComfyUI UNet weight key: (up, down)} of the file's LoRA (empty if it has none); delta = up @ down."""
        return lora_patches(self.lora, self.spec.layers) if self.lora else {}

    @torch.no_grad()
    def image_tokens(self, encoding: torch.Tensor, dtype: torch.dtype | None = None,
                     device: torch.device | None = None, *, crop_states: torch.Tensor | None = None,
                     shortcut: bool | None = None, s_scale: float = 1.0) -> torch.Tensor:
        """Project an encoding to image tokens [B, T, context_dim].

        encoding: image_embeds [B, D] or hidden states [B, 257, D]; for FaceID adapters the ArcFace
        face embeddings [N, 512] (one row per face; the unnorm portrait takes the raw embedding).
        FaceID Plus also takes `crop_states`, the CLIP penultimate hidden states of each face's
        aligned crop [N, 257, 1280], and `shortcut`: False for FaceID Plus (v1), True for Plus v2
        (tokens = face tokens + s_scale * perceiver output). The file cannot tell v1 from v2, so
        `shortcut` must be given; `s_scale` only counts with the shortcut.

        Runs in `dtype` on `device` (default: where the weights are). The weights are cast for
        this call only: the one stored copy stays as it is.
        """
        plus = self.spec.needs_face_crop
        if plus and (crop_states is None or shortcut is None):
            raise ValueError(
                "a FaceID Plus adapter takes the face embeddings, the CLIP penultimate hidden states of the aligned "
                "face crops (crop_states) and shortcut: False for FaceID Plus, True for FaceID Plus v2 (both have "
                "the same weights layout, so the file cannot tell)"
            )
        if not plus and (crop_states is not None or shortcut is not None):
            raise ValueError(f"crop_states and shortcut are for FaceID Plus adapters; this is {self.spec.variant}")
        weight = next(self.image_proj.parameters())
        dtype, device = dtype or weight.dtype, device or weight.device
        state = {name: t.to(device, dtype) for name, t in self.image_proj.state_dict().items()}
        args: tuple = (encoding.to(device, dtype),)
        if plus:
            args += (crop_states.to(device, dtype), bool(shortcut), float(s_scale))
        return torch.func.functional_call(self.image_proj, state, args)
