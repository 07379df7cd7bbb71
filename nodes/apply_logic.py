"""Turning a loaded adapter plus image encodings into a patched MODEL (no node plumbing here)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..ip_adapter_core.attention import IPApplication
from ..ip_adapter_core.embeds import ImageEmbeds, combine, concat_tokens
from ..ip_adapter_core.masks import check_mask
from ..ip_adapter_core.schedule import SigmaRange, check_fractions
from .host import LoadedAdapter, patch_model


def check_embeds(adapter: LoadedAdapter, embeds: ImageEmbeds) -> None:
    spec = adapter.spec
    if embeds.output != spec.encoder_output or embeds.width != spec.embed_dim:
        raise ValueError(
            f"{adapter.name} takes {spec.encoder} {spec.encoder_output} of {spec.embed_dim}; these embeds are "
            f"{embeds.output} of {embeds.width}: encode the image for this adapter (same CLIP vision model)"
        )


def image_tokens(adapter: LoadedAdapter, embeds: ImageEmbeds, combine_embeds: str,
                 one_per_latent: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Cond and uncond image tokens, [1 or N, T, C] each, ready for the attention patch."""
    check_embeds(adapter, embeds)
    cond, uncond = embeds.cond, embeds.uncond.expand(embeds.count, *embeds.uncond.shape[1:])
    if combine_embeds != "concat" and not one_per_latent and embeds.count > 1:
        cond, uncond = combine(cond, combine_embeds), combine(uncond, combine_embeds)
    cond_tokens = adapter.model.image_tokens(cond)
    uncond_tokens = adapter.model.image_tokens(uncond)
    if one_per_latent:
        return cond_tokens, uncond_tokens
    return concat_tokens(cond_tokens), concat_tokens(uncond_tokens)


def apply_adapter(model, adapter: LoadedAdapter, embeds: ImageEmbeds, weight: float = 1.0,
                  weight_type: str = "V only", start_at: float = 0.0, end_at: float = 1.0,
                  combine_embeds: str = "concat", attn_mask: torch.Tensor | None = None,
                  layer_weights: Sequence[float] | None = None, one_per_latent: bool = False):
    """A patched clone of `model`; every check runs before anything is built."""
    check_fractions(start_at, end_at)
    if layer_weights is not None and len(layer_weights) != len(adapter.spec.layers):
        raise ValueError(f"{len(layer_weights)} layer weights for {len(adapter.spec.layers)} adapter layers")
    mask = None if attn_mask is None else check_mask(attn_mask)
    cond_tokens, uncond_tokens = image_tokens(adapter, embeds, combine_embeds, one_per_latent)
    sampling = model.get_model_object("model_sampling")
    application = IPApplication(
        adapter=adapter.model,
        cond_tokens=cond_tokens,
        uncond_tokens=uncond_tokens,
        weight=weight,
        weight_type=weight_type,
        layer_weights=None if layer_weights is None else tuple(layer_weights),
        sigmas=SigmaRange(sampling.percent_to_sigma(start_at), sampling.percent_to_sigma(end_at)),
        mask=mask,
        host_models=(adapter.patcher,),
    )
    return patch_model(model, adapter, application)
