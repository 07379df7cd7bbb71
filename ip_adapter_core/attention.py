"""The image half of decoupled cross-attention, as a patch for one cross-attention layer.

    out = TextAttention(q, k, v) + w * Attention(q, K_ip, V_ip)          (before to_out)

`IPAttentionPatch` is the callable a host places on a cross-attention layer: it receives the
layer's already projected q, k, v and returns the attention output. It is pure torch: the text
attention it adds to is handed in (the host's own kernel, or the patch that was there before),
so several adapters stack by wrapping one another.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from .batching import pad_batch
from .masks import mask_for_queries
from .schedule import SigmaRange

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]

WEIGHT_TYPES = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")
CONDITIONAL, UNCONDITIONAL = 0, 1  # ComfyUI's cond_or_uncond values


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
    sigmas: SigmaRange = field(default_factory=SigmaRange)
    mask: torch.Tensor | None = None  # [1 or batch, H, W] in [0, 1]
    host_models: tuple = ()  # host-managed weight containers, reported to the host's loader
    _kv_cache: dict = field(default_factory=dict, repr=False)

    def __deepcopy__(self, memo: dict) -> IPApplication:
        # Hosts deep-copy model options on every clone (ComfyUI does); an application is
        # read-only configuration plus shared weights, so clones share it instead of copying
        # the adapter weights and tokens once per clone.
        return self

    def __post_init__(self) -> None:
        if self.weight_type not in WEIGHT_TYPES:
            raise ValueError(f"unknown weight type {self.weight_type!r}; expected one of {', '.join(WEIGHT_TYPES)}")

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
            out = []
            for tokens in (self.cond_tokens, self.uncond_tokens):
                tokens = tokens.to(*where)
                out += [tokens @ to_k.T, tokens @ to_v.T]
            self._kv_cache[layer_index] = tuple(out)
        return self._kv_cache[layer_index]

    def __call__(self, layer_index: int, q: torch.Tensor, extra_options: dict) -> torch.Tensor | None:
        """The image attention term for this layer, or None where the adapter is off."""
        weight = self.layer_weight(layer_index)
        if weight == 0.0 or not self.sigmas.contains(extra_options.get("sigmas")):
            return None
        chunks = extra_options.get("cond_or_uncond") or [CONDITIONAL]
        batch = q.shape[0] // len(chunks)
        k_c, v_c, k_u, v_u = self.key_values(layer_index, q)
        k_ip = torch.cat([_per_latent(k_c if c == CONDITIONAL else k_u, batch) for c in chunks])
        v_ip = torch.cat([_per_latent(v_c if c == CONDITIONAL else v_u, batch) for c in chunks])
        out = weighted_ip_attention(q, k_ip, v_ip, extra_options["n_heads"], weight, self.weight_type)
        if self.mask is not None:
            mask = mask_for_queries(self.mask, extra_options["original_shape"], q.shape[1], batch)
            out = out * repeat(mask.to(out), "b n -> (c b) n 1", c=len(chunks))
        return out


def _per_latent(t: torch.Tensor, batch: int) -> torch.Tensor:
    """[1 or N, T, C] -> [batch, T, C]: one reference per latent, the last one repeated."""
    return pad_batch(t, batch, "reference embeddings")


class IPAttentionPatch:
    """A cross-attention replacement for one layer: inner attention plus the image term.

    `inner` is whatever computed this layer's attention before: the host's kernel, or
    another patch (another adapter, or another pack's patch), so adapters stack.
    """

    def __init__(self, layer_index: int, application: IPApplication, inner: AttentionFn):
        self.layer_index = layer_index
        self.application = application
        self.inner = inner

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        out = self.inner(q, k, v, extra_options)
        image_term = self.application(self.layer_index, q, extra_options)
        return out if image_term is None else out + image_term.to(out.dtype)

    def __deepcopy__(self, memo: dict) -> IPAttentionPatch:
        return IPAttentionPatch(self.layer_index, self.application, copy.deepcopy(self.inner, memo))

    # The host moves patches with the model; the weights are host-managed, nothing to copy.
    def to(self, *args, **kwargs) -> IPAttentionPatch:
        if hasattr(self.inner, "to"):
            self.inner = self.inner.to(*args, **kwargs)
        return self

    def models(self) -> list:
        inner = self.inner.models() if hasattr(self.inner, "models") else []
        return list(self.application.host_models) + [m for m in inner if m not in self.application.host_models]

    def applications(self) -> list[IPApplication]:
        """Every adapter application stacked on this layer, innermost first."""
        inner = self.inner.applications() if isinstance(self.inner, IPAttentionPatch) else []
        return inner + [self.application]
