"""Adapter weights under ComfyUI's model management: one copy per file (weak cache), projection in the model's
dtype and device, the FaceID LoRA on a patched clone.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import comfy.model_management
import comfy.model_patcher
import torch

from ...ip_adapter_core.embeds import Projection
from ...ip_adapter_core.layout import AdapterSpec
from ...models.files import load_adapter
from ...models.flux_instantx import FluxInstantXAdapterModel
from ...models.ip_adapter import IPAdapterModel
from ...models.sd3_adapter import SD3IPAdapterModel
from .folders import ADAPTER_FOLDER, disk_stamp, full_path

log = logging.getLogger("ComfyUI-IPAdapter-Exact")


ADDITIONAL_MODELS_KEY = "ipadapter_exact"


@dataclass(eq=False)
class LoadedAdapter:
    """What the loader node hands on: the file's one shared weight copy and what it is."""

    name: str
    spec: AdapterSpec
    patcher: comfy.model_patcher.ModelPatcher  # owns the IPAdapterModel; loaded/offloaded by ComfyUI
    stamp: tuple[int, int] = (0, 0)  # (size, mtime_ns) of the file it was read from

    @property
    def model(self) -> IPAdapterModel:
        return self.patcher.model

    def __repr__(self) -> str:
        return f"LoadedAdapter({self.name}: {self.spec.describe()})"


def host_patcher_class() -> type:
    """The ModelPatcher class ComfyUI builds its own models with (CoreModelPatcher since 0.16)."""
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


class AdapterCache:
    """One LoadedAdapter per file while anything uses it, re-read when the file changes on disk.

    Entries are weak: three Apply nodes on one file share one copy, and once no node output
    and no patched model holds an adapter any more, its weights are freed.
    """

    def __init__(self) -> None:
        self._entries: weakref.WeakValueDictionary[str, LoadedAdapter] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self.reads = 0  # files actually read, for tests and the stats route

    def get(self, path: str) -> LoadedAdapter:
        stamp = disk_stamp(path)
        if stamp is None:
            raise FileNotFoundError(f"{path} does not exist (any more)")
        with self._lock:
            cached = self._entries.get(path)
            if cached is not None and cached.stamp == stamp:
                return cached
            model = load_adapter(path)
            self.reads += 1
            # The host's own patcher class: ModelPatcherDynamic under Dynamic VRAM (ComfyUI 0.16+), so
            # the adapter's weights never make a prompt fall back to estimate-based loading.
            patcher = host_patcher_class()(
                model,
                load_device=comfy.model_management.get_torch_device(),
                offload_device=comfy.model_management.unet_offload_device(),
            )
            loaded = LoadedAdapter(os.path.basename(path), model.spec, patcher, stamp)
            self._entries[path] = loaded
            log.info("loaded %s: %s", loaded.name, model.spec.describe())
            return loaded

    def cached_files(self) -> list[str]:
        """Base names of the files whose weights are alive and cached."""
        with self._lock:
            return sorted(loaded.name for loaded in self._entries.values())

    def live_copies(self) -> int:
        """Adapter weight sets alive in this process, found by the garbage collector.

        Counts every IPAdapterModel, not just the cached ones, so a copy kept alive somewhere
        else (a stale patch, a deep copy) shows up. One per file in use is the healthy figure.
        """
        kinds = (IPAdapterModel, SD3IPAdapterModel, FluxInstantXAdapterModel)
        return sum(1 for obj in gc.get_objects() if type(obj) in kinds)  # no __class__ proxies

    def stats(self) -> dict:
        return {"files_read": self.reads, "live_adapters": self.live_copies(), "cached_files": self.cached_files()}


ADAPTERS = AdapterCache()


def load_adapter_file(name: str) -> LoadedAdapter:
    return ADAPTERS.get(full_path(ADAPTER_FOLDER, name))


def token_projector(model: comfy.model_patcher.ModelPatcher, adapter: LoadedAdapter,
                    shortcut: bool | None = None, s_scale: float = 1.0) -> Projection:
    """Projects encodings to image tokens in the UNet's compute dtype on the device it samples on.

    shortcut / s_scale: FaceID Plus only (v2 = shortcut, s_scale its face-structure weight).
    """
    # The dtype the UNet computes in: with manual casting (half-precision weights on a device
    # without half-precision compute) that is the cast dtype, not the stored one.
    dtype = getattr(model.model, "manual_cast_dtype", None) or model.model_dtype()
    device = model.load_device
    comfy.model_management.load_model_gpu(adapter.patcher)
    plus = adapter.spec.needs_face_crop

    def project(encodings: torch.Tensor, crop_states: torch.Tensor | None) -> torch.Tensor:
        if not plus:
            return adapter.model.image_tokens(encodings, dtype=dtype, device=device)
        return adapter.model.image_tokens(encodings, dtype=dtype, device=device, crop_states=crop_states,
                                          shortcut=shortcut, s_scale=s_scale)

    return project


def add_adapter_lora(model: comfy.model_patcher.ModelPatcher, adapter: LoadedAdapter, strength: float) -> None:
    """The LoRA a FaceID file carries, added to `model` (a clone) through ComfyUI's own LoRA
    patching at `strength`, so it composes with LoRA nodes before or after. W' = W + s * up @ down
    (no alpha in the file: scale 1, as diffusers and the reference load it). The tensors are the
    adapter's own: nothing is copied per application."""
    if strength == 0.0 or not adapter.spec.has_lora:
        return
    model_keys = set(model.model.state_dict().keys())
    patches = {}
    for key, (up, down) in adapter.model.lora_patches().items():
        if key not in model_keys:
            raise ValueError(f"{adapter.name}'s LoRA patches {key}, which this model does not have: "
                             "use a FaceID adapter made for this model")
        patches[key] = _lora_patch(up, down)
    added = model.add_patches(patches, strength)
    if len(added) != len(patches):
        raise RuntimeError(f"ComfyUI took {len(added)} of the {len(patches)} LoRA weights of {adapter.name}")


def _lora_patch(up: torch.Tensor, down: torch.Tensor):
    """One LoRA weight patch in the form this ComfyUI release's weight patching reads."""
    weight_adapter = sys.modules.get("comfy.weight_adapter") or _import_optional("comfy.weight_adapter")
    if weight_adapter is not None and hasattr(weight_adapter, "LoRAAdapter"):
        return weight_adapter.LoRAAdapter(set(), (up, down, None, None, None, None))
    return ("lora", (up, down, None, None, None, None))  # releases before weight adapters


def _import_optional(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


class InnerPatchHooks:
    """ComfyUI's hooks that every patch of the pack needs, for a patch that wraps `inner` (what was there
    before: ComfyUI's own computation, another of our applications, or another pack's patch) and holds
    `adapter` (a LoadedAdapter).

    ComfyUI deep-copies patches with the model options, moves them with the model (`.to()`) and loads what
    `.models()` lists alongside the model: the adapter's weights, once, plus whatever the inner patch needs.
    """

    inner: object
    adapter: LoadedAdapter
    _warned = False  # the log said once that another pack's replacement skipped our terms

    def __deepcopy__(self, memo: dict):
        import copy

        clone = copy.copy(self)  # shares the application, gate, adapter and the model reference
        clone.inner = copy.deepcopy(self.inner, memo)
        return clone

    def to(self, *args, **kwargs):
        if hasattr(self.inner, "to"):
            self.inner = self.inner.to(*args, **kwargs)
        return self

    def models(self) -> list:
        inner = self.inner.models() if hasattr(self.inner, "models") else []
        return [self.adapter.patcher] + [m for m in inner if m is not self.adapter.patcher]

    def _under_inner(self, args: dict, extra: dict, compute: Callable[[dict], dict], block: str) -> dict:
        """A DiT block replacement's output, for patches that compute `block` themselves with their terms inside
        (`compute(args)`): run as is when nothing was there before; another pack's replacement gets that
        computation as its `original_block`, and one that never calls it costs our terms on this block (said
        once in the log, never silently)."""
        if self.inner is None:
            return compute(args)
        ran = []

        def original_block(inner_args: dict) -> dict:
            ran.append(True)
            return compute(inner_args)

        out = self.inner(args, {**extra, "original_block": original_block})
        if not ran and not self._warned:
            self._warned = True
            log.warning("another replacement of %s did not run the original block: the image prompt of %s is not "
                        "applied on that block", block, self.adapter.name)
        return out

