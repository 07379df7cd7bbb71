"""SigLIP so400m/384's pooled output (pooler_output, 1152), which the InstantX FLUX.1 IP-Adapter takes.

The pooled output comes from SigLIP's attention-pooling head (`vision_model.head.*`: a learned probe
attending over the final tokens, LayerNorm, MLP). ComfyUI's own SigLIP vision model leaves that head out
(its "pooled" output is the normalised tokens), so the head-bearing file the user keeps in
models/clip_vision is run here through transformers' SiglipVisionModel. No hub access: the config is built
locally (so400m/384: 1152 wide, 16 heads, MLP 4304, patch 14 at 384 px), its depth read from the file.
ComfyUI's SigLIP files use transformers' key names (`vision_model.*`).
"""

from __future__ import annotations

import logging
import re

import torch

log = logging.getLogger("ComfyUI-IPAdapter-Exact")

PREFIX = "vision_model."
SO400M_384 = {"hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16, "patch_size": 14,
              "image_size": 384, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}
HEAD_KEYS = ("head.probe", "head.attention.in_proj_weight", "head.attention.in_proj_bias",
             "head.attention.out_proj.weight", "head.attention.out_proj.bias", "head.layernorm.weight",
             "head.layernorm.bias", "head.mlp.fc1.weight", "head.mlp.fc1.bias", "head.mlp.fc2.weight",
             "head.mlp.fc2.bias")
MEAN = STD = (0.5, 0.5, 0.5)  # SigLIP's image processor: (x - 0.5) / 0.5 on [0, 1] pixels


def _vision_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(PREFIX): v for k, v in state_dict.items() if k.startswith(PREFIX)}


def check_siglip_file(state_dict: dict[str, torch.Tensor], name: str) -> int:
    """The file's depth; an error naming the file and what is missing when it cannot give the pooled output."""
    vision = _vision_keys(state_dict)
    if "embeddings.patch_embedding.weight" not in vision:
        raise ValueError(f"{name} is not a SigLIP vision model (no vision_model.embeddings.patch_embedding.weight): "
                         "the InstantX FLUX.1 IP-Adapter needs SigLIP so400m-patch14-384")
    shape = tuple(vision["embeddings.patch_embedding.weight"].shape)
    want = (SO400M_384["hidden_size"], 3, SO400M_384["patch_size"], SO400M_384["patch_size"])
    positions = vision.get("embeddings.position_embedding.weight")
    if shape != want or positions is None or positions.shape[0] != (384 // 14) ** 2:
        raise ValueError(f"{name} is a SigLIP vision model of another size (patch embedding {list(shape)}, "
                         f"{None if positions is None else positions.shape[0]} positions): the InstantX FLUX.1 "
                         f"IP-Adapter needs SigLIP so400m-patch14-384 ({list(want)}, 729 positions)")
    missing = [PREFIX + k for k in HEAD_KEYS if k not in vision]
    if missing:
        listed = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ValueError(
            f"{name} has no SigLIP attention-pooling head ({listed} missing): the InstantX FLUX.1 IP-Adapter "
            "takes SigLIP's pooled output, which that head computes. Use a "
            "so400m-patch14-384 file that keeps vision_model.head.* (probe, attention, layernorm, mlp), such as the "
            "vision half of google/siglip-so400m-patch14-384"
        )
    layers = {int(m.group(1)) for k in vision if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    if not layers or sorted(layers) != list(range(len(layers))):
        raise ValueError(f"{name}: SigLIP encoder layers are numbered {sorted(layers)[:6]}: the file is incomplete")
    return len(layers)


def build_siglip_pooled(state_dict: dict[str, torch.Tensor], name: str) -> torch.nn.Module:
    """transformers' SiglipVisionModel with the file's weights (fp32 as stored, eval, no grad)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    depth = check_siglip_file(state_dict, name)
    config = SiglipVisionConfig(num_hidden_layers=depth, vision_use_head=True, **SO400M_384)
    with torch.device("meta"):
        model = SiglipVisionModel(config)
    vision = _vision_keys(state_dict)
    own = model.state_dict()
    # transformers 5 names the parameters without vision_model. (and maps checkpoints onto them); 4.x keeps it.
    prefixed = any(k.startswith(PREFIX) for k in own)
    weights = {(PREFIX + k if prefixed else k): v.float() for k, v in vision.items()}
    extra = sorted(set(weights) - set(own))
    if extra:
        raise ValueError(f"{name}: unknown SigLIP tensors {extra[:4]}: not a SigLIP so400m vision model layout")
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{name}: the weights do not fit SigLIP so400m-patch14-384 ({depth} layers): {e}") from e
    for key, buffer in list(model.named_buffers()):
        # Non-persistent buffers (the position ids) are in no file: rebuilt here, off the meta device.
        if buffer.is_meta:
            if not key.endswith("position_ids"):
                raise RuntimeError(f"SigLIP buffer {key} is not in the file and cannot be rebuilt")
            owner, _, leaf = key.rpartition(".")
            ids = torch.arange(buffer.numel()).reshape(buffer.shape)
            model.get_submodule(owner).register_buffer(leaf, ids, persistent=False)
    log.info("SigLIP so400m/384 with its pooling head from %s (%d layers)", name, depth)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def siglip_pooled(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """pooler_output [B, 1152] of SigLIP-normalised pixels [B, 3, 384, 384]."""
    dtype = next(model.parameters()).dtype
    return model(pixel_values=pixels.to(dtype)).pooler_output
