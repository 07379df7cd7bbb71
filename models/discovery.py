"""What model files are, from their tensor headers alone: the auto loader's eyes.

* `tensor_shapes(path)`: {key: shape} without reading tensor data. A .safetensors file is its 8-byte
  length and JSON header; a zip-format torch file (.bin/.pt/.pth) is its pickle, read with
  weights_only=True and its storages memory-mapped (nothing of them is read); only a pre-2020
  non-zip pickle has to be read whole.
* `classify(path)`: an adapter's AdapterSpec (the same detection as loading it, run on shape-only
  tensors), a CLIP vision tower, or "other" with the reason.
* `FileIndex`: classifications cached per file state (size, mtime), so listing a folder whose
  files did not change reads nothing.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..ip_adapter_core.layout import AdapterFormatError, AdapterSpec, detect, ip_key, split_state_dict

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


class HeaderError(ValueError):
    """The file's header cannot be read; the message names the file."""


def tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """{tensor key: shape} of a .safetensors or torch file, reading no tensor data where the format allows."""
    name = os.path.basename(path)
    if path.endswith(".safetensors"):
        return _safetensors_shapes(path, name)
    return _torch_shapes(path, name)


def _safetensors_shapes(path: str, name: str) -> dict[str, tuple[int, ...]]:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise HeaderError(f"{name} is too short to be a .safetensors file")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES:
                raise HeaderError(f"{name}: a {length}-byte header is not a .safetensors header")
            raw = f.read(length)
    except OSError as e:
        raise HeaderError(f"{name} cannot be read: {e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeaderError(f"{name}: its header is not JSON (truncated or not a .safetensors file)") from e
    if not isinstance(header, dict):
        raise HeaderError(f"{name}: its header is not a JSON object")
    shapes = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or not isinstance(info.get("shape"), list):
            raise HeaderError(f"{name}: header entry {key!r} has no shape")
        shapes[key] = tuple(int(d) for d in info["shape"])
    return shapes


def _torch_shapes(path: str, name: str) -> dict[str, tuple[int, ...]]:
    zipped = zipfile.is_zipfile(path)
    try:
        # mmap: storages stay on disk; only the pickle (keys, shapes) is read.
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as e:  # noqa: BLE001 - any failure means "not a readable torch file"; the reason is kept
        raise HeaderError(f"{name} is not a readable torch file of plain tensors: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(data, dict):
        raise HeaderError(f"{name} holds a {type(data).__name__}, not a dict of tensors")
    shapes: dict[str, tuple[int, ...]] = {}
    _collect(data, "", shapes)
    return shapes


def _collect(data: dict, prefix: str, out: dict[str, tuple[int, ...]]) -> None:
    for key, value in data.items():
        if isinstance(value, dict):
            _collect(value, f"{prefix}{key}.", out)
        elif isinstance(value, torch.Tensor):
            out[f"{prefix}{key}"] = tuple(value.shape)


# --- what a file is ------------------------------------------------------------------------------

# CLIP vision towers by (layers, width): what ComfyUI's clip_vision loader would build from the file.
TOWERS = {(48, 1664): "ViT-bigG", (32, 1280): "ViT-H", (24, 1024): "ViT-L", (27, 1152): "SigLIP"}


@dataclass(frozen=True)
class FileKind:
    kind: str  # "adapter", "clip_vision", "other"
    spec: AdapterSpec | None = None  # adapters
    tower: str = ""  # clip_vision: "ViT-H", "ViT-bigG", "ViT-L", "SigLIP-384", ...
    reason: str = ""  # other: why it is none of those
    kv_rows: tuple[int, ...] = ()  # UNet adapters: rows of each layer's to_k_ip (the UNet widths it was made for)

    def describe(self) -> str:
        if self.kind == "adapter" and self.spec is not None:
            return self.spec.describe()
        if self.kind == "clip_vision":
            return f"CLIP vision {self.tower}"
        return self.reason


def classify(path: str) -> FileKind:
    """What the file at `path` is, from its header alone."""
    try:
        shapes = tensor_shapes(path)
    except HeaderError as e:
        return FileKind("other", reason=str(e))
    tower = clip_vision_tower(shapes)
    if tower:
        return FileKind("clip_vision", tower=tower)
    meta = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    try:
        spec = detect(split_state_dict(meta))
    except AdapterFormatError as e:
        return FileKind("other", reason=f"{os.path.basename(path)}: {e}")
    rows = tuple(shapes.get(f"ip_adapter.{ip_key(i)}.to_k_ip.weight", (0,))[0] for i in range(len(spec.layers)))
    return FileKind("adapter", spec=spec, kv_rows=rows if spec.base_model in ("SD1.5", "SDXL") else ())


def clip_vision_tower(shapes: dict[str, tuple[int, ...]]) -> str:
    """The CLIP vision tower a header describes ("" if none): ComfyUI's and open_clip's key layouts."""
    for prefix, norm in (("vision_model.encoder.layers.", "layer_norm1.weight"),
                         ("visual.transformer.resblocks.", "ln_1.weight")):
        layers = {int(k[len(prefix):].split(".")[0]) for k in shapes
                  if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
        if not layers:
            continue
        first = shapes.get(f"{prefix}0.{norm}")
        if not first:
            return ""
        tower = TOWERS.get((max(layers) + 1, first[0]), "")
        if tower == "SigLIP":
            positions = shapes.get("vision_model.embeddings.position_embedding.weight", (0,))[0]
            tower = {729: "SigLIP-384", 1024: "SigLIP-512"}.get(positions, "")
        elif tower == "ViT-L":
            positions = shapes.get("vision_model.embeddings.position_embedding.weight", (257,))[0]
            tower = "ViT-L" if positions == 257 else "ViT-L-336" if positions == 577 else ""
        return tower
    return ""


class FileIndex:
    """Classifications of files, re-read only when a file's size or mtime changes (thread-safe)."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[tuple[int, int], FileKind]] = {}
        self._lock = threading.Lock()
        self.reads = 0  # headers actually read, for tests and the log

    def classify(self, path: str) -> FileKind:
        st = os.stat(path)
        return self._classify_at(path, (st.st_size, st.st_mtime_ns))

    def _classify_at(self, path: str, state: tuple[int, int]) -> FileKind:
        with self._lock:
            known = self._known.get(path)
            if known is not None and known[0] == state:
                return known[1]
        kind = classify(path)
        with self._lock:
            self.reads += 1
            self._known[path] = (state, kind)
        return kind

    def scan(self, files: Iterable[tuple[str, str]]) -> list[tuple[str, str, int, FileKind]]:
        """[(name, path, mtime_ns, kind)] for (name, path) pairs (one stat each); missing files are left out."""
        out = []
        for name, path in files:
            try:
                st = os.stat(path)
                kind = self._classify_at(path, (st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                continue
            out.append((name, path, st.st_mtime_ns, kind))
        return out
