"""Stage 1, load: Load IP-Adapter. The variant is read from the file's weights."""

from __future__ import annotations

from . import comfy_seam as seam
from .widgets import CATEGORY


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
