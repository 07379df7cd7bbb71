"""The ComfyUI side of the pack: model folders, the shared adapter weights, model patching."""

from __future__ import annotations

import gc
import logging
import os
import threading
from dataclasses import dataclass

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management
import comfy.model_patcher
import folder_paths
import torch

from ..ip_adapter_core.attention import IPApplication, IPAttentionPatch
from ..ip_adapter_core.layout import AdapterSpec, BlockKey
from ..models.files import load_adapter
from ..models.ip_adapter import IPAdapterModel

log = logging.getLogger("ComfyUI-IPAdapter-Exact")

ADAPTER_FOLDER = "ipadapter"
ADAPTER_EXTENSIONS = {".safetensors", ".bin", ".pt", ".pth"}


def register_model_folder() -> None:
    """Add models/ipadapter to ComfyUI's folder list without dropping paths others registered."""
    default = os.path.join(folder_paths.models_dir, ADAPTER_FOLDER)
    if ADAPTER_FOLDER in folder_paths.folder_names_and_paths:
        paths, extensions = folder_paths.folder_names_and_paths[ADAPTER_FOLDER]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[ADAPTER_FOLDER] = (paths, set(extensions) | ADAPTER_EXTENSIONS)
    else:
        folder_paths.folder_names_and_paths[ADAPTER_FOLDER] = ([default], set(ADAPTER_EXTENSIONS))


@dataclass(eq=False)
class LoadedAdapter:
    """What the loader node hands on: the file's one shared weight copy and what it is."""

    name: str
    spec: AdapterSpec
    patcher: comfy.model_patcher.ModelPatcher  # owns the IPAdapterModel; loaded/offloaded by ComfyUI

    @property
    def model(self) -> IPAdapterModel:
        return self.patcher.model

    def __repr__(self) -> str:
        return f"LoadedAdapter({self.name}: {self.spec.describe()})"


class AdapterCache:
    """One LoadedAdapter per file, reused while the file is unchanged on disk (size, mtime).

    Every application of a file shares its weights, so three Apply nodes cost one copy.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple[int, int], LoadedAdapter]] = {}
        self._lock = threading.Lock()
        self.reads = 0  # files actually read, for tests and the soak report

    def get(self, path: str) -> LoadedAdapter:
        stat = os.stat(path)
        stamp = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._entries.get(path)
            if cached and cached[0] == stamp:
                return cached[1]
            model = load_adapter(path)
            self.reads += 1
            patcher = comfy.model_patcher.ModelPatcher(
                model,
                load_device=comfy.model_management.get_torch_device(),
                offload_device=comfy.model_management.unet_offload_device(),
            )
            loaded = LoadedAdapter(os.path.basename(path), model.spec, patcher)
            self._entries[path] = (stamp, loaded)
            log.info("loaded %s: %s", loaded.name, model.spec.describe())
            return loaded

    def cached_files(self) -> list[str]:
        """Base names of the files whose weights the cache holds, one entry per path."""
        with self._lock:
            return sorted(loaded.name for _, loaded in self._entries.values())

    def live_copies(self) -> int:
        """Adapter weight sets alive in this process, found by the garbage collector.

        Counts every IPAdapterModel, not just the cached ones, so a copy kept alive somewhere
        else (a stale patch, a deep copy) shows up. One per distinct file is the healthy figure.
        """
        return sum(1 for obj in gc.get_objects() if type(obj) is IPAdapterModel)  # no __class__ proxies

    def stats(self) -> dict:
        return {"files_read": self.reads, "live_adapters": self.live_copies(), "cached_files": self.cached_files()}


ADAPTERS = AdapterCache()


def text_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """ComfyUI's own attention kernel, exactly as an unpatched layer would call it."""
    return comfy_attention.optimized_attention(
        q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
        transformer_options=extra_options,
    )


def cross_attention_at(model: comfy.model_patcher.ModelPatcher, key: BlockKey) -> torch.nn.Module | None:
    """The attn2 module of ComfyUI block `key`, or None if the UNet has no such layer."""
    unet = model.model.diffusion_model
    name, block_id, index = key
    blocks = {"input": getattr(unet, "input_blocks", None), "output": getattr(unet, "output_blocks", None)}
    if name == "middle":
        block = getattr(unet, "middle_block", None)
    else:
        seq = blocks[name]
        block = seq[block_id] if seq is not None and block_id < len(seq) else None
    if block is None:
        return None
    for module in block:
        layers = getattr(module, "transformer_blocks", None)
        if layers is not None and index < len(layers):
            return getattr(layers[index], "attn2", None)
    return None


def check_fits(model: comfy.model_patcher.ModelPatcher, adapter: LoadedAdapter) -> None:
    """Refuse, before anything is patched, an adapter whose layers the model does not have."""
    spec = adapter.spec
    config = getattr(model.model, "model_config", None)
    model_name = type(config).__name__ if config is not None else type(model.model).__name__
    context = None if config is None else config.unet_config.get("context_dim")
    if context is not None and context != spec.context_dim:
        raise ValueError(
            f"{adapter.name} is an {spec.base_model} adapter (text context {spec.context_dim}) but the model is "
            f"{model_name} (context {context}): load an IP-Adapter made for {model_name}"
        )
    for i, key in enumerate(spec.layers):
        attn2 = cross_attention_at(model, key)
        rows = adapter.model.key_value(i).to_k_ip.weight.shape[0]
        if attn2 is None:
            raise ValueError(
                f"{adapter.name} ({spec.base_model}) patches cross-attention {key}, which {model_name} does not have: "
                f"use an IP-Adapter made for this model's architecture"
            )
        if attn2.to_k.weight.shape[0] != rows:
            raise ValueError(
                f"{adapter.name} gives {rows}-wide image keys at {key} but the model's layer is "
                f"{attn2.to_k.weight.shape[0]} wide: this adapter was made for another UNet"
            )


def patch_model(
    model: comfy.model_patcher.ModelPatcher, adapter: LoadedAdapter, application: IPApplication
) -> comfy.model_patcher.ModelPatcher:
    """A clone of `model` with the image path on every cross-attention layer the adapter covers.

    A patch already on a layer (another adapter, or another pack's) becomes the inner attention
    of ours, so applications stack. The input model is not changed.
    """
    check_fits(model, adapter)
    patched = model.clone()
    table = patched.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    for i, key in enumerate(adapter.spec.layers):
        inner = table.get(key) or table.get(key[:2]) or text_attention
        patched.set_model_attn2_replace(IPAttentionPatch(i, application, inner), *key)
    return patched
