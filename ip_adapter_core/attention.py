"""The image half of decoupled cross-attention, for one adapter on one model.

    out = TextAttention(q, k, v) + w * Attention(q, K_ip, V_ip)          (before to_out)

`IPApplication` holds one adapter's image tokens, weights and controls, and computes the image
term for a layer from the layer's projected queries. It is plain torch with explicit arguments:
how a host calls a layer (its option dicts, its cond/uncond codes) is translated by the host
seam (`nodes/comfy_seam/` for ComfyUI), never read here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from .batching import pad_batch
from .masks import mask_for_queries

WEIGHT_TYPES = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")


class KeyValueWeights(Protocol):
    """What an adapter offers per layer: the image key and value projections."""

    def key_value(self, layer_index: int) -> Any: ...  # has .to_k_ip.weight and .to_v_ip.weight


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Plain multi-head scaled dot-product attention on [B, N, heads*d] tensors."""
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    return rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")


def weighted_ip_attention(
    q: torch.Tensor, k_ip: torch.Tensor, v_ip: torch.Tensor, heads: int, weight: float, weight_type: str
) -> torch.Tensor:
    """Attention over image tokens, with the weight applied the way `weight_type` says.

    "V only" scales the output (the paper's and diffusers' `scale`); the K+V modes scale the
    keys too, which also sharpens or flattens where the image is attended. The channel
    penalty divides by 1280/C so that the wide SDXL layers do not dominate.
    """
    if weight_type == "V only":
        return attend(q, k_ip, v_ip, heads) * weight
    if weight_type == "K+V":
        return attend(q, k_ip * weight, v_ip * weight, heads)
    penalised = weight * k_ip.shape[-1] / 1280.0
    if weight_type == "K+V w/ C penalty":
        return attend(q, k_ip * penalised, v_ip * penalised, heads)
    if weight_type == "K+mean(V) w/ C penalty":
        v_mean = v_ip.mean(dim=1, keepdim=True)
        return attend(q, k_ip * penalised, (v_ip - v_mean) + v_mean * penalised, heads)
    raise ValueError(f"unknown weight type {weight_type!r}; expected one of {', '.join(WEIGHT_TYPES)}")


@dataclass(eq=False)
class IPApplication:
    """One adapter applied to one model: its image tokens, weights and controls.

    cond_tokens / uncond_tokens: [1 or batch, T, context_dim]; a batch of N gives one
    reference per latent. K_ip/V_ip depend only on these tokens, so they are computed once
    per layer and (device, dtype) and then reused by every step.
    """

    adapter: KeyValueWeights
    cond_tokens: torch.Tensor
    uncond_tokens: torch.Tensor
    weight: float = 1.0
    weight_type: str = "V only"
    layer_weights: Sequence[float] | None = None  # one multiplier per adapter layer
    mask: torch.Tensor | None = None  # [1 or batch, H, W] in [0, 1]
    # One flag per adapter layer: True moves the reference to the negative side there (IPAdapter
    # plus's "precise" weight types): conditional chunks attend to zero image tokens, unconditional
    # chunks to the reference's tokens. None (or False) leaves the layer as it is.
    swap_to_uncond: Sequence[bool] | None = None
    _kv_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.weight_type not in WEIGHT_TYPES:
            raise ValueError(f"unknown weight type {self.weight_type!r}; expected one of {', '.join(WEIGHT_TYPES)}")
        if self.swap_to_uncond is not None and self.layer_weights is not None and (
                len(self.swap_to_uncond) != len(self.layer_weights)):
            raise ValueError(f"{len(self.swap_to_uncond)} swap flags for {len(self.layer_weights)} layer weights")

    def __deepcopy__(self, memo: dict) -> IPApplication:
        # Hosts deep-copy model options on every clone (ComfyUI does); an application is
        # read-only configuration plus shared weights, so clones share it instead of copying
        # the adapter weights and tokens once per clone.
        return self

    def layer_weight(self, layer_index: int) -> float:
        scale = 1.0 if self.layer_weights is None else float(self.layer_weights[layer_index])
        return self.weight * scale

    def key_values(self, layer_index: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(K_cond, V_cond, K_uncond, V_uncond) for a layer, on `like`'s device and dtype."""
        where = (like.device, like.dtype)
        if self._kv_cache.get("where") != where:
            self._kv_cache.clear()  # moved to another device or dtype: drop the old copies
            self._kv_cache["where"] = where
        if layer_index not in self._kv_cache:
            kv = self.adapter.key_value(layer_index)
            to_k = kv.to_k_ip.weight.to(*where)
            to_v = kv.to_v_ip.weight.to(*where)
            # UNet adapters have no bias; XLabs FLUX.1 adapters do.
            bias_k, bias_v = (None if getattr(p, "bias", None) is None else p.bias.to(*where)
                              for p in (kv.to_k_ip, kv.to_v_ip))
            out = []
            for tokens in (self.cond_tokens, self.uncond_tokens):
                tokens = tokens.to(*where)
                k, v = tokens @ to_k.T, tokens @ to_v.T
                out += [k if bias_k is None else k + bias_k, v if bias_v is None else v + bias_v]
            self._kv_cache[layer_index] = tuple(out)
        return self._kv_cache[layer_index]

    def zero_token_key_values(self, layer_index: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of all-zero image tokens for a layer: what a swapped layer's conditional chunks see."""
        self.key_values(layer_index, like)  # sets the cache's device and dtype
        slot = ("zero tokens", layer_index)
        if slot not in self._kv_cache:
            kv = self.adapter.key_value(layer_index)
            zeros = torch.zeros_like(self.cond_tokens[:1]).to(like.device, like.dtype)
            # Projected through the layer like any tokens: a bias (if the adapter has one) stays.
            self._kv_cache[slot] = tuple(
                zeros @ p.weight.to(like).T + (0 if getattr(p, "bias", None) is None else p.bias.to(like))
                for p in (kv.to_k_ip, kv.to_v_ip))
        return self._kv_cache[slot]

    def image_term(self, layer_index: int, q: torch.Tensor, heads: int, chunk_is_cond: Sequence[bool],
                   latent_hw: tuple[int, int] | None = None) -> torch.Tensor | None:
        """The weighted image attention for one layer, or None where this layer's weight is 0.

        q: [len(chunk_is_cond) * batch, N, C], the layer's queries; the batch is made of equal
        chunks, each wholly conditional (True) or unconditional (False). latent_hw: the latent's
        (height, width), needed only with a mask.
        """
        weight = self.layer_weight(layer_index)
        if weight == 0.0:
            return None
        batch = q.shape[0] // len(chunk_is_cond)
        k_c, v_c, k_u, v_u = self.key_values(layer_index, q)
        if self.swap_to_uncond is not None and self.swap_to_uncond[layer_index]:
            k_u, v_u = k_c, v_c
            k_c, v_c = self.zero_token_key_values(layer_index, q)
        k_ip = torch.cat([pad_batch(k_c if c else k_u, batch, "reference embeddings") for c in chunk_is_cond])
        v_ip = torch.cat([pad_batch(v_c if c else v_u, batch, "reference embeddings") for c in chunk_is_cond])
        out = weighted_ip_attention(q, k_ip, v_ip, heads, weight, self.weight_type)
        if self.mask is not None:
            mask = mask_for_queries(self.mask, latent_hw, q.shape[1], batch)
            out = out * repeat(mask.to(out), "b n -> (c b) n 1", c=len(chunk_is_cond))
        return out
