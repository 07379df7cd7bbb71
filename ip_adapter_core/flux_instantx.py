"""The InstantX FLUX.1-dev IP-Adapter term for Flux double and single blocks (plain torch, explicit arguments).

What InstantX's published processor (`IPAFluxAttnProcessor2_0`, set on every attention of FLUX.1:
19 double blocks, then 38 single blocks) computes, per block:

    q      = RMSNorm_q( to_q(x) )                 per head, the block's own q norm, *before* RoPE
    K_ip   = RMSNorm(to_k_ip(tokens))             per head, eps 1e-5, no scale of its own
    V_ip   = to_v_ip(tokens)                      (no norm on V: the processor leaves norm_added_v out)
    attn' = attn + w * Attention(q, K_ip, V_ip)

* double block: x is the image stream (the text stream gets nothing), and attn' is the image rows'
  attention output *before* the output projection: the term goes through img_attn.proj, the gate,
  and the MLP sees it. The block therefore has to be computed with the term inside it.
* single block: x is the whole [text; image] stream (every row gets a term, the text rows too), and
  attn' is the attention half of linear2's input: out = x + gate * linear2([attn'; mlp]). linear2 is
  linear, so the block can run untouched and gate * (term @ W2[:, :hidden]^T) be added after it.

tokens = LayerNorm(reshape(proj.2(GELU(proj.0(pooled))), 128 x 4096)) from SigLIP so400m's pooler
output (models/flux_instantx.py); cond/uncond chunks each attend to their own reference tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from .attention import IPApplication

IP_KEY_NORM_EPS = 1e-5  # the processor's norm_added_k: RMSNorm(head_dim, eps=1e-5, elementwise_affine=False)


def rms_norm_heads(x: torch.Tensor, heads: int, eps: float = IP_KEY_NORM_EPS) -> torch.Tensor:
    """RMSNorm over each head's channels of [B, T, heads * d], computed in fp32 as diffusers' RMSNorm does."""
    h = rearrange(x, "b t (h d) -> b t h d", h=heads)
    normed = h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + eps)
    return rearrange(normed.to(x.dtype), "b t h d -> b t (h d)")


@dataclass(eq=False)
class FluxInstantXApplication(IPApplication):
    """An IPApplication whose image keys get the per-head RMSNorm of InstantX's processor.

    `adapter.key_value(i)` holds processor i's to_k_ip / to_v_ip (no bias); `heads` is the model's
    head count (24 for FLUX.1), which the norm needs before any query is seen.
    """

    heads: int = 24
    normalise_keys: bool = True  # False only to show what leaving the norm out costs (tests)

    def key_values(self, layer_index: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cached = layer_index in self._kv_cache and self._kv_cache.get("where") == (like.device, like.dtype)
        out = super().key_values(layer_index, like)
        if not cached and self.normalise_keys:
            k_c, v_c, k_u, v_u = out
            out = (rms_norm_heads(k_c, self.heads), v_c, rms_norm_heads(k_u, self.heads), v_u)
            self._kv_cache[layer_index] = out
        return out


def pre_rope_query(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                   modulate: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                   layer_norm: Callable[[torch.Tensor], torch.Tensor],
                   project_q: Callable[[torch.Tensor], torch.Tensor],
                   q_norm: Callable[[torch.Tensor], torch.Tensor], heads: int) -> torch.Tensor:
    """A Flux block's query [B, N, heads * d], q-normed and not rotated, from the block's own pieces.

    x: the stream entering the block (double: image stream; single: [text; image]); shift/scale: its
    first modulation; project_q: the q third of the block's qkv (double) or of linear1 (single).
    """
    q = rearrange(project_q(modulate(layer_norm(x), 1 + scale, shift)), "b n (h d) -> b h n d", h=heads)
    return rearrange(q_norm(q), "b h n d -> b n (h d)")


def block_term(application: FluxInstantXApplication, processor: int, q: torch.Tensor, heads: int,
               chunk_is_cond: Sequence[bool]) -> torch.Tensor | None:
    """w * Attention(q, K_ip, V_ip) for processor `processor`, [B, N, heads * d]; None at weight 0.

    q: from `pre_rope_query`; the batch is made of equal chunks, each wholly cond (True) or uncond."""
    return application.image_term(processor, q, heads, chunk_is_cond)


def single_block_output_term(term: torch.Tensor, linear2_weight: torch.Tensor,
                             gate: torch.Tensor) -> torch.Tensor:
    """What a single block's output gains from `term` joining its attention output: gate * term @ W2a^T.

    linear2_weight: [hidden, hidden + mlp] (its first `hidden` columns take the attention output; the
    bias is already in the block's own output); gate: the block's modulation gate [B, 1, hidden]."""
    hidden = term.shape[-1]
    return gate * F.linear(term, linear2_weight[:, :hidden].to(term))
