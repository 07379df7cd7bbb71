"""One UNet, two implementations: a diffusers UNet and the same weights loaded by ComfyUI.

The parity tests, the benchmark and the block-weight / mask tests all compare the pack
(through ComfyUI's patched forward) with diffusers' own IP-Adapter on identical weights.
Needs ComfyUI importable in-process (see conftest's `comfy_inprocess`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SD15_UNET = dict(  # the real SD1.5 UNet (859.5M parameters)
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD15_COMFY = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
    use_linear_in_transformer=False, context_dim=768, num_heads=8,
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    use_temporal_attention=False, use_temporal_resblock=False,
)

# SDXL's topology (cross-attention depths 2/10, linear proj_in, 2816 adm, context 2048, 64-wide
# heads) with the widest level narrowed from 1280 to 640 so both copies fit in memory.
SDXL_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 640), cross_attention_dim=2048, attention_head_dim=(5, 10, 10),
    transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SDXL_COMFY = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320,
    num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 2],
    transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    use_temporal_attention=False, use_temporal_resblock=False,
)


@dataclass
class UNetPair:
    base_model: str
    diffusers: torch.nn.Module
    comfy: object  # ModelPatcher
    context_dim: int

    @property
    def hidden_sizes(self) -> list[int]:
        """attn2 widths in diffusers' processor order: what an adapter's to_k_ip rows must be."""
        modules = dict(self.diffusers.named_modules())
        return [
            modules[name.removesuffix(".processor")].to_k.out_features
            for name in self.diffusers.attn_processors
            if name.endswith("attn2.processor")
        ]


def _perturb(unet: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, norms moved off 1/0 so a swapped norm shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))


def build_pair(base_model: str, seed: int = 0) -> UNetPair:
    import comfy.sd
    import comfy.utils
    from diffusers import UNet2DConditionModel

    config, comfy_config, context = {
        "SD1.5": (SD15_UNET, SD15_COMFY, 768),
        "SDXL": (SDXL_UNET, SDXL_COMFY, 2048),
    }[base_model]
    unet = UNet2DConditionModel(**config).eval()
    _perturb(unet, seed)
    # diffusers key -> ComfyUI (LDM) key, for this exact topology.
    mapping = comfy.utils.unet_to_diffusers(dict(comfy_config))
    sd = unet.state_dict()
    ldm = {ldm_key: sd[diff_key].clone() for diff_key, ldm_key in mapping.items() if diff_key in sd}
    missing = set(sd) - set(mapping)
    assert not missing, f"unmapped diffusers keys: {sorted(missing)[:5]}"
    patcher = comfy.sd.load_diffusion_model_state_dict(ldm, model_options={"dtype": torch.float32})
    assert patcher is not None, "ComfyUI did not detect the converted UNet"
    return UNetPair(base_model, unet, patcher, context)


def comfy_forward(model, x, timesteps, context, cond_or_uncond, sigma: float = 1.0, y=None) -> torch.Tensor:
    """The raw UNet forward of a (patched) ComfyUI model, with the options a sampler passes."""
    options = dict(model.model_options["transformer_options"])
    options.update(cond_or_uncond=list(cond_or_uncond), sigmas=torch.tensor([sigma]))
    unet = model.model.diffusion_model
    return unet(x, timesteps=timesteps, context=context, y=y, transformer_options=options)


def sdxl_added_cond(unet, batch: int, gen: torch.Generator) -> tuple[dict, torch.Tensor]:
    """diffusers' added_cond_kwargs and the equal ComfyUI `y` (pooled text + time-id embeddings)."""
    text_embeds = torch.randn(batch, 1280, generator=gen)
    time_ids = torch.tensor([[256.0, 256.0, 0.0, 0.0, 256.0, 256.0]]).repeat(batch, 1)
    time_embeds = unet.add_time_proj(time_ids.flatten()).reshape(batch, -1)
    return {"text_embeds": text_embeds, "time_ids": time_ids}, torch.cat([text_embeds, time_embeds], dim=-1)


def set_diffusers_scale(unet, scale) -> None:
    """diffusers' per-processor IP scale: a float, or a per-layer list via the block dictionary API."""
    for processor in unet.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [scale] if not isinstance(scale, list) else scale


def relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())
