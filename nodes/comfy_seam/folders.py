"""Model folders: registering ours, listing and finding files, and classifying them by their headers."""

from __future__ import annotations

import os
from collections.abc import Sequence

import folder_paths

from ...models.discovery import FileIndex

ADAPTER_FOLDER = "ipadapter"


ADAPTER_EXTENSIONS = {".safetensors", ".bin", ".pt", ".pth"}


EMBEDS_FOLDER = "ipadapter_embeds"


FACE_FOLDER = "insightface"  # model packs as <folder>/models/<name>/*.onnx (insightface's layout)


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


def numbered_output_path(folder: str, prefix: str, extension: str) -> str:
    """A new numbered file path for `prefix` in `folder`, as ComfyUI's save nodes number files."""
    full_folder, name, counter, _, _ = folder_paths.get_save_image_path(prefix, folder)
    os.makedirs(full_folder, exist_ok=True)
    return os.path.join(full_folder, f"{name}_{counter:05}{extension}")
