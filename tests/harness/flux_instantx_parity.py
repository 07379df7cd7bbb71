"""An independent reference for the InstantX FLUX.1-dev IP-Adapter on diffusers' Flux blocks.

Written from the math of InstantX's published attention processor (`IPAFluxAttnProcessor2_0`, the
`attention_processor.py` that ships with the weights; see tests/inprocess/test_parity_flux_instantx.py
for which copy was read), not from this pack's code: plain torch on diffusers' FluxTransformer2DModel,
whose attention modules get `ReferenceProcessor` (a processor diffusers calls with (attn, hidden_states,
encoder_hidden_states, attention_mask, image_rotary_emb)). Per attention, with the file's weights:

    q          = attn.norm_q(attn.to_q(hidden_states))           per head, before RoPE
    K_ip, V_ip = RMSNorm_1e-5(to_k_ip(tokens)), to_v_ip(tokens)  per head; V is not normed
    ip         = scale * softmax(q K_ip^T / sqrt(d)) V_ip
    double block (encoder_hidden_states given): the image rows' attention output + ip, then to_out
    single block: the whole [text; image] stream's attention output + ip (the block then concatenates
                  the MLP half and projects with proj_out)

tokens = LayerNorm(reshape(proj.2(GELU(proj.0(pooled))), T x 4096)), computed in `reference_tokens`.
The processors for the 19 double blocks take ip_adapter.0-18, the single blocks 19-56 (diffusers'
attn_processors order, which InstantX's loader loads the file's `ip_adapter` dict into).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IP_K_EPS = 1e-5


def reference_tokens(state_dict: dict[str, torch.Tensor], pooled: torch.Tensor) -> torch.Tensor:
    """InstantX's MLPProjModel on pooled SigLIP embeddings [N, 1152] -> [N, T, 4096], fp32."""
    w = {k.removeprefix("image_proj."): v.float() for k, v in state_dict.items() if k.startswith("image_proj.")}
    x = F.linear(pooled.float(), w["proj.0.weight"], w["proj.0.bias"])
    x = F.linear(F.gelu(x), w["proj.2.weight"], w["proj.2.bias"])
    x = x.reshape(x.shape[0], -1, w["norm.weight"].shape[0])
    return F.layer_norm(x, w["norm.weight"].shape, w["norm.weight"], w["norm.bias"], eps=1e-5)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)  # [B, H, N, d]


def _merge(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2)


class ReferenceProcessor:
    """One InstantX processor: the block's own attention (diffusers' math, written out) plus the image term."""

    def __init__(self, to_k_ip: torch.Tensor, to_v_ip: torch.Tensor, tokens: torch.Tensor, scale: float):
        self.to_k_ip, self.to_v_ip = to_k_ip.float(), to_v_ip.float()
        self.tokens = tokens  # [batch, T, 4096], one row per model batch row (negatives first)
        self.scale = scale

    def image_attention(self, query: torch.Tensor, head_dim: int) -> torch.Tensor:
        k_ip = _heads(self.tokens @ self.to_k_ip.T, head_dim)
        k_ip = k_ip * torch.rsqrt(k_ip.pow(2).mean(-1, keepdim=True) + IP_K_EPS)
        v_ip = _heads(self.tokens @ self.to_v_ip.T, head_dim)
        return _merge(F.scaled_dot_product_attention(query, k_ip, v_ip))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        d = attn.head_dim
        query = attn.norm_q(_heads(attn.to_q(hidden_states), d).transpose(1, 2)).transpose(1, 2)
        key = attn.norm_k(_heads(attn.to_k(hidden_states), d).transpose(1, 2)).transpose(1, 2)
        value = _heads(attn.to_v(hidden_states), d)
        ip = self.scale * self.image_attention(query, d)  # the query before RoPE
        if encoder_hidden_states is not None:
            e_q = attn.norm_added_q(_heads(attn.add_q_proj(encoder_hidden_states), d).transpose(1, 2)).transpose(1, 2)
            e_k = attn.norm_added_k(_heads(attn.add_k_proj(encoder_hidden_states), d).transpose(1, 2)).transpose(1, 2)
            e_v = _heads(attn.add_v_proj(encoder_hidden_states), d)
            query, key, value = (torch.cat(p, dim=2) for p in ((e_q, query), (e_k, key), (e_v, value)))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=2)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=2)
        out = _merge(F.scaled_dot_product_attention(query, key, value))
        if encoder_hidden_states is None:
            return out + ip
        text, image = out[:, : encoder_hidden_states.shape[1]], out[:, encoder_hidden_states.shape[1]:]
        image = attn.to_out[1](attn.to_out[0](image + ip))
        return image, attn.to_add_out(text)


def install_reference(transformer, state_dict: dict[str, torch.Tensor], tokens: torch.Tensor, scale: float) -> None:
    """ReferenceProcessor on every attention of `transformer`: double blocks take ip_adapter.0.., then single."""
    attentions = ([b.attn for b in transformer.transformer_blocks]
                  + [b.attn for b in transformer.single_transformer_blocks])
    for i, attn in enumerate(attentions):
        attn.set_processor(ReferenceProcessor(state_dict[f"ip_adapter.{i}.to_k_ip.weight"],
                                              state_dict[f"ip_adapter.{i}.to_v_ip.weight"], tokens, scale))


def remove_reference(transformer) -> None:
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    transformer.set_attn_processor(FluxAttnProcessor())
