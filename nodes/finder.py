"""Finds the files a preset needs among the registered model folders, by what their headers say.

One pass lists every missing piece at once, each with its published name, where to get it and which folder
it goes in; a file made for another base model is named in that message and never picked.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..ip_adapter_core import presets
from ..ip_adapter_core.presets import Candidate, Choice
from . import comfy_seam as seam

log = logging.getLogger("ComfyUI-IPAdapter-Exact")


@dataclass(frozen=True)
class Found:
    preset: presets.Preset
    base_model: str
    adapter: Choice
    encoder: Choice | None  # None when the preset needs no CLIP vision model (FaceID without the crop)
    adapter_path: str
    encoder_path: str | None
    face_pack: str = ""  # FaceID: the insightface pack folder

    def describe(self) -> str:
        lines = [f"preset {self.preset.label} for {self.base_model}",
                 f"ipadapter: {self.adapter.file.name} ({self.adapter.file.spec.describe()})"]
        if self.encoder is not None:
            lines.append(f"clip_vision: {self.encoder.file.name} ({self.encoder.file.tower})")
        if self.face_pack:
            lines.append(f"insightface: {self.face_pack}")
        lines += [c.note for c in (self.adapter, self.encoder) if c is not None and c.note]
        return "\n".join(lines)


def _candidates(folder: str) -> tuple[list[Candidate], dict[str, str]]:
    candidates, paths = [], {}
    for name, path, mtime, kind in seam.FILE_INDEX.scan(seam.folder_entries(folder)):
        candidates.append(Candidate(name, mtime, kind.spec, kind.tower, kind.kv_rows))
        paths[name] = path
    return candidates, paths


def find(model, preset_name: str) -> Found:
    """The adapter (and CLIP vision model, and for FaceID the insightface pack) for `preset_name` on `model`."""
    preset = presets.PRESETS[preset_name]
    base = seam.base_model_of(model)
    wanted = preset.for_base(base)  # refuses a preset that has no file for this base

    adapters, adapter_paths = _candidates(seam.ADAPTER_FOLDER)
    rows = seam.cross_attention_rows(model, base)
    missing: list[str] = []
    adapter = presets.pick_adapter(wanted, base, adapters, rows)
    if adapter is None:
        missing.append(f"{wanted.name} into {seam.first_folder(seam.ADAPTER_FOLDER)} (from {wanted.url})")

    tower = wanted.crop_encoder if preset.faceid else wanted.encoder
    encoder = encoder_path = None
    if tower:
        encoders, encoder_paths = _candidates(seam.CLIP_VISION_FOLDER)
        want_encoder = presets.ENCODERS[tower]
        encoder = presets.pick_encoder(want_encoder, encoders)
        if encoder is None:
            missing.append(f"{want_encoder.name} ({tower}) into {seam.first_folder(seam.CLIP_VISION_FOLDER)} "
                           f"(from {want_encoder.url})")
        else:
            encoder_path = encoder_paths[encoder.file.name]

    face_pack = ""
    if preset.faceid:
        packs = seam.face_model_packs()
        if presets.INSIGHTFACE_PACK in packs:
            face_pack = packs[presets.INSIGHTFACE_PACK]
        else:
            where = os.path.join(seam.first_folder(seam.FACE_FOLDER), "models", presets.INSIGHTFACE_PACK)
            missing.append(f"the insightface pack {presets.INSIGHTFACE_PACK} (its .onnx files) into {where} "
                           f"(from {presets.INSIGHTFACE_URL})")

    if missing:
        misses = presets.near_misses(wanted, base, adapters, rows)
        hint = f" Found but not usable here: {'; '.join(misses)}." if misses else ""
        raise FileNotFoundError(f"IP-Adapter preset '{preset.label}' for {base} needs: " + "; ".join(missing)
                                + "." + hint)
    found = Found(preset, base, adapter, encoder, adapter_paths[adapter.file.name], encoder_path, face_pack)
    log.info("IP-Adapter auto loader: %s", found.describe().replace("\n", "; "))
    return found
