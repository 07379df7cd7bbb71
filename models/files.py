"""Reading adapter and embedding files safely: .safetensors, or legacy .bin as plain tensors only."""

from __future__ import annotations

import os
import pickle
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
        raise AdapterFormatError(
            f"{name} was refused: its pickle holds more than tensors (possibly code), and this pack "
            f"loads .bin files with weights_only=True only. Convert it to .safetensors. ({e})"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise AdapterFormatError(f"{name} is not a readable torch file (truncated or corrupt?): {e}") from e
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{name} holds a {type(data).__name__}, not a dict of tensors")
    return _flatten(data)


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
    save_file({"cond": embeds.cond.contiguous(), "uncond": embeds.uncond.contiguous()}, path, metadata=metadata)


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
            cond, uncond = f.get_tensor("cond"), f.get_tensor("uncond")
    except (SafetensorError, OSError) as e:
        raise AdapterFormatError(f"{name} is not a readable .safetensors file (truncated or corrupt?): {e}") from e
    output = metadata.get("output")
    if output not in ("image_embeds", "penultimate") or cond.shape[-1] != int(metadata.get("width", -1)):
        raise AdapterFormatError(f"{name}: its metadata does not describe its tensors (damaged file)")
    return ImageEmbeds(cond.float(), uncond.float(), output)
