"""The one place where the pack touches ComfyUI's internals: a package, one module per concern.

* `release`: the running ComfyUI's version, the features the pack needs, the load-time check.
* `folders`: model folders (ours registered, files listed and found, classified by their headers).
* `weights`: adapter weights under ComfyUI's model management (one copy per file), the FaceID LoRA.
* `encoders`: CLIP vision calls.
* `gating`: ComfyUI's cond/uncond codes and the start/end gate on the sampler's sigma.
* `model_info`: what a MODEL is (name, base family, cross-attention widths).
* one module per patch point: `unet` (attn2, SD1.5/SDXL), `flux` (double blocks, XLabs), `flux_instantx`
  (double and single blocks, InstantX), `sd3` (joint blocks, InstantX SD3.5).
* `patching`: checking a model against an adapter and patching a clone, for every family.
* `routes`: the read-only stats route.

The math in `ip_adapter_core/` gets plain tensors and explicit arguments; the node classes get the names
re-exported here. When ComfyUI moves, this package changes and nothing else should.
Oldest ComfyUI supported: OLDEST_SUPPORTED (see `check_comfyui`, run when the pack loads).
"""

from __future__ import annotations

from .encoders import (
    ENCODE_CHUNK,
    clip_encode,
    clip_encode_zero_pixels,
    clip_vision_widths,
    load_clip_vision_file,
)
from .flux import (
    FluxDoubleBlockPatch,
    _modulate,
    _patch_flux_double_blocks,
    _q_projection,
    check_fits_flux,
    flux_image_query,
    is_flux_model,
)
from .folders import (
    ADAPTER_EXTENSIONS,
    ADAPTER_FOLDER,
    CLIP_VISION_FOLDER,
    EMBEDS_FOLDER,
    FACE_FOLDER,
    FILE_INDEX,
    disk_stamp,
    embeds_output_folder,
    face_model_packs,
    face_pack_folder,
    file_stamp,
    first_folder,
    folder_entries,
    folder_state,
    full_path,
    list_files,
    numbered_output_path,
    register_folder,
    register_folders,
)
from .gating import (
    COMFY_COND,
    COMFY_UNCOND,
    ScheduleGate,
    sigma_on_host,
)
from .model_info import (
    _model_name,
    base_model_of,
    cross_attention_rows,
)
from .patching import (
    check_fits,
    patch_model,
)
from .release import (
    NEWEST_TESTED,
    OLDEST_SUPPORTED,
    REQUIRED_FEATURES,
    _has_parameter,
    _version_key,
    check_comfyui,
    comfyui_version,
)
from .routes import (
    STATS_PATH,
    register_routes,
)
from .sd3 import (
    _SD3_CALL_OPTIONS,
    SD3_WRAPPER_KEY,
    SD3JointBlockPatch,
    SD3Term,
    _hold_call_options,
    _hold_call_options_on,
    _patch_sd3_joint_blocks,
    check_fits_sd3,
    is_sd3_model,
    sd3_joint_block,
    sd3_picture_projections,
    sd3_timesteps,
)
from .unet import (
    _TAKES_TRANSFORMER_OPTIONS,
    Attn2Patch,
    _attention_takes_transformer_options,
    cross_attention_at,
    text_attention,
)
from .weights import (
    ADAPTERS,
    ADDITIONAL_MODELS_KEY,
    AdapterCache,
    InnerPatchHooks,
    LoadedAdapter,
    _import_optional,
    _lora_patch,
    add_adapter_lora,
    host_patcher_class,
    load_adapter_file,
    token_projector,
)

__all__ = [
    "InnerPatchHooks",
    "NEWEST_TESTED",
    "OLDEST_SUPPORTED",
    "REQUIRED_FEATURES",
    "_has_parameter",
    "_version_key",
    "check_comfyui",
    "comfyui_version",
    "ADAPTER_EXTENSIONS",
    "ADAPTER_FOLDER",
    "CLIP_VISION_FOLDER",
    "EMBEDS_FOLDER",
    "FACE_FOLDER",
    "FILE_INDEX",
    "disk_stamp",
    "embeds_output_folder",
    "face_model_packs",
    "face_pack_folder",
    "file_stamp",
    "first_folder",
    "folder_entries",
    "folder_state",
    "full_path",
    "list_files",
    "numbered_output_path",
    "register_folder",
    "register_folders",
    "ADAPTERS",
    "ADDITIONAL_MODELS_KEY",
    "AdapterCache",
    "LoadedAdapter",
    "_import_optional",
    "_lora_patch",
    "add_adapter_lora",
    "host_patcher_class",
    "load_adapter_file",
    "token_projector",
    "ENCODE_CHUNK",
    "clip_encode",
    "clip_encode_zero_pixels",
    "clip_vision_widths",
    "load_clip_vision_file",
    "COMFY_COND",
    "COMFY_UNCOND",
    "ScheduleGate",
    "sigma_on_host",
    "Attn2Patch",
    "_TAKES_TRANSFORMER_OPTIONS",
    "_attention_takes_transformer_options",
    "cross_attention_at",
    "text_attention",
    "_model_name",
    "base_model_of",
    "cross_attention_rows",
    "FluxDoubleBlockPatch",
    "_modulate",
    "_patch_flux_double_blocks",
    "_q_projection",
    "check_fits_flux",
    "flux_image_query",
    "is_flux_model",
    "SD3JointBlockPatch",
    "SD3Term",
    "SD3_WRAPPER_KEY",
    "_SD3_CALL_OPTIONS",
    "_hold_call_options",
    "_hold_call_options_on",
    "_patch_sd3_joint_blocks",
    "check_fits_sd3",
    "is_sd3_model",
    "sd3_joint_block",
    "sd3_picture_projections",
    "sd3_timesteps",
    "check_fits",
    "patch_model",
    "STATS_PATH",
    "register_routes",
]
