"""Hostile input: broken and malicious files, odd pictures, masks and settings.

Every case either fails with a clear error that names the problem (asserted on the message
text) or, where the input is valid, gives a correct result -- and after each one the real
server (conftest's shared ``comfy_server``) still answers and runs a good workflow. The bad
files come from ``tests/harness/hostile_corpus.py`` and are written where the server looks at run
time: ``<base>/models/ipadapter`` (the pack registers ComfyUI's default models/ipadapter),
``<base>/output/ipadapter_embeds`` and ``<base>/input``. A pickle that carries code must be
refused without running it: it would create a marker file, which must never appear.

FaceID: broken insightface model packs (in ``<base>/models/insightface/models/``), face pictures of
1x1 and 8192 px and without a face, a Kolors FaceID file (with the adapter cases), and a second
server on which ``import insightface`` fails as if it were not installed (a ``sitecustomize`` on its
PYTHONPATH hides the package): Load InsightFace must name the pip line, and that server keeps serving.

Inputs that ComfyUI's own nodes cannot deliver through the API (1- or 4-channel IMAGE
tensors, values outside [0, 1], NaN, zero-sized images and masks) are tested in-process
(``comfy_inprocess``) by calling the node classes, together with the promise that no node
changes the MODEL or CLIP_VISION it is given, even when it fails half-way.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
from pathlib import Path

import pytest
import torch

from tests.harness.comfy_host import REPO, ComfyServer, PromptFailed, PromptRejected
from tests.harness.hostile_corpus import (
    EMBEDS_FORMAT,
    FACE_IMAGE_CASES,
    IMAGE_CASES,
    PACK_CASES,
    FaceImageCase,
    FileCase,
    PackCase,
    adapter_cases,
    embeds_cases,
    save_tensors,
    write_face_png,
    write_png,
)

CHECKPOINT = "sd15_tiny.safetensors"
GOOD_ADAPTER = "sd15_tiny_base.safetensors"
GOOD_IMAGE = "hx_good.png"
GOOD_EMBEDS = "hx_good_embeds.safetensors"  # ViT-H image_embeds, for the base adapter
VIT_H, VIT_L = "vit_h.safetensors", "vit_l.safetensors"
PACK_ERRORS = {"ValueError", "AdapterFormatError"}
NEEDED = ("checkpoints/sd15_tiny.safetensors", "clip_vision/vit_h.safetensors", "clip_vision/vit_l.safetensors",
          "ipadapter/sd15_tiny_base.safetensors", "ipadapter/sd15_tiny_plus.safetensors",
          "ipadapter/sd15_tiny_fullface.safetensors", "ipadapter/sdxl_tiny_base.safetensors",
          "ipadapter/sdxl_tiny_vith.safetensors",
          "ipadapter/sd15_base.safetensors")

# Names and expectations are static; the files are written by the fixture (they need the stand-ins).
_NOWHERE = Path("/nonexistent")
ADAPTER_CASES = adapter_cases(dict.fromkeys(("base", "plus", "fullface"), _NOWHERE), _NOWHERE)
EMBEDS_CASES = embeds_cases(_NOWHERE)

_seeds = itertools.count(100)


# --- API prompts ------------------------------------------------------------------------------


def base_prompt(adapter: str = GOOD_ADAPTER, image: str = GOOD_IMAGE, weight: float = 0.7, seed: int | None = None,
                clip_vision: str = VIT_H, batch: int = 1, encode: bool = False,
                embeds: str = GOOD_EMBEDS) -> dict:
    """Checkpoint + adapter -> Apply -> 1 step at 64 px -> SaveImage; the encodings come from an embeds file,
    or with encode=True from LoadImage -> Encode (CLIP ViT-H in fp16 on a CPU: seconds per picture).

    The CLIP vision loader, the good picture and its encoding are in every prompt, connected or not:
    ComfyUI keeps the cached outputs of every node in the current prompt, so the 1.2 GB encoder
    stays loaded from one case to the next.
    """
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "IPAdapterExactLoader", "inputs": {"ipadapter_file": adapter}},
        "3": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": clip_vision}},
        "4": {"class_type": "LoadImage", "inputs": {"image": image}},
        "5": {"class_type": "IPAdapterExactEncode", "inputs": {
            "ipadapter": ["2", 0], "clip_vision": ["3", 0], "image": ["4", 0], "crop": "center",
            "negative": "reference (zero)"}},
        "15": {"class_type": "IPAdapterExactLoadEmbeds", "inputs": {"embeds_file": embeds}},
        "6": {"class_type": "IPAdapterExactApply", "inputs": {
            "model": ["1", 0], "ipadapter": ["2", 0], "image_embeds": ["5" if encode else "15", 0], "weight": weight,
            "weight_type": "V only", "start_at": 0.0, "end_at": 1.0, "combine_embeds": "concat"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red house"}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "10": {"class_type": "KSampler", "inputs": {
            "model": ["6", 0], "positive": ["7", 0], "negative": ["8", 0], "latent_image": ["9", 0],
            "seed": next(_seeds) if seed is None else seed, "steps": 1, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "hostile"}},
    }


def pack_error(exc: PromptFailed) -> dict:
    """The execution_error event of a failed prompt."""
    for event, data in (exc.entry.get("status") or {}).get("messages") or []:
        if event == "execution_error":
            return data
    raise AssertionError(f"no execution_error in {exc.entry.get('status')}")


def expect_failure(server, prompt: dict, pattern: str, node_type: str | None = None,
                   pack_exception: bool = True) -> dict:
    with pytest.raises(PromptFailed) as err:
        server.run(prompt, timeout=300)
    data = pack_error(err.value)
    message = data.get("exception_message", "")
    assert re.search(pattern, message, re.S), f"error does not match {pattern!r}:\n{message}"
    if node_type is not None:
        assert data.get("node_type") == node_type, data.get("node_type")
    if pack_exception:
        # a ValueError-style refusal, never a raw shape/index error from deep inside torch
        assert data.get("exception_type", "").rsplit(".", 1)[-1] in PACK_ERRORS, data.get("exception_type")
    return data


def expect_rejection(server, prompt: dict, node_id: str, error_type: str, pattern: str) -> None:
    with pytest.raises(PromptRejected) as err:
        server.queue(prompt)
    errors = err.value.node_errors.get(node_id, {}).get("errors", [])
    assert any(e["type"] == error_type and re.search(pattern, e.get("details", "") + e.get("message", ""))
               for e in errors), errors


def saved_pixels(server, entry: dict):
    import numpy as np
    from PIL import Image

    paths = [p for p in server.output_images(entry) if p.parent.is_relative_to(server.output_dir)]
    assert paths, entry.get("outputs")
    return [np.asarray(Image.open(p)).astype(np.int16) for p in paths]


# --- the server side ----------------------------------------------------------------------------


def hostile_run(server, prompt: dict) -> dict:
    return server.run(prompt, timeout=300)


class Hostile:
    """The shared server with the corpus staged in its folders."""

    def __init__(self, server, models, marker: Path):
        self.server = server
        self.marker = marker
        self.adapter_dir = server.base / "models" / "ipadapter"
        self.embeds_dir = server.output_dir / "ipadapter_embeds"
        self.good_runs = 0

    def assert_healthy(self) -> None:
        """The server answers and runs a good workflow (a fresh seed, so the sampler really runs)."""
        assert self.server.alive(), self.server.log_tail()
        assert self.server.system_stats()["system"]
        entry = self.server.run(base_prompt(weight=0.5 + 0.01 * (self.good_runs % 40)), timeout=300)
        assert entry["status"]["status_str"] == "success"
        assert saved_pixels(self.server, entry)
        self.good_runs += 1
        assert not self.marker.exists(), "a pickle's code ran inside the server"


@pytest.fixture(scope="module")
def hostile(comfy_server, models, tmp_path_factory):
    paths = models.ensure(*NEEDED)
    marker = tmp_path_factory.mktemp("marker") / "code_ran.txt"
    sources = {kind: paths[f"ipadapter/sd15_tiny_{kind}.safetensors"] for kind in ("base", "plus", "fullface")}
    h = Hostile(comfy_server, models, marker)
    for case in adapter_cases(sources, marker):
        case.write(h.adapter_dir)
    for case in embeds_cases(sources["base"]):
        case.write(h.embeds_dir)
    save_tensors(h.embeds_dir / GOOD_EMBEDS,
                 {"cond": torch.randn(1, 1024, generator=torch.Generator().manual_seed(5)),
                  "uncond": torch.zeros(1, 1024)},
                 {"format": EMBEDS_FORMAT, "output": "image_embeds", "width": "1024", "source": "tests"})
    write_png(comfy_server.input_dir / GOOD_IMAGE, 64, 64, seed=1)
    for case in IMAGE_CASES:
        write_png(comfy_server.input_dir / case.name, case.width, case.height, case.mode, seed=2)
    (comfy_server.input_dir / "hx_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    # the whole path once with a real encoding (and the encoder loaded for the picture cases)
    assert hostile_run(comfy_server, base_prompt(encode=True))["status"]["status_str"] == "success"
    h.assert_healthy()
    yield h
    assert not marker.exists(), "a pickle's code ran inside the server"



@pytest.mark.server
@pytest.mark.parametrize("case", ADAPTER_CASES, ids=[c.name for c in ADAPTER_CASES])
def test_adapter_file(hostile, case: FileCase):
    prompt = base_prompt(adapter=case.name)
    if case.expect is None:
        entry = hostile.server.run(prompt, timeout=300)
        assert entry["status"]["status_str"] == "success"
        # a valid legacy file gives exactly the picture its .safetensors original gives
        reference = hostile.server.run(base_prompt(seed=prompt["10"]["inputs"]["seed"]), timeout=300)
        assert all((a == b).all() for a, b in zip(saved_pixels(hostile.server, entry),
                                                   saved_pixels(hostile.server, reference), strict=True))
    else:
        expect_failure(hostile.server, prompt, case.expect, "IPAdapterExactLoader")
    assert not hostile.marker.exists(), f"{case.name}: the pickle's code ran"
    hostile.assert_healthy()


def embeds_prompt(name: str) -> dict:
    return base_prompt(embeds=name)


@pytest.mark.server
@pytest.mark.parametrize("case", EMBEDS_CASES, ids=[c.name for c in EMBEDS_CASES])
def test_embeds_file(hostile, case: FileCase):
    node = "IPAdapterExactApply" if case.stage == "apply" else "IPAdapterExactLoadEmbeds"
    expect_failure(hostile.server, embeds_prompt(case.name), case.expect, node)
    hostile.assert_healthy()


@pytest.mark.server
@pytest.mark.parametrize("case", IMAGE_CASES, ids=[c.name for c in IMAGE_CASES])
def test_odd_pictures_work(hostile, case):
    """1x1, 8192 px on one side, grayscale, RGBA, 16-bit: LoadImage hands RGB; each must just work."""
    entry = hostile.server.run(base_prompt(image=case.name, encode=True), timeout=300)
    assert entry["status"]["status_str"] == "success"
    assert saved_pixels(hostile.server, entry)[0].shape == (64, 64, 3)
    hostile.assert_healthy()


@pytest.mark.server
def test_corrupt_picture_fails_in_comfyui_not_in_the_pack(hostile):
    prompt = base_prompt(image="hx_corrupt.png", encode=True)
    data = expect_failure(hostile.server, prompt, r"cannot identify image file", "LoadImage", pack_exception=False)
    assert "IPAdapterExact" not in data["node_type"]
    hostile.assert_healthy()


@pytest.mark.server
def test_batch_of_mismatched_sizes(hostile):
    """ComfyUI cannot deliver a ragged batch: ImageBatch rescales the second picture to the first."""
    prompt = base_prompt(encode=True)
    prompt["13"] = {"class_type": "LoadImage", "inputs": {"image": "hx_wide_8192.png"}}
    prompt["14"] = {"class_type": "ImageBatch", "inputs": {"image1": ["4", 0], "image2": ["13", 0]}}
    prompt["5"]["inputs"]["image"] = ["14", 0]
    entry = hostile.server.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success"
    hostile.assert_healthy()


@pytest.mark.server
def test_all_zero_mask_leaves_the_picture_as_without_adapter(hostile):
    seed = next(_seeds)
    masked = base_prompt(seed=seed, weight=1.0)
    masked["13"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}}
    masked["6"]["inputs"]["attn_mask"] = ["13", 0]
    plain = base_prompt(seed=seed)
    plain["10"]["inputs"]["model"] = ["1", 0]
    with_mask = saved_pixels(hostile.server, hostile.server.run(masked, timeout=300))[0]
    without = saved_pixels(hostile.server, hostile.server.run(plain, timeout=300))[0]
    assert (with_mask == without).all(), f"max difference {abs(with_mask - without).max()}"
    # and the same mask at 1 does change the picture (the adapter is live)
    masked["13"]["inputs"]["value"] = 1.0
    full = saved_pixels(hostile.server, hostile.server.run(masked, timeout=300))[0]
    assert (full != without).any()
    hostile.assert_healthy()


@pytest.mark.server
def test_mask_batch_that_fits_no_latent_batch(hostile):
    prompt = base_prompt(batch=2)
    prompt["13"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 3, "color": 0}}
    prompt["14"] = {"class_type": "ImageToMask", "inputs": {"image": ["13", 0], "channel": "red"}}
    prompt["6"]["inputs"]["attn_mask"] = ["14", 0]
    expect_failure(hostile.server, prompt, r"3 attention masks for a batch of 2 latents: give at most 2", "KSampler")
    hostile.assert_healthy()


@pytest.mark.server
@pytest.mark.parametrize("field,value,error_type,pattern", [
    ("weight", 10.0, "value_bigger_than_max", r"Value 10\.0 bigger than max of 5\.0"),
    ("weight", -3.0, "value_smaller_than_min", r"Value -3\.0 smaller than min of -1\.0"),
    ("start_at", 1.5, "value_bigger_than_max", r"Value 1\.5 bigger than max of 1\.0"),
    ("end_at", -0.5, "value_smaller_than_min", r"Value -0\.5 smaller than min of 0\.0"),
    ("weight_type", "K+Q", "value_not_in_list", r"weight_type: 'K\+Q' not in"),
    ("combine_embeds", "merge", "value_not_in_list", r"combine_embeds: 'merge' not in"),
])
def test_settings_out_of_bounds_are_rejected_by_comfyui(hostile, field, value, error_type, pattern):
    prompt = base_prompt()
    prompt["6"]["inputs"][field] = value
    expect_rejection(hostile.server, prompt, "6", error_type, pattern)
    hostile.assert_healthy()


@pytest.mark.server
def test_start_after_end(hostile):
    prompt = base_prompt()
    prompt["6"]["inputs"].update(start_at=0.8, end_at=0.2)
    expect_failure(hostile.server, prompt, r"start_at \(0\.8\) is after end_at \(0\.2\).*set start_at <= end_at",
                   "IPAdapterExactApply")
    hostile.assert_healthy()


@pytest.mark.server
@pytest.mark.parametrize("table,block_dict,node,pattern", [
    ("input eight = 1", "", "IPAdapterExactLayerWeights", r"cannot read layer weight 'input eight = 1'"),
    ("output 1 = 1..2", "", "IPAdapterExactLayerWeights", r"'1\.\.2' is not a number"),
    ("", '{"up": {"block_0": [0, 1, 0]', "IPAdapterExactLayerWeights", r"block dictionary is not valid JSON"),
    ("", '{"left": 1}', "IPAdapterExactLayerWeights", r'only the keys "down", "mid" and "up"'),
    ("default=0", '{"up": 1}', "IPAdapterExactLayerWeights", r"either a layer table or a diffusers block dictionary"),
    ("input 99 = 1", "", "IPAdapterExactApply", r"name 'input 99', which this adapter does not have"),
    ("1, 2, 3", "", "IPAdapterExactApply", r"3 layer weights given; this adapter has 16 layers"),
    ("", '{"up": {"block_9": 1}}', "IPAdapterExactApply", r"up has no attention block block_9"),
    ("", '{"up": {"block_1": [1, 2]}}', "IPAdapterExactApply", r"up block_1 has 3 attentions; 2 scales were given"),
], ids=["unreadable", "not-a-number", "bad-json", "bad-keys", "both", "missing-block", "wrong-count",
        "dict-missing-block", "dict-wrong-count"])
def test_layer_weights_that_do_not_fit(hostile, table, block_dict, node, pattern):
    prompt = base_prompt()
    prompt["13"] = {"class_type": "IPAdapterExactLayerWeights",
                    "inputs": {"preset": "linear", "table": table, "block_dict": block_dict}}
    prompt["6"]["inputs"]["layer_weights"] = ["13", 0]
    expect_failure(hostile.server, prompt, pattern, node)
    hostile.assert_healthy()


@pytest.mark.server
@pytest.mark.parametrize("change,node,pattern", [
    ({"adapter": "sdxl_tiny_base.safetensors", "encode": True}, "IPAdapterExactEncode",
     r"expects ViT-bigG image_embeds of 1280, the CLIP vision model gives 1024 \(ViT-H\)"),
    ({"adapter": "sd15_tiny_base.safetensors", "clip_vision": VIT_L, "encode": True}, "IPAdapterExactEncode",
     r"expects ViT-H image_embeds of 1024, the CLIP vision model gives 768 \(ViT-L\): load the ViT-H"),
    ({"adapter": "sd15_base.safetensors"}, "IPAdapterExactApply", r"640-wide image keys .* 320 wide"),
], ids=["sdxl-adapter-vit-h", "vit-l-for-vit-h", "wider-unet"])
def test_models_that_do_not_fit(hostile, change, node, pattern):
    expect_failure(hostile.server, base_prompt(**change), pattern, node)
    hostile.assert_healthy()


@pytest.mark.server
def test_adapter_for_the_other_base_model(hostile):
    """An SDXL adapter (fed ViT-H image_embeds, which it takes) on an SD1.5 checkpoint."""
    prompt = base_prompt(adapter="sdxl_tiny_vith.safetensors")
    expect_failure(hostile.server, prompt, r"is an SDXL adapter \(text context 2048\) but the model is SD15",
                   "IPAdapterExactApply")
    hostile.assert_healthy()


# --- FaceID -------------------------------------------------------------------------------------

FACEID_ADAPTER = "hx_faceid_sd15.safetensors"  # a link to the SD1.5 FaceID stand-in (with its LoRA)
FACEID_SOURCE = "ipadapter/sd15_tiny_faceid.safetensors"
GOOD_FACE = "hx_face_good.png"
SKIN = (230, 180, 150)  # face_models' style 0, what the aligned crop of a found face shows
NO_INSIGHTFACE = '''"""Test host (test_hostile_inputs.py): this Python acts as if insightface were absent."""
import sys
from importlib.machinery import PathFinder


class _PathFinderWithoutInsightFace(PathFinder):
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname.partition(".")[0] == "insightface":
            return None
        return super().find_spec(fullname, path, target)


sys.meta_path[:] = [_PathFinderWithoutInsightFace if f is PathFinder else f for f in sys.meta_path]
'''


def faceid_prompt(adapter: str = FACEID_ADAPTER, pack: str = "buffalo_l", image: str = GOOD_FACE,
                  seed: int | None = None) -> dict:
    """base_prompt with the model from Apply FaceID: FaceID file + Load InsightFace + the face picture ->
    Encode Face (its aligned faces to a PreviewImage) -> Apply FaceID (LoRA 1.0) -> 1 step at 64 px."""
    prompt = base_prompt(seed=seed)
    prompt.update({
        "20": {"class_type": "IPAdapterExactLoader", "inputs": {"ipadapter_file": adapter}},
        "21": {"class_type": "IPAdapterExactLoadInsightFace", "inputs": {"model_pack": pack, "provider": "CPU"}},
        "22": {"class_type": "LoadImage", "inputs": {"image": image}},
        "23": {"class_type": "IPAdapterExactEncodeFace", "inputs": {
            "ipadapter": ["20", 0], "insightface": ["21", 0], "image": ["22", 0], "face_index": 0}},
        "24": {"class_type": "PreviewImage", "inputs": {"images": ["23", 1]}},
        "25": {"class_type": "IPAdapterExactApplyFaceID", "inputs": {
            "model": ["1", 0], "ipadapter": ["20", 0], "image_embeds": ["23", 0], "weight": 0.8,
            "faceid_plus_version": "v2", "face_structure": 1.0, "lora_strength": 1.0, "weight_type": "V only",
            "start_at": 0.0, "end_at": 1.0, "combine_embeds": "concat"}},
    })
    prompt["10"]["inputs"]["model"] = ["25", 0]
    return prompt


def expect_face_failure(server, prompt: dict, pattern: str, node_type: str, error_type: str) -> dict:
    data = expect_failure(server, prompt, pattern, node_type, pack_exception=False)
    assert data.get("exception_type", "").rsplit(".", 1)[-1] == error_type, data.get("exception_type")
    return data


def assert_face_found(server, entry: dict) -> None:
    """The run saved its picture, and the aligned face it used (the PreviewImage) is the drawn face."""
    import numpy as np
    from PIL import Image

    assert entry["status"]["status_str"] == "success"
    assert saved_pixels(server, entry)[0].shape == (64, 64, 3)
    (crop_path,) = [p for p in server.output_images(entry) if p.parent.is_relative_to(server.base / "temp")]
    crop = np.asarray(Image.open(crop_path)).astype(np.float32)
    assert crop.shape == (224, 224, 3), crop.shape
    assert np.abs(crop[4:24, 4:24].mean((0, 1)) - SKIN).max() < 20, crop[4:24, 4:24].mean((0, 1))


def stage_faceid(server) -> None:
    """The FaceID stand-in in the server's models/ipadapter and the good face picture in its input/."""
    from tests.fixtures.faceid_files import ensure_faceid

    source = ensure_faceid(FACEID_SOURCE)[FACEID_SOURCE]
    link = server.base / "models" / "ipadapter" / FACEID_ADAPTER
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(source)
    write_face_png(server.input_dir / GOOD_FACE, 256, 256, ((72, 48, 128, 0),), seed=4)


@pytest.fixture(scope="module")
def faceid_hostile(hostile):
    """The shared server with the FaceID corpus staged: broken packs in models/insightface, face pictures."""
    from tests.fixtures.face_models import ensure_pack

    server = hostile.server
    stage_faceid(server)
    stand_in_pack = ensure_pack("buffalo_l")
    for case in PACK_CASES:
        case.write(server.base / "models" / "insightface", stand_in_pack)
    for i, case in enumerate(FACE_IMAGE_CASES):
        case.write(server.input_dir, seed=20 + i)
    hostile.faceid_runs = 0
    assert_face_found(server, server.run(faceid_prompt(), timeout=300))
    return hostile


def faceid_healthy(hostile) -> None:
    """After a FaceID case: the corpus' good run, and a good FaceID run (fresh seed: the sampler runs)."""
    hostile.assert_healthy()
    hostile.faceid_runs += 1
    entry = hostile.server.run(faceid_prompt(seed=5000 + hostile.faceid_runs), timeout=300)
    assert_face_found(hostile.server, entry)


@pytest.mark.server
@pytest.mark.parametrize("case", PACK_CASES, ids=[c.name for c in PACK_CASES])
def test_broken_face_model_pack(faceid_hostile, case: PackCase):
    expect_face_failure(faceid_hostile.server, faceid_prompt(pack=case.name), case.expect,
                        "IPAdapterExactLoadInsightFace", case.error_type)
    faceid_healthy(faceid_hostile)


@pytest.mark.server
@pytest.mark.parametrize("case", FACE_IMAGE_CASES, ids=[c.name for c in FACE_IMAGE_CASES])
def test_face_picture(faceid_hostile, case: FaceImageCase):
    prompt = faceid_prompt(image=case.name)
    if case.expect is None:
        assert_face_found(faceid_hostile.server, faceid_hostile.server.run(prompt, timeout=600))
    else:
        expect_face_failure(faceid_hostile.server, prompt, case.expect, "IPAdapterExactEncodeFace", "ValueError")
    faceid_healthy(faceid_hostile)


@pytest.mark.server
def test_faceid_without_insightface_installed(faceid_hostile, tmp_path, monkeypatch):
    """A second server whose Python cannot import insightface: Load InsightFace names the pip line,
    the pack's nodes are still listed, and that server keeps running other prompts."""
    hidden = tmp_path / "no_insightface"
    hidden.mkdir()
    (hidden / "sitecustomize.py").write_text(NO_INSIGHTFACE, encoding="utf-8")
    server = ComfyServer(models_root=faceid_hostile.server.models_roots,
                         save_log_to=REPO / ".test-artifacts" / "comfyui-server-no-insightface.log")
    with monkeypatch.context() as env:
        env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hidden), os.environ.get("PYTHONPATH")])))
        server.start()
    try:
        stage_faceid(server)
        (server.output_dir / "ipadapter_embeds").mkdir(parents=True, exist_ok=True)
        save_tensors(server.output_dir / "ipadapter_embeds" / GOOD_EMBEDS,
                     {"cond": torch.randn(1, 1024, generator=torch.Generator().manual_seed(5)),
                      "uncond": torch.zeros(1, 1024)},
                     {"format": EMBEDS_FORMAT, "output": "image_embeds", "width": "1024", "source": "tests"})
        assert "IPAdapterExactLoadInsightFace" in server.object_info()
        data = expect_face_failure(server, faceid_prompt(), r"pip install insightface(==[\w.]+)? onnxruntime\b",
                                   "IPAdapterExactLoadInsightFace", "InsightFaceMissingError")
        assert "No module named 'insightface'" in data["exception_message"], data["exception_message"]
        assert "onnxruntime-gpu" in data["exception_message"]
        assert server.alive() and server.system_stats()["system"]
        entry = server.run(base_prompt(), timeout=300)
        assert entry["status"]["status_str"] == "success" and saved_pixels(server, entry)
    finally:
        server.stop()
    faceid_healthy(faceid_hostile)


def test_the_corpus_is_large_enough():
    cases = len(ADAPTER_CASES) + len(EMBEDS_CASES) + len(IMAGE_CASES)
    assert cases >= 30, cases
    assert sum(c.expect is None for c in ADAPTER_CASES) >= 2  # valid legacy files are in it too


# --- in-process: what the API cannot deliver, and the inputs stay untouched --------------------------


@pytest.fixture(scope="module")
def adapters(pack, models):
    loader = pack.NODE_CLASS_MAPPINGS["IPAdapterExactLoader"]()
    names = ("sd15_tiny_base.safetensors", "sd15_tiny_plus.safetensors")
    models.ensure(*(f"ipadapter/{n}" for n in names))
    return {n.split("_")[2].split(".")[0]: loader.load(n)[0] for n in names}


def node(pack, name):
    return pack.NODE_CLASS_MAPPINGS[name]()


def rand_image(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
@pytest.mark.parametrize("image,pattern", [
    (torch.zeros(1, 0, 0, 3), r"image has shape \[1, 0, 0, 3\]; expected a non-empty"),
    (torch.zeros(0, 64, 64, 3), r"image has shape \[0, 64, 64, 3\]; expected a non-empty"),
    (torch.zeros(64, 64, 3), r"image has shape \[64, 64, 3\]; expected a non-empty \[batch, height, width"),
    (torch.zeros(1, 32, 32, 2), r"image has 2 channels; expected 1 \(gray\), 3 \(RGB\) or 4 \(RGBA\)"),
    (torch.full((1, 32, 32, 3), float("nan")), r"image holds NaN or infinite values"),
    (torch.full((1, 32, 32, 3), float("inf")), r"image holds NaN or infinite values"),
], ids=["0px", "empty-batch", "no-batch-dim", "2-channels", "nan", "inf"])
def test_unusable_images_are_named(pack, adapters, vit_h, image, pattern):
    with pytest.raises(ValueError, match=pattern):
        node(pack, "IPAdapterExactEncode").encode(adapters["base"], vit_h, image, "center", "reference (zero)")


class PixelProbe:
    """ViT-H's widths and ComfyUI's own CLIP preprocessing, with a cheap linear read-out instead of the
    1.2 GB fp16 tower (seconds per picture on a CPU): equal encodings mean equal pixels reached CLIP."""

    def __init__(self, clip_vision):
        self.model = clip_vision.model  # encoder_widths() reads the real widths from it
        self.image_size = clip_vision.image_size
        self.load_device = clip_vision.load_device
        self.read_out = torch.randn(3 * 16 * 16, 1024, generator=torch.Generator().manual_seed(7))

    def encode_image(self, image, crop=True):
        import comfy.clip_vision

        pixels = comfy.clip_vision.clip_preprocess(image, size=self.image_size, crop=crop).float()
        pooled = torch.nn.functional.adaptive_avg_pool2d(pixels, 16).flatten(1)
        return {"image_embeds": pooled @ self.read_out}


@torch.inference_mode()
def test_valid_odd_images_encode_as_their_rgb(pack, adapters, vit_h):
    """Grayscale = its RGB expansion, RGBA = its RGB part, out-of-range floats = their clamp to [0, 1]."""
    encode, probe = node(pack, "IPAdapterExactEncode"), PixelProbe(vit_h)

    def embeds(img, crop="center"):
        return encode.encode(adapters["base"], probe, img, crop, "reference (zero)")[0].cond

    rgb = rand_image(1, 40, 48, 3)
    gray = rand_image(1, 40, 48, 1, seed=1)
    assert torch.equal(embeds(gray), embeds(gray.expand(-1, -1, -1, 3).contiguous()))
    rgba = torch.cat([rgb, rand_image(1, 40, 48, 1, seed=2)], dim=-1)
    assert torch.equal(embeds(rgba), embeds(rgb))
    assert not torch.equal(embeds(rgb), embeds(rgb.flip(2)))  # the probe does see the pixels
    wild = rgb * 3 - 1
    assert torch.equal(embeds(wild), embeds(wild.clamp(0, 1)))
    assert torch.allclose(embeds(torch.full((1, 1, 1, 3), 0.25)), embeds(torch.full((1, 7, 7, 3), 0.25)), atol=1e-4)
    for crop in ("center", "pad", "squash"):
        tall = embeds(rand_image(1, 8192, 4, 3, seed=3), crop)
        assert tall.shape == (1, 1024) and torch.isfinite(tall).all(), crop
    assert embeds(rand_image(1, 64, 16, 3, seed=4), "tiles").shape == (4, 1024)


@torch.inference_mode()
@pytest.mark.parametrize("mask,pattern", [
    (torch.zeros(1, 0, 64), r"attention mask has shape \[1, 0, 64\]; expected a non-empty"),
    (torch.zeros(0, 64, 64), r"attention mask has shape \[0, 64, 64\]; expected a non-empty"),
    (torch.zeros(1, 1, 64, 64), r"attention mask has shape \[1, 1, 64, 64\]"),
    (torch.full((64, 64), float("nan")), r"attention mask holds NaN or infinite values"),
], ids=["zero-height", "empty-batch", "4d", "nan"])
def test_unusable_masks_are_named(pack, adapters, sd15, mask, pattern):
    from ipadapter_pack.ip_adapter_core.embeds import ImageEmbeds

    embeds = ImageEmbeds(torch.randn(1, 1024), torch.zeros(1, 1024), "image_embeds")
    before = model_snapshot(sd15)
    with pytest.raises(ValueError, match=pattern):
        node(pack, "IPAdapterExactApply").apply(sd15, adapters["base"], embeds, 1.0, "V only", 0.0, 1.0, "concat",
                                                attn_mask=mask)
    assert_model_unchanged(sd15, before)


def model_snapshot(model):
    return ({k: v.clone() for k, v in model.model.state_dict().items()}, repr(model.model_options),
            copy.copy(model.patches), copy.copy(model.object_patches))


def assert_model_unchanged(model, before):
    state, options, patches, object_patches = before
    assert repr(model.model_options) == options
    assert model.patches == patches and model.object_patches == object_patches
    now = model.model.state_dict()
    assert now.keys() == state.keys()
    changed = [k for k in state if not torch.equal(now[k], state[k])]
    assert not changed, changed[:5]


def clip_snapshot(clip_vision):
    patcher = clip_vision.patcher
    return ({k: v.clone() for k, v in clip_vision.model.state_dict().items()}, repr(patcher.model_options),
            copy.copy(patcher.patches), copy.copy(patcher.object_patches), clip_vision.image_size,
            list(clip_vision.image_mean), list(clip_vision.image_std))


def assert_clip_unchanged(clip_vision, before):
    state, options, patches, object_patches, size, mean, std = before
    patcher = clip_vision.patcher
    assert repr(patcher.model_options) == options
    assert patcher.patches == patches and patcher.object_patches == object_patches
    assert (clip_vision.image_size, list(clip_vision.image_mean), list(clip_vision.image_std)) == (size, mean, std)
    now = clip_vision.model.state_dict()
    changed = [k for k in state if not torch.equal(now[k], state[k])]
    assert now.keys() == state.keys() and not changed, changed[:5]


@torch.inference_mode()
def test_no_node_changes_the_model_or_clip_vision_it_is_given(pack, adapters, sd15, vit_h):
    """Every node that takes a MODEL or CLIP_VISION, with good inputs and with errors half-way."""
    model_before, clip_before = model_snapshot(sd15), clip_snapshot(vit_h)
    adapter_before = {k: v.clone() for k, v in adapters["plus"].model.state_dict().items()}
    image, nan = rand_image(2, 48, 40, 3), torch.full((1, 32, 32, 3), float("nan"))
    encode, apply = node(pack, "IPAdapterExactEncode"), node(pack, "IPAdapterExactApply")
    lw = node(pack, "IPAdapterExactLayerWeights").build("style transfer", "output 5 = 0.5", "")[0]

    def check():
        assert_model_unchanged(sd15, model_before)
        assert_clip_unchanged(vit_h, clip_before)

    (embeds,) = encode.encode(adapters["plus"], vit_h, image[:1], "center", "reference (zero)")
    encode.encode(adapters["base"], vit_h, image[1:], "squash", "reference (zero)")
    check()
    (one,) = apply.apply(sd15, adapters["plus"], embeds, 0.8, "K+V w/ C penalty", 0.1, 0.9, "average",
                         attn_mask=torch.ones(1, 64, 64), layer_weights=lw)
    apply.apply(one, adapters["plus"], embeds, 0.5, "V only", 0.0, 1.0, "concat", one_image_per_latent=True)
    check()
    node(pack, "IPAdapterExactSimple").apply(sd15, adapters["base"], vit_h, image[:1], 1.0)
    check()
    # errors half-way: the style half is applied (a patched clone exists) before the composition half fails
    with pytest.raises(ValueError, match="image holds NaN"):
        node(pack, "IPAdapterExactStyleComposition").apply(sd15, adapters["base"], vit_h, image[:1], nan, 1.0, 1.0,
                                                           False, "V only", 0.0, 1.0)
    check()
    with pytest.raises(ValueError, match="image holds NaN"):
        node(pack, "IPAdapterExactSimple").apply(sd15, adapters["base"], vit_h, nan, 1.0)
    with pytest.raises(ValueError, match="this adapter has 16 layers"):
        bad = node(pack, "IPAdapterExactLayerWeights").build("linear", "1, 2", "")[0]
        apply.apply(one, adapters["plus"], embeds, 1.0, "V only", 0.0, 1.0, "concat", layer_weights=bad)
    with pytest.raises(ValueError, match="after end_at"):
        apply.apply(sd15, adapters["plus"], embeds, 1.0, "V only", 1.0, 0.0, "concat")
    with pytest.raises(ValueError, match="takes ViT-H image_embeds of 1024; these embeds are penultimate of 1280"):
        apply.apply(sd15, adapters["base"], embeds, 1.0, "V only", 0.0, 1.0, "concat")
    check()
    after = adapters["plus"].model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in adapter_before.items()), "the adapter weights changed"



def test_stats_route_needs_no_server(pack):
    """Importing the pack without a running ComfyUI server registers no route; the figures still exist."""
    from ipadapter_pack.nodes.comfy_seam import ADAPTERS, register_routes

    if "server" not in __import__("sys").modules:
        assert register_routes() is False
    stats = ADAPTERS.stats()
    assert set(stats) == {"files_read", "live_adapters", "cached_files"}
    assert stats["live_adapters"] >= len(stats["cached_files"]) and stats["files_read"] >= len(stats["cached_files"])
