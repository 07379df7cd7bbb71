"""Load IP-Adapter: pick a file from models/ipadapter; the variant is read from its weights."""

from __future__ import annotations

import os

import folder_paths

from .host import ADAPTER_FOLDER, ADAPTERS, LoadedAdapter

CATEGORY = "IP-Adapter Exact"


class LoadIPAdapter:
    DESCRIPTION = ("Loads an IP-Adapter file (.safetensors, or legacy .bin of plain tensors). The variant, base "
                   "model and the CLIP vision model it needs are read from the weights, never from the file name.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IP_ADAPTER", "STRING")
    RETURN_NAMES = ("ipadapter", "info")
    OUTPUT_TOOLTIPS = ("The adapter, shared by every node that uses it.",
                       "What was detected: variant, base model, expected encoder, tokens.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ipadapter_file": (folder_paths.get_filename_list(ADAPTER_FOLDER), {
                "tooltip": "An IP-Adapter file in models/ipadapter "
                           "(or an 'ipadapter' path of extra_model_paths.yaml)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, ipadapter_file: str) -> str:
        # Re-run when the file changes on disk under the same name (the cache keys on this too).
        path = folder_paths.get_full_path(ADAPTER_FOLDER, ipadapter_file)
        if path is None or not os.path.isfile(path):
            return ""
        stat = os.stat(path)
        return f"{stat.st_size}:{stat.st_mtime_ns}"

    def load(self, ipadapter_file: str) -> tuple[LoadedAdapter, str]:
        path = folder_paths.get_full_path_or_raise(ADAPTER_FOLDER, ipadapter_file)
        adapter = ADAPTERS.get(path)
        return adapter, adapter.spec.describe()


def file_stamp(folder: str, name: str) -> str:
    """'size:mtime_ns' of a model file, or '' when it is missing (validation reports that)."""
    path = folder_paths.get_full_path(folder, name)
    try:
        stat = os.stat(path) if path else None
    except OSError:
        stat = None
    return "" if stat is None else f"{stat.st_size}:{stat.st_mtime_ns}"
