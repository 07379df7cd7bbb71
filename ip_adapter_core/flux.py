"""The XLabs FLUX.1 IP-Adapter term for one Flux double block (plain torch, explicit arguments).

Where the term sits (as XLabs' processor and diffusers' `FluxIPAdapterAttnProcessor` put it):

    q_img  = RMSNorm_q( q third of img_attn.qkv( LayerNorm(img) * (1 + scale1) + shift1 ) )   per head
    term   = w * Attention(q_img, K_ip, V_ip)        K_ip/V_ip = to_{k,v}_ip(image tokens) + bias
    img'   = DoubleBlock(img, txt, ...)[img] + term

The query is the block's own image query after its q RMSNorm and *before* RoPE (the picture's
positions are not rotated into it), and the term is added to the image stream after the whole
block (after the MLP), with no output projection and no modulation gate. A host whose block
applies RoPE inside its attention call cannot hand that query over, so it is recomputed here
from the block's own pieces, passed in as callables (the host's modules: they cast, offload and
patch their weights the host's way).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from einops import rearrange

from .attention import IPApplication


def pre_rope_image_query(img: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                         modulate: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                         layer_norm: Callable[[torch.Tensor], torch.Tensor],
                         project_q: Callable[[torch.Tensor], torch.Tensor],
                         q_norm: Callable[[torch.Tensor], torch.Tensor], heads: int) -> torch.Tensor:
    """The double block's image query, [B, heads, N, head_dim], normed and not rotated.

    img: the image stream entering the block [B, N, C]; shift/scale: the block's first image
    modulation; modulate(x, 1 + scale, shift) is the host's modulation op; project_q maps
    [B, N, C] to the q third of the block's qkv projection; q_norm is the block's per-head q norm.
    """
    x = modulate(layer_norm(img), 1 + scale, shift)
    q = rearrange(project_q(x), "b n (h d) -> b h n d", h=heads)
    return q_norm(q)


def double_block_term(application: IPApplication, block_index: int, q: torch.Tensor,
                      chunk_is_cond: Sequence[bool]) -> torch.Tensor | None:
    """w * Attention(q, K_ip, V_ip) for double block `block_index`, [B, N, heads * head_dim],
    to be added to the block's image output; None where the block's weight is 0.

    q: the pre-RoPE image query [B, heads, N, head_dim] (`pre_rope_image_query`); the batch is
    made of equal chunks, each wholly conditional (True) or unconditional (False).
    """
    heads = q.shape[1]
    return application.image_term(block_index, rearrange(q, "b h n d -> b n (h d)"), heads, chunk_is_cond)
