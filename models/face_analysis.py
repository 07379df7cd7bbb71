"""Face analysis for the FaceID adapters: insightface finds the face, ArcFace embeds it.

The FaceID family (REFERENCE.md sections 2 and 8) needs, per reference picture, the normed ArcFace
embedding (512 values) and, for FaceID Plus, the face aligned on the detector's five key points
with ``insightface.utils.face_align.norm_crop(image, landmark=kps, image_size=224)``, as the
reference code does. This module does exactly that with insightface's own ``FaceAnalysis`` and
its own ``norm_crop``; it needs neither ComfyUI nor, until a function is called, insightface.

    analyser = load_face_analysis("<root>/models/buffalo_l", ["CPUExecutionProvider"])
    face = analyse(analyser, image, index=None, label="image 1 of 2")   # image: [H, W, 3] 0..1 RGB
    face.embedding       # [512] float32, unit length (insightface's normed_embedding)
    face.aligned_crop    # [224, 224, 3] float32 0..1 RGB
    face.bbox, face.kps, face.det_score, face.index, face.face_count

Conventions:

* Colour: ComfyUI pictures are RGB; insightface's ``FaceAnalysis.get`` and ``norm_crop`` take
  BGR uint8 arrays (cv2's order), so the picture is converted to BGR uint8 (x 255, rounded)
  first, and the crop converted back to RGB. (The reference snippets read the picture with
  cv2.imread, so their crop is BGR; where such a crop goes to a CLIP image processor unchanged,
  CLIP sees red and blue swapped. This module returns true RGB.)
* Which face: faces are numbered by box area, largest first (ties: left to right, then top to
  bottom). ``index=None`` takes the largest, as the common FaceID nodes do; ``index=k`` takes the
  k-th in that order (negative counts from the smallest).
* Sizes: a picture with a side under ``MIN_SIDE`` (32 px) is refused with a ValueError, as is one
  over ``MAX_SIDE`` (16384 px, ComfyUI's own limit). Pictures up to ``LARGE_SIDE`` (2048 px) go to
  insightface unchanged, as in the reference. Larger ones are shrunk with area averaging to the
  detector's input size for detection only (insightface would otherwise shrink them with a
  bilinear resize that skips most pixels); the box and key points are scaled back, and the
  aligned crop and the embedding are taken from the full-resolution picture.
* Coordinates (bbox x1, y1, x2, y2 and kps x, y) are in pixels of the picture given.

Errors say what is wrong and what would fit: ``InsightFaceMissingError`` (an ImportError) with
the pip line when insightface or onnxruntime is absent, ``FaceModelsMissingError`` (a
FileNotFoundError) naming the folder and the files expected, ``ValueError`` naming the picture
(``label``) when no face is found or the picture cannot be used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib.util
import logging
import math
import operator
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

log = logging.getLogger("ComfyUI-IPAdapter-Exact")

PIP_LINE = "pip install insightface==2.1 onnxruntime"
EMBEDDING_SIZE = 512
REFERENCE_CROP_SIZE = 224  # h94 IP-Adapter FaceID Plus: norm_crop(..., image_size=224)
MIN_SIDE = 32
LARGE_SIDE = 2048
MAX_SIDE = 16384

# The files of the published packs. Only the detection and recognition models are used;
# FaceAnalysis still opens every .onnx in the folder, so the others may stay there.
KNOWN_PACKS: dict[str, dict[str, str]] = {
    "buffalo_l": {"detection": "det_10g.onnx", "recognition": "w600k_r50.onnx"},
    "antelopev2": {"detection": "scrfd_10g_bnkps.onnx", "recognition": "glintr100.onnx"},
}
OTHER_PACK_FILES: dict[str, tuple[str, ...]] = {
    "buffalo_l": ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx"),
    "antelopev2": ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx"),
}
MODULES = ("detection", "recognition")


class InsightFaceMissingError(ImportError):
    """insightface (or onnxruntime, which it needs) is not installed or does not import."""


class FaceModelsMissingError(FileNotFoundError):
    """The insightface model pack folder, or a model file in it, is missing."""


class FaceModelsError(RuntimeError):
    """The model pack is there but insightface cannot use it."""


def insightface_available() -> bool:
    """Whether insightface and onnxruntime are installed (without importing them)."""
    return all(importlib.util.find_spec(name) is not None for name in ("insightface", "onnxruntime"))


def _import_insightface() -> Any:
    try:
        import insightface
        from insightface.app import FaceAnalysis  # noqa: F401
        from insightface.utils import face_align  # noqa: F401
    except ImportError as e:
        raise InsightFaceMissingError(
            f"The FaceID adapters need the insightface package, which could not be imported ({e}). "
            f"Install it into the Python that runs ComfyUI: {PIP_LINE} "
            "(for NVIDIA GPUs use onnxruntime-gpu instead of onnxruntime, never both), then restart ComfyUI."
        ) from e
    except Exception as e:  # a broken install (binary mismatch of numpy, cv2 or onnxruntime)
        raise InsightFaceMissingError(
            f"insightface is installed but does not import: {type(e).__name__}: {e}. "
            f"Reinstalling it usually helps: {PIP_LINE}"
        ) from e
    return insightface


@contextlib.contextmanager
def _quiet_insightface() -> Iterator[None]:
    # insightface's face_align calls scikit-image's SimilarityTransform.estimate, which
    # scikit-image 0.26 marks deprecated (a FutureWarning on every alignment).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*`estimate` is deprecated", category=FutureWarning)
        yield


# ---------------------------------------------------------------------------------------------
# Loading


@dataclasses.dataclass
class FaceAnalyser:
    """An insightface ``FaceAnalysis`` prepared for one model pack (``app``), with its settings."""

    app: Any
    pack_dir: str
    name: str
    providers: list[str]
    det_size: tuple[int, int]
    det_thresh: float

    def __repr__(self) -> str:
        return (f"FaceAnalyser({self.name!r} at {self.pack_dir!r}, det_size={self.det_size}, "
                f"providers={self.providers})")


def _expected_files_text(name: str) -> str:
    if name in KNOWN_PACKS:
        files = KNOWN_PACKS[name]
        text = f"{files['detection']} (detection) and {files['recognition']} (recognition)"
        others = OTHER_PACK_FILES.get(name)
        if others:
            text += f"; the pack's other files ({', '.join(others)}) are not needed"
        return text
    known = "; ".join(f"{n}: {f['detection']}, {f['recognition']}" for n, f in KNOWN_PACKS.items())
    return f"a 5-point face detector (SCRFD) and an ArcFace recognition model as .onnx files ({known})"


def _check_pack_folder(pack_dir: str, name: str) -> None:
    how = ("Model packs are folders <root>/models/<name> holding the pack's .onnx files, e.g. "
           "ComfyUI/models/insightface/models/buffalo_l/.")
    if not os.path.isdir(pack_dir):
        raise FaceModelsMissingError(
            f"The insightface model pack folder {pack_dir} does not exist. It should hold "
            f"{_expected_files_text(name)}. {how}"
        )
    if name in KNOWN_PACKS:
        missing = [f for f in KNOWN_PACKS[name].values() if not os.path.isfile(os.path.join(pack_dir, f))]
        if missing:
            raise FaceModelsMissingError(
                f"The insightface model pack {pack_dir} lacks {', '.join(missing)}; it should hold "
                f"{_expected_files_text(name)}. Found: {sorted(os.listdir(pack_dir)) or 'nothing'}."
            )
    elif not glob.glob(os.path.join(pack_dir, "*.onnx")):
        raise FaceModelsMissingError(
            f"The insightface model pack folder {pack_dir} holds no .onnx file; it should hold "
            f"{_expected_files_text(name)}. {how}"
        )


def _check_providers(providers: Sequence[str]) -> list[str]:
    if isinstance(providers, str) or not providers or not all(isinstance(p, str) for p in providers):
        raise ValueError(f"providers must be a non-empty list of ONNX Runtime provider names, got {providers!r}")
    import onnxruntime

    available = set(onnxruntime.get_available_providers())
    usable = [p for p in providers if p in available]
    if len(usable) < len(providers):
        log.warning("onnxruntime %s lacks %s (it has %s); using %s", onnxruntime.__version__,
                    [p for p in providers if p not in available], sorted(available),
                    usable or ["CPUExecutionProvider"])
    return usable or ["CPUExecutionProvider"]


def _check_det_size(det_size: Sequence[int]) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in det_size)
    except (TypeError, ValueError):
        raise ValueError(f"det_size must be (width, height), got {det_size!r}") from None
    if width <= 0 or height <= 0 or width % 32 or height % 32:
        raise ValueError(f"det_size must be two positive multiples of 32 (the detector's largest stride), "
                         f"got {det_size!r}; the reference uses (640, 640)")
    return width, height


def load_face_analysis(
    pack_dir: str | os.PathLike,
    providers: Sequence[str],
    det_size: Sequence[int] = (640, 640),
    det_thresh: float = 0.5,
) -> FaceAnalyser:
    """insightface's ``FaceAnalysis`` for the model pack in ``pack_dir`` (``<root>/models/<name>``),
    with only its detection and recognition models, prepared at ``det_size`` (width, height)."""
    pack_dir = os.path.abspath(os.fspath(pack_dir))
    name = os.path.basename(pack_dir.rstrip(os.sep))
    det = _check_det_size(det_size)
    insightface = _import_insightface()
    _check_pack_folder(pack_dir, name)
    usable = _check_providers(providers)
    from insightface.app import FaceAnalysis

    root = os.path.dirname(os.path.dirname(pack_dir))
    try:
        # An absolute folder as `name`: insightface 2.x takes an existing folder as is, and its
        # 0.7 line joins it onto root, which leaves an absolute path unchanged. It never
        # downloads here, because the folder exists (checked above).
        app = FaceAnalysis(name=pack_dir, root=root, allowed_modules=list(MODULES), providers=usable)
    except AssertionError as e:  # insightface asserts that a detection model was found
        raise FaceModelsError(
            f"insightface found no face detection model in {pack_dir}; it needs "
            f"{_expected_files_text(name)}."
        ) from e
    except Exception as e:  # onnxruntime on a truncated or foreign file
        raise FaceModelsError(
            f"insightface could not load the models in {pack_dir} (a truncated or foreign .onnx file?): "
            f"{type(e).__name__}: {e}"
        ) from e
    missing = [m for m in MODULES if m not in app.models]
    if missing:
        raise FaceModelsError(
            f"insightface found no {' and no '.join(missing)} model in {pack_dir}; it needs "
            f"{_expected_files_text(name)}."
        )
    app.prepare(ctx_id=0, det_thresh=float(det_thresh), det_size=det)
    log.info("insightface %s: pack %s loaded from %s (detection %s, recognition %s) on %s, det_size %s",
             getattr(insightface, "__version__", "?"), name, pack_dir,
             os.path.basename(app.models["detection"].model_file or "?"),
             os.path.basename(app.models["recognition"].model_file or "?"), usable, det)
    return FaceAnalyser(app=app, pack_dir=pack_dir, name=name, providers=usable, det_size=det,
                        det_thresh=float(det_thresh))


# ---------------------------------------------------------------------------------------------
# Analysis


@dataclasses.dataclass(frozen=True)
class FaceResult:
    """One face of one picture (coordinates in pixels of that picture)."""

    embedding: torch.Tensor  # [512] float32, unit length: ArcFace's normed embedding
    raw_embedding: torch.Tensor  # [512] float32: ArcFace's embedding before normalising
    aligned_crop: torch.Tensor  # [crop, crop, 3] float32 0..1 RGB: norm_crop on the five key points
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2
    kps: torch.Tensor  # [5, 2] float32 (x, y): eyes, nose tip, mouth corners
    det_score: float
    index: int  # position in the size order (0 = largest)
    face_count: int  # faces found in the picture


def _to_bgr_uint8(image: torch.Tensor, label: str) -> np.ndarray:
    """[H, W, C] (or [1, H, W, C]) float 0..1 RGB -> [H, W, 3] uint8 BGR, contiguous."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{label} must be a torch.Tensor [H, W, 3], got {type(image).__name__}")
    if not image.is_floating_point():
        raise TypeError(f"{label} is a {image.dtype} tensor; face analysis takes float pixels 0..1 (ComfyUI's IMAGE)")
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{label} has shape {tuple(image.shape)}; face analysis takes one picture "
                         "[height, width, 3] (RGB; 1 grey or 4 RGBA channels are accepted too)")
    height, width = int(image.shape[0]), int(image.shape[1])
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"{label} is {width}x{height} px: too small to find a face in "
                         f"(face analysis needs at least {MIN_SIDE} px on each side)")
    if max(height, width) > MAX_SIDE:
        raise ValueError(f"{label} is {width}x{height} px: larger than {MAX_SIDE} px on a side, "
                         "which face analysis does not take; scale it down first")
    out = np.empty((height, width, 3), dtype=np.uint8)
    rows = max(1, (1 << 20) // width)  # about 1 M pixels per step: no full-size float copies
    channels = [2, 1, 0] if image.shape[-1] >= 3 else [0, 0, 0]  # RGB(A) -> BGR, grey -> BGR
    for start in range(0, height, rows):
        part = image[start:start + rows].detach().to("cpu", torch.float32).numpy()[..., channels]
        part = np.nan_to_num(part, nan=0.0, posinf=1.0, neginf=0.0)
        np.clip(part, 0.0, 1.0, out=part)
        part *= 255.0
        out[start:start + rows] = np.rint(part, out=part)
    return out


def _size_order(faces: list[Any]) -> list[Any]:
    def key(face: Any) -> tuple[float, float, float]:
        x1, y1, x2, y2 = (float(v) for v in face.bbox[:4])
        return (-max(x2 - x1, 0.0) * max(y2 - y1, 0.0), x1, y1)

    return sorted(faces, key=key)


def _detect(analyser: FaceAnalyser, bgr: np.ndarray) -> tuple[list[Any], bool]:
    """insightface's faces on the picture, coordinates in its pixels; True if detection ran on a
    shrunk copy (embeddings then still to be taken from the full picture)."""
    height, width = bgr.shape[:2]
    if max(height, width) <= LARGE_SIDE:
        return analyser.app.get(bgr), False
    import cv2

    det_w, det_h = analyser.det_size
    scale = min(det_w / width, det_h / height)
    small_w, small_h = max(1, round(width * scale)), max(1, round(height * scale))
    small = cv2.resize(bgr, (small_w, small_h), interpolation=cv2.INTER_AREA)
    log.debug("face analysis: %dx%d px shrunk to %dx%d for detection", width, height, small_w, small_h)
    faces = _detect_only(analyser, small)
    sx, sy = width / small_w, height / small_h
    for face in faces:
        face.bbox = np.asarray(face.bbox, dtype=np.float32) * np.array([sx, sy, sx, sy], dtype=np.float32)
        if face.kps is not None:
            face.kps = np.asarray(face.kps, dtype=np.float32) * np.array([sx, sy], dtype=np.float32)
    return faces, True


def _detect_only(analyser: FaceAnalyser, bgr: np.ndarray) -> list[Any]:
    """Detection without recognition (insightface's FaceAnalysis.get, minus the other models)."""
    from insightface.app.common import Face

    bboxes, kpss = analyser.app.det_model.detect(bgr, max_num=0, metric="default")
    return [Face(bbox=bboxes[i, 0:4], kps=None if kpss is None else kpss[i], det_score=bboxes[i, 4])
            for i in range(bboxes.shape[0])]


def _check_crop_size(crop_size: int) -> int:
    if isinstance(crop_size, bool) or not isinstance(crop_size, int) or crop_size <= 0 \
            or (crop_size % 112 and crop_size % 128):
        raise ValueError(f"crop_size must be a positive multiple of 112 or 128 (insightface's norm_crop), "
                         f"got {crop_size!r}; the reference uses {REFERENCE_CROP_SIZE}")
    return crop_size


def analyse(
    face_analysis: FaceAnalyser,
    image: torch.Tensor,
    index: int | None = None,
    label: str = "the image",
    crop_size: int = REFERENCE_CROP_SIZE,
) -> FaceResult:
    """The face of ``image`` ([H, W, 3] float 0..1 RGB): the largest, or the ``index``-th by size.

    ``label`` names the picture in errors ("image 2 of 3"). Raises ValueError when no face is
    found, the index is out of range, or the picture cannot be used (see the module docstring).
    """
    if index is not None:
        if isinstance(index, bool):
            raise TypeError(f"index must be an int or None, got {index!r}")
        try:
            index = operator.index(index)
        except TypeError:
            raise TypeError(f"index must be an int or None, got {index!r}") from None
    crop_size = _check_crop_size(crop_size)
    bgr = _to_bgr_uint8(image, label)
    height, width = bgr.shape[:2]
    _import_insightface()
    from insightface.utils import face_align

    with _quiet_insightface():
        faces, shrunk = _detect(face_analysis, bgr)
        if not faces:
            raise ValueError(
                f"No face found in {label} ({width}x{height} px, detection at {face_analysis.det_size[0]}x"
                f"{face_analysis.det_size[1]}, threshold {face_analysis.det_thresh}). Use a picture where the "
                "face is clearly visible and not too small (a tighter crop helps)."
            )
        ordered = _size_order(faces)
        chosen = 0 if index is None else index
        if not -len(ordered) <= chosen < len(ordered):
            raise ValueError(f"{label}: face index {index} asked for, but {len(ordered)} face(s) found "
                             f"(faces are numbered by size, 0 = largest, up to {len(ordered) - 1})")
        face = ordered[chosen]
        position = chosen % len(ordered)
        if face.kps is None:
            raise FaceModelsError(f"The detection model of {face_analysis.pack_dir} gives no key points; "
                                  "FaceID needs a 5-point detector (det_10g.onnx or scrfd_10g_bnkps.onnx)")
        kps = np.asarray(face.kps, dtype=np.float32)
        if shrunk or face.embedding is None:
            face_analysis.app.models["recognition"].get(bgr, face)
        crop_bgr = face_align.norm_crop(bgr, landmark=kps, image_size=crop_size)

    raw = np.asarray(face.embedding, dtype=np.float32).reshape(-1)
    if raw.size != EMBEDDING_SIZE:
        raise FaceModelsError(f"The recognition model of {face_analysis.pack_dir} gives {raw.size} values; "
                              f"FaceID adapters need ArcFace's {EMBEDDING_SIZE}")
    norm = float(np.linalg.norm(raw))
    if not math.isfinite(norm) or norm == 0.0:
        raise ValueError(f"The face embedding of {label} is degenerate (norm {norm})")
    embedding = torch.from_numpy(raw / norm)
    crop = torch.from_numpy(crop_bgr[..., ::-1].astype(np.float32) / np.float32(255.0))
    bbox = tuple(float(v) for v in np.asarray(face.bbox, dtype=np.float64)[:4])
    log.debug("face analysis of %s: %d face(s), took #%d bbox %s score %.3f", label, len(ordered), position,
              [round(v, 1) for v in bbox], float(face.det_score))
    return FaceResult(
        embedding=embedding,
        raw_embedding=torch.from_numpy(raw.copy()),
        aligned_crop=crop,
        bbox=bbox,  # type: ignore[arg-type]
        kps=torch.from_numpy(kps.copy()),
        det_score=float(face.det_score),
        index=position,
        face_count=len(ordered),
    )
