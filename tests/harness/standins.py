"""What the shipped workflows need from disk -- model files and input images -- and stand-ins for them.

The workflows in ``workflows/`` name the published model files (``ip-adapter_sd15.safetensors``
...). On a machine without those weights the tests and the demo run the same workflows on the
generated random-weight files of ``tests/fixtures/generate.py`` (FaceID adapters:
``tests/fixtures/faceid_files.py``): ``build_models_tree`` makes a models tree in which each name
a workflow uses is a symlink to the generated file with the same layout (``STAND_INS``; a
workflow may also name a generated file directly). The insightface model packs that Load
InsightFace nodes name (``buffalo_l``) become ``insightface/models/<pack>`` links to the generated
stand-in packs of ``tests/fixtures/face_models.py``, whose detector finds drawn faces. Input
images that a workflow loads are copied from ``workflows/`` (or ``workflows/input/``) into
ComfyUI's input folder, or drawn if missing (``stage_inputs``): face pictures (``FACE_PICTURES``)
as squares on a dark background that the stand-in detector finds, the others as a structured
test picture.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
MODEL_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".sft")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGE_SEARCH_DIRS = (REPO / "workflows", REPO / "workflows" / "input", REPO / "workflows" / "images")

FACE_FOLDER = "insightface"  # ComfyUI model folder of the insightface packs: <folder>/models/<pack>/*.onnx

_TINY_SD15 = "checkpoints/sd15_tiny.safetensors"
_TINY_SDXL = "checkpoints/sdxl_tiny.safetensors"

# Published file name -> the generated file with the same key layout. The stand-in adapters are
# the "tiny" ones, whose widths match the stand-in checkpoints (320 channels everywhere).
STAND_INS: dict[str, str] = {
    # checkpoints
    "v1-5-pruned-emaonly.safetensors": _TINY_SD15,
    "v1-5-pruned-emaonly-fp16.safetensors": _TINY_SD15,
    "v1-5-pruned-emaonly.ckpt": _TINY_SD15,
    "v1-5-pruned.safetensors": _TINY_SD15,
    "sd_xl_base_1.0.safetensors": _TINY_SDXL,
    # an SD1.5 fine-tune: a second SD1.5-layout checkpoint with other weights
    "dreamshaper_8.safetensors": "checkpoints/sd15_tiny_b.safetensors",
    "sd_xl_base_1.0_0.9vae.safetensors": _TINY_SDXL,
    # CLIP vision encoders (full size: ComfyUI only loads the real shapes)
    "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors": "clip_vision/vit_h.safetensors",
    "clip_vision_h.safetensors": "clip_vision/vit_h.safetensors",
    "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors": "clip_vision/vit_g.safetensors",
    "clip_vision_g.safetensors": "clip_vision/vit_g.safetensors",
    "clip_vision_l.safetensors": "clip_vision/vit_l.safetensors",
    # IP-Adapter files (h94/IP-Adapter names)
    "ip-adapter_sd15.safetensors": "ipadapter/sd15_tiny_base.safetensors",
    "ip-adapter_sd15.bin": "ipadapter/sd15_tiny_base.bin",
    "ip-adapter-plus_sd15.safetensors": "ipadapter/sd15_tiny_plus.safetensors",
    "ip-adapter-plus_sd15.bin": "ipadapter/sd15_tiny_plus.bin",
    "ip-adapter-full-face_sd15.safetensors": "ipadapter/sd15_tiny_fullface.safetensors",
    "ip-adapter-full-face_sd15.bin": "ipadapter/sd15_tiny_fullface.bin",
    "ip-adapter_sd15_vit-G.safetensors": "ipadapter/sd15_tiny_vitg.safetensors",
    "ip-adapter_sd15_vit-G.bin": "ipadapter/sd15_tiny_vitg.bin",
    "ip-adapter_sdxl.safetensors": "ipadapter/sdxl_tiny_base.safetensors",
    "ip-adapter_sdxl.bin": "ipadapter/sdxl_tiny_base.bin",
    "ip-adapter_sdxl_vit-h.safetensors": "ipadapter/sdxl_tiny_vith.safetensors",
    "ip-adapter_sdxl_vit-h.bin": "ipadapter/sdxl_tiny_vith.bin",
    "ip-adapter-plus_sdxl_vit-h.safetensors": "ipadapter/sdxl_tiny_plus_vith.safetensors",
    "ip-adapter-plus_sdxl_vit-h.bin": "ipadapter/sdxl_tiny_plus_vith.bin",
    # FaceID files (h94/IP-Adapter-FaceID names; Plus v1 and v2 share one layout). Published as .bin,
    # so their stand-ins are .bin too: the loader reads a file by its extension.
    "ip-adapter-faceid_sd15.bin": "ipadapter/sd15_tiny_faceid.bin",
    "ip-adapter-faceid-plus_sd15.bin": "ipadapter/sd15_tiny_faceid_plus.bin",
    "ip-adapter-faceid-plusv2_sd15.bin": "ipadapter/sd15_tiny_faceid_plus.bin",
    "ip-adapter-faceid-portrait_sd15.bin": "ipadapter/sd15_tiny_faceid_portrait.bin",
    "ip-adapter-faceid-portrait-v11_sd15.bin": "ipadapter/sd15_tiny_faceid_portrait.bin",
    "ip-adapter-faceid_sdxl.bin": "ipadapter/sdxl_tiny_faceid.bin",
    "ip-adapter-faceid-plusv2_sdxl.bin": "ipadapter/sdxl_tiny_faceid_plus.bin",
    "ip-adapter-faceid-portrait_sdxl.bin": "ipadapter/sdxl_tiny_faceid_portrait.bin",
    "ip-adapter-faceid-portrait_sdxl_unnorm.bin": "ipadapter/sdxl_tiny_faceid_portrait_unnorm.bin",
    # ControlNet / LoRA
    "add_detail.safetensors": "loras/sd15_tiny_lora.safetensors",
    "control_v11p_sd15_canny.safetensors": "controlnet/sd15_tiny_controlnet.safetensors",
    "control_v11f1p_sd15_depth.safetensors": "controlnet/sd15_tiny_controlnet.safetensors",
}


class MissingStandIn(LookupError):
    """A workflow names a model file that has no generated stand-in."""


def load_workflow(path: Path | str) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _widget_strings(workflow: dict) -> Iterable[tuple[dict, str]]:
    for node in workflow.get("nodes", []):
        values = node.get("widgets_values")
        if isinstance(values, dict):
            values = list(values.values())
        for value in values or []:
            if isinstance(value, str):
                yield node, value


def model_references(workflow: dict) -> list[str]:
    """Model file names (as written, may include a subfolder) in the workflow's widget values."""
    seen: dict[str, None] = {}
    for node, value in _widget_strings(workflow):
        if node.get("type") in ("Note", "MarkdownNote"):
            continue
        if value.lower().endswith(MODEL_EXTENSIONS):
            seen[value] = None
    return list(seen)


def face_pack_references(workflow: dict) -> list[str]:
    """insightface model packs (``buffalo_l`` ...) that the workflow's Load InsightFace nodes name."""
    from tests.fixtures.face_models import PACKS

    seen: dict[str, None] = {}
    for node, value in _widget_strings(workflow):
        if "InsightFace" in str(node.get("type")) and value in PACKS:
            seen[value] = None
    return list(seen)


def image_references(workflow: dict) -> list[str]:
    """Input image names that loader nodes (LoadImage, LoadImageMask, ...) of the workflow read."""
    seen: dict[str, None] = {}
    for node, value in _widget_strings(workflow):
        if "LoadImage" in str(node.get("type")) and value.lower().endswith(IMAGE_EXTENSIONS):
            seen[value] = None
    return list(seen)


def _known_fixture_names() -> list[str]:
    from tests.fixtures import faceid_files, generate

    return list(generate.NAMES) + list(faceid_files.NAMES)


def _is_faceid_fixture(name: str) -> bool:
    from tests.fixtures import faceid_files

    return name in faceid_files.NAMES


def stand_in_for(name: str, known: list[str] | None = None) -> str:
    """The generated file (``folder/file`` under MODELS_ROOT) that stands in for a model name."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    if base in STAND_INS:
        return STAND_INS[base]
    known = _known_fixture_names() if known is None else known
    direct = [k for k in known if k.rsplit("/", 1)[-1] == base]
    if direct:
        return direct[0]
    raise MissingStandIn(f"model file {name!r} has no generated stand-in: add it to STAND_INS in {__file__} "
                         f"(generated files: {', '.join(known)})")


def workflow_models(workflows: Iterable[Path | str], strict: bool = True) -> dict[str, str]:
    """{"<folder>/<name as written>": "<generated stand-in name>"} for every model the workflows use.

    strict=False leaves out (with a warning) the names that have no stand-in instead of raising.
    """
    known = _known_fixture_names()
    out = {}
    for wf in workflows:
        for name in model_references(load_workflow(wf)):
            try:
                fixture = stand_in_for(name, known)
            except MissingStandIn as exc:
                if strict:
                    raise MissingStandIn(f"{Path(wf).name}: {exc}") from None
                log.warning("%s: %s", Path(wf).name, exc)
                continue
            out[f"{fixture.split('/', 1)[0]}/{name}"] = fixture
    return out


def fixture_names_for_workflows(workflows: Iterable[Path | str], strict: bool = True) -> list[str]:
    """The files of tests/fixtures/generate.py (its ``ensure`` names) that the workflows' stand-ins need.

    FaceID stand-ins and insightface packs come from their own generators; build_models_tree makes them.
    """
    return sorted({f for f in workflow_models(workflows, strict).values() if not _is_faceid_fixture(f)})


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(target).resolve(), target_is_directory=Path(target).is_dir())


def build_models_tree(dest: Path, workflows: Iterable[Path | str],
                      ensure: Callable[..., dict[str, Path]], strict: bool = True) -> Path:
    """A models tree (checkpoints/, clip_vision/, ..., insightface/models/<pack>) where each model a
    workflow names is its stand-in. ``ensure`` makes the generate.py files; FaceID adapters and
    insightface packs come from tests/fixtures/faceid_files.py and face_models.py."""
    from tests.fixtures import face_models, faceid_files

    workflows = list(workflows)
    mapping = workflow_models(workflows, strict)
    faceid = sorted({f for f in mapping.values() if _is_faceid_fixture(f)})
    generated = sorted(set(mapping.values()) - set(faceid))
    paths = dict(ensure(*generated)) if generated else {}
    if faceid:
        paths.update(faceid_files.ensure_faceid(*faceid))
    dest.mkdir(parents=True, exist_ok=True)
    for alias, fixture in sorted(mapping.items()):
        _link(dest / alias, Path(paths[fixture]))
        log.info("stand-in: %s -> %s", alias, fixture)
    packs = sorted({p for wf in workflows for p in face_pack_references(load_workflow(wf))})
    for pack in packs:
        _link(dest / FACE_FOLDER / "models" / pack, face_models.ensure_pack(pack))
        log.info("stand-in: %s/models/%s -> generated pack", FACE_FOLDER, pack)
    return dest


def missing_real_models(workflow: dict, roots: Iterable[Path], folders: Iterable[str]) -> list[str]:
    """Model names of the workflow not found under any root/<folder>/ (empty: all present); insightface
    packs count as present when root/insightface/models/<pack>/ (or root/insightface/<pack>/) exists."""
    roots, folders = [Path(r) for r in roots], list(folders)
    missing = []
    for name in model_references(workflow):
        if not any((root / folder / name).is_file() for root in roots for folder in folders):
            missing.append(name)
    for pack in face_pack_references(workflow):
        if not any((root / FACE_FOLDER / sub / pack).is_dir() for root in roots for sub in ("models", "")):
            missing.append(f"{FACE_FOLDER}/models/{pack}/")
    return missing


def draw_reference_image(path: Path, size: int = 512) -> Path:
    """A deterministic, structured test picture (gradients, a disc and bars), for a missing input."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    r = 0.5 + 0.5 * np.sin(6.0 * x + 1.0)
    g = y
    b = ((x - 0.5) ** 2 + (y - 0.45) ** 2 < 0.08).astype(np.float32)
    bars = (np.floor(x * 8) % 2 == 0) & (y > 0.8)
    rgb = np.stack([r, g, np.maximum(b, bars)], axis=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB").save(path)
    return path


# Face pictures the FaceID workflows load: (side, faces as (x0, y0, size, style) in pixels, background
# seed). One person in several pictures (same style, other places and sizes), as FaceID Portrait
# takes them; the stand-in detector (tests/fixtures/face_models.py) finds each square.
FACE_PICTURES: dict[str, tuple[int, tuple[tuple[int, int, int, int], ...], int]] = {
    "ipadapter_face_1.png": (512, ((150, 110, 240, 0),), 11),
    "ipadapter_face_2.png": (512, ((60, 170, 200, 0),), 12),
    "ipadapter_face_3.png": (512, ((230, 60, 260, 0),), 13),
}


def draw_face_picture(path: Path, side: int, faces, seed: int = 0) -> Path:
    """A [side x side] picture with square faces on a dark background (face_models.draw)."""
    from PIL import Image

    from tests.fixtures.face_models import DrawnFace, draw

    picture = draw(side, side, [DrawnFace(*face) for face in faces], seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((picture * 255).round().byte().numpy(), "RGB").save(path)
    return path


def stage_inputs(workflow: dict, input_dir: Path, search_dirs: Iterable[Path] = IMAGE_SEARCH_DIRS,
                 max_side: int | None = None) -> list[Path]:
    """Puts every image the workflow loads into ComfyUI's input folder; draws the missing ones.

    max_side: shrink the staged pictures to fit (aspect kept), for quick test runs.
    """
    staged = []
    for name in image_references(workflow):
        dest = Path(input_dir) / name
        if not dest.exists():
            source = next((Path(d) / name for d in search_dirs if (Path(d) / name).is_file()), None)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if source is not None:
                shutil.copyfile(source, dest)
                log.info("input image %s from %s", name, source)
            elif name in FACE_PICTURES:
                side, faces, seed = FACE_PICTURES[name]
                draw_face_picture(dest, side, faces, seed)
                log.info("input image %s: drew a face picture for the stand-in face detector", name)
            else:
                draw_reference_image(dest)
                log.warning("input image %s not shipped in workflows/: drew a synthetic one", name)
        if max_side is not None:
            _fit(dest, max_side)
        staged.append(dest)
    return staged


def _fit(path: Path, max_side: int) -> None:
    from PIL import Image

    with Image.open(path) as img:
        if max(img.size) <= max_side:
            return
        scale = max_side / max(img.size)
        small = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
        small.save(path, format=img.format or "PNG")
