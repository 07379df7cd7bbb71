"""The InstantX SD3.5-Large IP-Adapter term for one MMDiT joint block (plain torch, explicit arguments).

Where the term sits (as InstantX's processor and diffusers' `SD3IPAdapterJointAttnProcessor2_0` put it):

    tokens, temb = TimeResampler(SigLIP states, t)           t = the sampler's timestep (1000 * sigma)
    ip     = norm_ip(tokens, temb)                            AdaLayerNorm: LN(tokens) * (1 + scale) + shift
    q      = norm_q(q_raw)           k = [norm_k(k_raw) ; norm_ip_k(to_k_ip(ip))]     per head
                                     v = [v             ; to_v_ip(ip)]
    x_attn = JointAttention(...)[picture] + w * Attention(q, k, v)              before the block's to_out

q_raw / k_raw are the picture's *raw* query and key projections: the block's own ln_q / ln_k are not
in them (the adapter brings its own norms). The image attention runs over the picture's own tokens
and the image tokens together, and its result joins the picture's joint-attention output before the
block's output projection, so it passes through that projection, the gate and the MLP. The image
tokens and every norm_ip depend on the timestep, so nothing can be projected ahead of sampling: the
resampler runs once per model call (cached for the call's blocks), on the call's own timesteps.

The adapter's weights come in through `SD3AdapterWeights` (models/sd3_adapter.py builds them from a
file); the host seam hands over the block's raw projections and the timesteps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from einops import rearrange

from .batching import pad_batch
from .embeds import ImageEmbeds, combine_embeds

RMS_EPS = 1e-6  # the processor's norm_q / norm_k / norm_ip_k and norm_ip's LayerNorm


def timestep_sinusoid(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[B] timesteps -> [B, dim] fp32 sinusoids, cosines first, frequencies exp(-ln(max_period) i / (dim/2)).

    The resampler's time projection (diffusers' Timesteps(dim, flip_sin_to_cos=True, shift 0)).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """x / rms(x) * weight over the last dimension (the mean square taken in fp32)."""
    scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (x * scale).to(x.dtype) * weight.to(x)


class SD3BlockWeights(Protocol):
    """One joint block's adapter weights (callables on tensors of the host's dtype and device)."""

    def image_keys_values(self, tokens: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """to_k_ip / to_v_ip of norm_ip(tokens, temb): [B, T, hidden] each."""
        ...

    def norm_q(self, x: torch.Tensor) -> torch.Tensor: ...  # [..., head_dim]

    def norm_k(self, x: torch.Tensor) -> torch.Tensor: ...

    def norm_ip_k(self, x: torch.Tensor) -> torch.Tensor: ...


class SD3AdapterWeights(Protocol):
    def resample(self, states: torch.Tensor, timesteps: torch.Tensor, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """SigLIP states [B, L, D] and timesteps [B] -> (image tokens [B, T, hidden], time embedding [B, E])."""
        ...

    def block(self, index: int) -> SD3BlockWeights: ...


def joint_image_attention(block: SD3BlockWeights, q_raw: torch.Tensor, k_raw: torch.Tensor, v: torch.Tensor,
                          tokens: torch.Tensor, temb: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention(norm_q(q), [norm_k(k); norm_ip_k(K_ip)], [v; V_ip]) -> [B, N, heads * head_dim], unweighted.

    q_raw, k_raw, v: the picture's raw projections [B, N, heads * head_dim]; tokens [B, T, hidden] and
    temb [B, E] for the same batch rows (`SD3Application.time_tokens`).
    """
    k_ip, v_ip = block.image_keys_values(tokens, temb)
    q, k, v, k_ip, v_ip = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q_raw, k_raw, v, k_ip, v_ip))
    keys = torch.cat([block.norm_k(k), block.norm_ip_k(k_ip)], dim=2)
    values = torch.cat([v, v_ip], dim=2)
    out = F.scaled_dot_product_attention(block.norm_q(q), keys, values)
    return rearrange(out, "b h n d -> b n (h d)")


def sd3_encodings(embeds: ImageEmbeds, combine_mode: str, one_per_latent: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Cond and uncond SigLIP states grouped as [G, R, L, D]: G groups (1, or one per latent), each of R
    references whose image tokens are concatenated (the resampler runs per reference, at the step's time).

    The rules are those of `image_tokens` for the time-free families: one_per_latent gives reference i to
    latent i; otherwise references are combined (`combine_mode`) or, with concat, attended all at once,
    each next to its own negative (a shared negative is repeated once per reference).
    """
    if embeds.cond.ndim != 3:
        raise ValueError(f"the SD3.5 IP-Adapter takes hidden states [N, tokens, width]; got {list(embeds.cond.shape)}")
    if one_per_latent:
        return embeds.cond[:, None], embeds.uncond[:, None]
    embeds = combine_embeds(embeds, combine_mode)
    uncond = embeds.uncond.expand(embeds.count, *embeds.uncond.shape[1:])
    return embeds.cond[None], uncond[None]


@dataclass(eq=False)
class SD3Application:
    """One SD3.5 adapter applied to one model: its encodings, weight and per-block multipliers.

    cond / uncond: SigLIP states [G, R, L, D] (`sd3_encodings`). The image tokens and the time
    embedding are recomputed for every model call from its own timesteps; `time_tokens` keeps the
    last call's result, so the blocks of one call share one resampler run.
    """

    adapter: SD3AdapterWeights
    cond: torch.Tensor
    uncond: torch.Tensor
    weight: float = 1.0
    layer_weights: Sequence[float] | None = None  # one multiplier per joint block
    _last: tuple[Any, ...] | None = field(default=None, repr=False)

    def __deepcopy__(self, memo: dict) -> SD3Application:
        return self  # read-only configuration plus shared weights: clones share it (as IPApplication)

    def layer_weight(self, block_index: int) -> float:
        scale = 1.0 if self.layer_weights is None else float(self.layer_weights[block_index])
        return self.weight * scale

    def time_tokens(self, timesteps: torch.Tensor, chunk_is_cond: Sequence[bool], dtype: torch.dtype,
                    device: torch.device, call_key: object = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(image tokens [B, R*T, hidden], time embedding [B, E]) for a batch of B rows.

        timesteps: [B], the model call's timestep of each row; the batch is made of equal chunks,
        each wholly conditional (True) or unconditional (False). call_key: an object that stands
        for this model call (the host's sigmas tensor): the same key, codes and place reuse the
        last result instead of running the resampler again.
        """
        codes = tuple(bool(c) for c in chunk_is_cond)
        last = self._last
        if call_key is not None and last is not None and last[0] is call_key and last[1:4] == (codes, dtype, device):
            return last[4]
        batch = timesteps.shape[0] // len(codes)
        tokens, temb = [], []
        for i, is_cond in enumerate(codes):
            rows = timesteps[i * batch:(i + 1) * batch]
            states = pad_batch(self.cond if is_cond else self.uncond, batch, "reference embeddings")  # [b, R, L, D]
            refs = states.shape[1]
            t, e = self.adapter.resample(states.flatten(0, 1), rows.repeat_interleave(refs), dtype, device)
            tokens.append(rearrange(t, "(b r) n c -> b (r n) c", r=refs))
            temb.append(e[::refs])  # the R references of a row share its timestep, hence its embedding
        result = (torch.cat(tokens), torch.cat(temb))
        self._last = (call_key, codes, dtype, device, result) if call_key is not None else None
        return result

    def block_term(self, block_index: int, q_raw: torch.Tensor, k_raw: torch.Tensor, v: torch.Tensor, heads: int,
                   timesteps: torch.Tensor, chunk_is_cond: Sequence[bool],
                   call_key: object = None) -> torch.Tensor | None:
        """w * the image attention of joint block `block_index`, [B, N, hidden], to be added to the picture's
        joint-attention output before the block's output projection; None where the block's weight is 0."""
        weight = self.layer_weight(block_index)
        if weight == 0.0:
            return None
        tokens, temb = self.time_tokens(timesteps, chunk_is_cond, q_raw.dtype, q_raw.device, call_key)
        out = joint_image_attention(self.adapter.block(block_index), q_raw, k_raw, v, tokens, temb, heads)
        return out * weight
