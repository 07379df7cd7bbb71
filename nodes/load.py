"""Stage 1, load: Load IP-Adapter (a named file), the auto loaders (a preset: the files are found by what
they are) and Load InsightFace. The variant is always read from the file's weights."""

from __future__ import annotations

from ..ip_adapter_core.presets import FACEID_PRESETS, PRESETS, STANDARD_PRESETS
from . import comfy_seam as seam
from . import finder
from .widgets import CATEGORY

PRESET_TOOLTIP = "What kind of adapter: " + "; ".join(p.label for p in PRESETS.values()) + "."


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
            "ipadapter_file": (seam.list_files(seam.ADAPTER_FOLDER), {
                "tooltip": "An IP-Adapter file in models/ipadapter "
                           "(or an 'ipadapter' path of extra_model_paths.yaml)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, ipadapter_file: str) -> str:
        # Re-run when the file changes on disk under the same name (the cache keys on this too).
        return seam.file_stamp(seam.ADAPTER_FOLDER, ipadapter_file)

    def load(self, ipadapter_file: str) -> tuple[seam.LoadedAdapter, str]:
        adapter = seam.load_adapter_file(ipadapter_file)
        return adapter, adapter.spec.describe()


PROVIDERS = ("CPU", "CUDA", "ROCM", "DirectML", "OpenVINO", "CoreML")


class LoadInsightFace:
    DESCRIPTION = ("Loads an insightface model pack (buffalo_l or antelopev2) for FaceID: face detection and the "
                   "ArcFace identity embedding. Needs the optional package: pip install insightface onnxruntime.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("INSIGHTFACE",)
    RETURN_NAMES = ("insightface",)
    OUTPUT_TOOLTIPS = ("Face detection and recognition, for IP-Adapter Encode Face.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        packs = sorted(set(seam.face_model_packs()) | {"buffalo_l", "antelopev2"})
        return {"required": {
            "model_pack": (packs, {"default": "buffalo_l",
                                   "tooltip": "A folder of .onnx files in models/insightface/models/ (or an "
                                              "'insightface' path of extra_model_paths.yaml)."}),
            "provider": (list(PROVIDERS), {"default": "CPU",
                                           "tooltip": "onnxruntime execution provider for face analysis."}),
        }}

    def load(self, model_pack: str, provider: str):
        from ..models.face_analysis import load_face_analysis

        return (load_face_analysis(seam.face_pack_folder(model_pack), [f"{provider}ExecutionProvider"]),)


class LoadIPAdapterAuto:
    DESCRIPTION = ("Finds the IP-Adapter file and the CLIP vision model a preset needs for this MODEL among your "
                   "model folders, by reading each file's tensor header (never its name), and loads both. When a "
                   "piece is missing, the error names each file, where to get it and which folder it goes in.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IP_ADAPTER", "CLIP_VISION", "STRING")
    RETURN_NAMES = ("ipadapter", "clip_vision", "info")
    OUTPUT_TOOLTIPS = ("The adapter, for the Encode and Apply nodes.", "The CLIP vision model it was trained with.",
                       "Which files were picked and what they are.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model the adapter is for: its base (SD1.5, SDXL) picks the files."}),
            "preset": (list(STANDARD_PRESETS), {"default": "standard", "tooltip": PRESET_TOOLTIP}),
        }}

    @classmethod
    def IS_CHANGED(cls, model, preset: str) -> str:
        # Re-run when a file is added, removed or changed in the folders searched (stat only, no reads).
        return seam.folder_state(seam.ADAPTER_FOLDER, seam.CLIP_VISION_FOLDER) + preset

    def load(self, model, preset: str):
        found = finder.find(model, preset)
        return seam.ADAPTERS.get(found.adapter_path), seam.load_clip_vision_file(found.encoder_path), found.describe()


class LoadIPAdapterFaceIDAuto:
    DESCRIPTION = ("Finds the FaceID adapter a preset needs for this MODEL (by its tensors), the insightface pack "
                   "(buffalo_l) and, for FaceID Plus, the ViT-H CLIP vision model for the face crop. The file's own "
                   "LoRA strength passes through to Apply IP-Adapter FaceID, which applies the LoRA on its patched "
                   "copy of the model only.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IP_ADAPTER", "INSIGHTFACE", "CLIP_VISION", "FLOAT", "STRING")
    RETURN_NAMES = ("ipadapter", "insightface", "clip_vision", "lora_strength", "info")
    OUTPUT_TOOLTIPS = ("The FaceID adapter.", "Face detection and recognition, for IP-Adapter Encode Face.",
                       "FaceID Plus: the ViT-H model for the face crop (None for the other presets, which need none).",
                       "Connect to Apply IP-Adapter FaceID's lora_strength.", "Which files were picked.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model the adapter is for: its base (SD1.5, SDXL) picks the files."}),
            "preset": (list(FACEID_PRESETS), {"default": "faceid plus v2", "tooltip": PRESET_TOOLTIP}),
            "lora_strength": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "Strength of the LoRA the FaceID file carries (Portrait files "
                                                   "carry none)."}),
            "provider": (list(PROVIDERS), {"default": "CPU", "tooltip": "onnxruntime execution provider."}),
        }}

    @classmethod
    def IS_CHANGED(cls, model, preset: str, lora_strength: float, provider: str) -> str:
        return seam.folder_state(seam.ADAPTER_FOLDER, seam.CLIP_VISION_FOLDER, seam.FACE_FOLDER) + preset + provider

    def load(self, model, preset: str, lora_strength: float, provider: str):
        from ..models.face_analysis import load_face_analysis

        found = finder.find(model, preset)
        clip_vision = seam.load_clip_vision_file(found.encoder_path) if found.encoder_path else None
        faces = load_face_analysis(found.face_pack, [f"{provider}ExecutionProvider"])
        return seam.ADAPTERS.get(found.adapter_path), faces, clip_vision, lora_strength, found.describe()
