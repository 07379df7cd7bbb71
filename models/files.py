"""Reading adapter and embedding files safely: .safetensors, or legacy .bin as plain tensors only."""

from __future__ import annotations

import os
import pickle
import re
import zipfile

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..ip_adapter_core.embeds import ImageEmbeds
from ..ip_adapter_core.layout import AdapterFormatError
from .ip_adapter import IPAdapterModel


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A flat state dict from a .safetensors file, or from a .bin/.pt/.pth pickle of tensors.

    A pickle is opened with weights_only=True, so a file that carries code is refused
    before any of it runs.
    """
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    if path.endswith(".safetensors"):
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterFormatError(f"{name} is not a readable .safetensors file (truncated or corrupt?): {e}") from e
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is long and explains how to load the file unsafely: keep only what was refused.
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if refused is None:
            raise AdapterFormatError(f"{name} is not a readable torch file (truncated or corrupt?)") from e
        raise AdapterFormatError(
            f"{name} was refused: its pickle holds more than tensors (possibly code: it calls "
            f"{refused[1]}), and this pack loads .bin files with weights_only=True only. Nothing of it was run; "
            "convert the file to .safetensors from a source you trust."
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise AdapterFormatError(f"{name} is not a readable torch file (truncated or corrupt?): {e}") from e
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{name} holds a {type(data).__name__}, not a dict of tensors")
    try:
        return _flatten(data)
    except AdapterFormatError as e:
        raise AdapterFormatError(f"{name}: {e}") from e


def _flatten(data: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            flat[f"{prefix}{key}"] = value
        else:
            raise AdapterFormatError(f"{prefix}{key} is a {type(value).__name__}, not a tensor")
    return flat


def load_adapter(path: str) -> IPAdapterModel:
    """Read and build an adapter; errors name the file and what is wrong with it."""
    state_dict = read_state_dict(path)
    try:
        return IPAdapterModel.from_state_dict(state_dict)
    except AdapterFormatError as e:
        raise AdapterFormatError(f"{os.path.basename(path)}: {e}") from e


EMBEDS_FORMAT = "ipadapter-exact-embeds/1"


def save_embeds(path: str, embeds: ImageEmbeds, source: str) -> None:
    """Write encodings as .safetensors (never pickle), recording what they are."""
    metadata = {"format": EMBEDS_FORMAT, "output": embeds.output, "width": str(embeds.width), "source": source}
    tensors = {"cond": embeds.cond, "uncond": embeds.uncond}
    if embeds.crop_cond is not None:
        tensors.update(crop_cond=embeds.crop_cond, crop_uncond=embeds.crop_uncond)
    save_file({k: t.contiguous() for k, t in tensors.items()}, path, metadata=metadata)


def load_embeds(path: str) -> ImageEmbeds:
    """Read encodings written by `save_embeds`; anything else is refused with the reason."""
    name = os.path.basename(path)
    if not path.endswith(".safetensors"):
        raise AdapterFormatError(f"{name}: embeddings are read from .safetensors files only")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != EMBEDS_FORMAT:
                raise AdapterFormatError(f"{name} is not an embeddings file saved by this pack")
            missing = [k for k in ("cond", "uncond") if k not in f.keys()]
            if missing:
                raise AdapterFormatError(f"{name} has no {' and no '.join(missing)} tensor (damaged file)")
            cond, uncond = f.get_tensor("cond"), f.get_tensor("uncond")
            crops = [f.get_tensor(k) for k in ("crop_cond", "crop_uncond") if k in f.keys()]
    except (SafetensorError, OSError) as e:
        raise AdapterFormatError(f"{name} is not a readable .safetensors file (truncated or corrupt?): {e}") from e
    _check_embeds(name, metadata, cond, uncond)
    if crops:
        if len(crops) != 2 or crops[0].ndim != 3 or crops[0].shape[0] != cond.shape[0]:
            raise AdapterFormatError(f"{name}: its face-crop encodings do not match its {cond.shape[0]} faces "
                                     "(damaged file)")
        _check_embeds(name, {"output": "penultimate", "width": str(crops[0].shape[-1])}, *crops)
        return ImageEmbeds(cond.float(), uncond.float(), metadata["output"], crops[0].float(), crops[1].float())
    return ImageEmbeds(cond.float(), uncond.float(), metadata["output"])


def _check_embeds(name: str, metadata: dict, cond: torch.Tensor, uncond: torch.Tensor) -> None:
    """Metadata and tensors of an embeddings file must agree: [N, D] image_embeds or [N, T, D] penultimate."""
    output, width = metadata.get("output"), metadata.get("width", "")
    rank = {"image_embeds": 2, "penultimate": 3, "arcface": 2, "arcface_raw": 2}.get(output)
    if rank is None or not width.isdigit() or cond.ndim != rank or cond.shape[-1] != int(width) or not cond.shape[0]:
        raise AdapterFormatError(
            f"{name}: its metadata (output={output!r}, width={width!r}) does not describe its cond tensor "
            f"{list(cond.shape)} (damaged file)"
        )
    if uncond.shape[1:] != cond.shape[1:] or uncond.shape[0] not in (1, cond.shape[0]):
        raise AdapterFormatError(
            f"{name}: uncond {list(uncond.shape)} does not match cond {list(cond.shape)} (damaged file)"
        )
    if not (cond.is_floating_point() and uncond.is_floating_point()):
        raise AdapterFormatError(f"{name}: the encodings are {cond.dtype}/{uncond.dtype}, not floating point")
    if not (torch.isfinite(cond).all() and torch.isfinite(uncond).all()):
        raise AdapterFormatError(f"{name}: the encodings hold NaN or infinite values (damaged file)")
