"""Where the LoRA carried by FaceID adapter files goes in a ComfyUI UNet (pure: no ComfyUI import).

A FaceID / FaceID Plus file's `ip_adapter` dict holds, for every attention processor `i` of the
UNet in diffusers' `unet.attn_processors` order, `{i}.to_{q,k,v,out}_lora.{down,up}.weight`.
Processor `2n` is the self-attention (attn1) and `2n + 1` the cross-attention (attn2) of the
n-th transformer block in the order of `layout.SD15_LAYERS` / `SDXL_LAYERS` (down blocks, up
blocks, mid block), the numbering the `to_k_ip`/`to_v_ip` pairs use too.

How strong: diffusers loads these matrices as a PEFT LoRA with no alphas, which makes
`lora_alpha = rank` (scale 1.0), at adapter weight 1.0; the reference implementation
(tencent-ailab IP-Adapter, `LoRAAttnProcessor`, `lora_scale=1.0`, `network_alpha=None`) adds
`up(down(x))` unscaled. Both give W' = W + up @ down. In ComfyUI that is a "lora" patch
`(up, down, alpha=None, mid=None, dora_scale=None, reshape=None)` at strength 1.0
(`comfy/weight_adapter/lora.py`: alpha None -> scale 1.0; alpha = rank gives the same).
"""

from __future__ import annotations

import torch

from .layout import LORA_PROJECTIONS, BlockKey, lora_key

COMFY_PREFIX = "diffusion_model."
_GROUPS = {"input": "input_blocks.{block}.1", "output": "output_blocks.{block}.1", "middle": "middle_block.1"}


def transformer_block_path(block: BlockKey) -> str:
    """ComfyUI module path of a transformer block: ("input", 1, 0) -> "input_blocks.1.1.transformer_blocks.0".

    The SpatialTransformer is the second module of its input/output block and of the middle block.
    """
    group, number, transformer = block
    if group not in _GROUPS:
        raise ValueError(f"unknown UNet block kind {group!r}; expected input, middle or output")
    return f"{_GROUPS[group].format(block=number)}.transformer_blocks.{transformer}"


def processor_paths(layers: tuple[BlockKey, ...]) -> list[str]:
    """ComfyUI attention module path of every attention processor, indexed by processor number.

    `layers` is the cross-attention layer map of the base model (layout.SD15_LAYERS / SDXL_LAYERS).
    """
    paths: list[str] = []
    for block in layers:
        base = transformer_block_path(block)
        paths += [f"{base}.attn1", f"{base}.attn2"]
    return paths


def comfy_weight_key(processor_path: str, projection: str) -> str:
    """The UNet weight a LoRA projection patches: to_out is `to_out.0` (the Linear before dropout)."""
    if projection not in LORA_PROJECTIONS:
        raise ValueError(f"unknown LoRA projection {projection!r}; expected one of {', '.join(LORA_PROJECTIONS)}")
    module = "to_out.0" if projection == "to_out" else projection
    return f"{COMFY_PREFIX}{processor_path}.{module}.weight"


def lora_patches(ip_state: dict[str, torch.Tensor],
                 layers: tuple[BlockKey, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{ComfyUI weight key: (up, down)} for every attention projection the file's LoRA covers.

    `ip_state` is the file's `ip_adapter` dict (keys without the "ip_adapter." prefix). The
    delta of each weight is `up @ down` at scale 1.0 (see the module docstring). Raises
    KeyError naming the first missing matrix; layout.detect has checked a loaded file already.
    """
    patches: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for processor, path in enumerate(processor_paths(layers)):
        for projection in LORA_PROJECTIONS:
            down_key, up_key = lora_key(processor, projection, "down"), lora_key(processor, projection, "up")
            for key in (down_key, up_key):
                if key not in ip_state:
                    raise KeyError(f"ip_adapter.{key} is missing: the FaceID LoRA must cover every attention processor")
            patches[comfy_weight_key(path, projection)] = (ip_state[up_key], ip_state[down_key])
    return patches
