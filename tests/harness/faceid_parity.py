"""FaceID on both sides of a sampler-path parity test (tests/inprocess/test_parity_faceid.py).

diffusers' side is diffusers' own FaceID loading, unchanged: `IPAdapterMixin.load_ip_adapter`
reads the very .safetensors file the pack reads (a local folder + weight_name, no hub), loads the
projection and to_k_ip/to_v_ip through `unet._load_ip_adapter_weights`, then the file's LoRA
through `unet._load_ip_adapter_loras` -> the pipeline's `load_lora_weights` (PEFT, adapter
"faceid_0") -> `set_adapters(["faceid_0"], [1.0])`. Those methods live on a pipeline; `FaceIDHost`
is the smallest object they run on: the UNet plus the attributes a pipeline would answer with
(no text encoders, no device map), mixing in diffusers' own IPAdapterMixin and the base model's
LoRA loader mixin. Without PEFT diffusers only logs a warning and skips the LoRA, so
`load_faceid` checks that every attention projection did get it.

Face inputs (`FaceInputs`) stand in for insightface/CLIP outputs: random unit vectors for the
normed ArcFace embedding (norms 20-28 for the raw one of the unnorm portrait) and random CLIP
penultimate states of the face crops for FaceID Plus. The negative is what the reference
pipelines use: a zero face embedding per face (and, for Plus, a given uncond crop state);
diffusers gets `torch.cat([negative, positive])` as its pipelines build it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

ARCFACE = 512
CROP_STATES = (257, 1280)  # ViT-H penultimate hidden states of an aligned face crop


def faces(n: int, seed: int, raw: bool = False) -> torch.Tensor:
    """n ArcFace stand-ins [n, 512]: unit length (normed_embedding), or raw with norms 20-28."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, ARCFACE, generator=gen)
    x = x / x.norm(dim=1, keepdim=True)
    return x * (20 + 8 * torch.rand(n, 1, generator=gen)) if raw else x


def crop_states(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *CROP_STATES, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class FaceInputs:
    """One prompt's faces: cond [N, 512] (one portrait may hold several faces), and for Plus the
    crop states of each face [N, 257, 1280] and the negative's crop state [1, 257, 1280]."""

    faces: torch.Tensor
    crop_cond: torch.Tensor | None = None
    crop_uncond: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return self.faces.shape[0]

    def diffusers_image_embeds(self, sequence: bool = False) -> torch.Tensor:
        """[2, N, 512]: one image per prompt holding N faces, the negative (zeros) first.

        sequence: [2, N, 1, 512], each face a one-token sequence, as the unnorm portrait's
        projection (a plain Resampler to diffusers) takes it."""
        embeds = torch.stack([torch.zeros_like(self.faces), self.faces])
        return embeds[:, :, None] if sequence else embeds

    def diffusers_clip_embeds(self) -> torch.Tensor:
        """[2, 1, 257, 1280] for IPAdapterFaceIDPlusImageProjection.clip_embeds, negative first."""
        assert self.crop_cond is not None and self.count == 1, "FaceID Plus takes one face here"
        return torch.cat([self.crop_uncond, self.crop_cond])[:, None]

    def pack_embeds(self, output: str, faces: torch.Tensor | None = None):
        """The pack's ImageEmbeds: zero face embedding (+ the uncond crop) as the shared negative."""
        from ipadapter_pack.ip_adapter_core.embeds import ImageEmbeds

        faces = self.faces if faces is None else faces
        return ImageEmbeds(faces, torch.zeros(1, ARCFACE), output, self.crop_cond, self.crop_uncond)


def _lora_mixin(base_model: str):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    return {"SD1.5": StableDiffusionLoraLoaderMixin, "SDXL": StableDiffusionXLLoraLoaderMixin}[base_model]


def host_for(unet, base_model: str):
    """A pipeline stand-in that diffusers' own load_ip_adapter / load_lora_weights run on."""
    from diffusers.loaders import IPAdapterMixin

    class FaceIDHost(IPAdapterMixin, _lora_mixin(base_model)):
        hf_device_map = None  # no accelerate device map: nothing to offload around the LoRA load

        def __init__(self, unet):
            self.unet = unet
            self.text_encoder = None
            self.text_encoder_2 = None

        @property
        def components(self) -> dict:
            return {"unet": self.unet, "text_encoder": None, "text_encoder_2": None}

    return FaceIDHost(unet)


def lora_modules(unet) -> list[str]:
    """UNet modules PEFT wrapped with the FaceID LoRA."""
    return [name for name, module in unet.named_modules()
            if "faceid_0" in getattr(module, "lora_A", {})]


def load_faceid(unet, base_model: str, path: Path, scale: float, expect_lora: bool):
    """diffusers' FaceID load of the file at `path` (IPAdapterMixin.load_ip_adapter), then the IP
    scale on every processor; returns the host (for `unload_faceid`)."""
    host = host_for(unet, base_model)
    host.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
    for processor in unet.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [scale]
    wrapped = lora_modules(unet)
    attn = [name for name, _ in unet.named_modules() if name.endswith((".attn1", ".attn2"))
            and not name.startswith("encoder_hid_proj")]
    expected = 4 * len(attn) if expect_lora else 0  # to_q, to_k, to_v, to_out.0 of every attention
    assert len(wrapped) == expected, (
        f"diffusers put the FaceID LoRA on {len(wrapped)} modules, expected {expected} (is PEFT installed?)")
    return host


def set_plus_inputs(unet, inputs: FaceInputs, shortcut: bool, s_scale: float) -> None:
    """What diffusers' FaceID Plus docs have users set by hand on the projection."""
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    assert type(projection).__name__ == "IPAdapterFaceIDPlusImageProjection", type(projection).__name__
    projection.clip_embeds = inputs.diffusers_clip_embeds().to(unet.dtype)
    projection.shortcut = shortcut
    projection.shortcut_scale = s_scale


def unload_faceid(host) -> None:
    """diffusers' own unloading: the IP-Adapter (projection, processors) and the PEFT LoRA."""
    host.unload_ip_adapter()
    host.unload_lora_weights()
    assert not lora_modules(host.unet) and not getattr(host.unet, "peft_config", None)
