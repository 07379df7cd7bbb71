"""End to end: a real headless ComfyUI 0.3.75 with the pack installed, driven over HTTP.

One server for the whole session (conftest's ``comfy_server``). Checks that ComfyUI lists every
node the pack exports and logged no import error for it, then runs every UI-format workflow in
``workflows/`` (converted with ui_to_api against the live /object_info) and a core-only SD1.5
workflow that proves the host itself.

FaceID workflows run on the generated insightface stand-in pack (``buffalo_l``) with drawn face
pictures that its detector finds (tests/harness/standins.py); where a workflow previews the
aligned faces of IP-Adapter Encode Face, those previews must be the 224 px crops.

Speed: the shipped workflows are run with their latent size and input pictures capped to 64 px
per side (aspect kept) and at most 4 sampling steps; IPADAPTER_E2E_FULL=1 runs them unchanged.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import pytest

from tests.harness import standins
from tests.harness.comfy_host import PACK_DIR_NAME, REPO
from tests.harness.object_info_sample import OBJECT_INFO as HANDWRITTEN_OBJECT_INFO
from tests.harness.workflow import shrink, ui_to_api, widget_layout

pytestmark = pytest.mark.server

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
REQUIRED_NODES = {"IPAdapterExactLoader", "IPAdapterExactEncode", "IPAdapterExactApply", "IPAdapterExactSimple"}
FULL = os.environ.get("IPADAPTER_E2E_FULL") == "1"
MAX_SIDE, MAX_STEPS = 64, 4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# --- helpers --------------------------------------------------------------------------------


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk; fails on anything that is not a PNG."""
    head = path.read_bytes()[:33]
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR", f"{path}: no IHDR chunk"
    return struct.unpack(">II", head[16:24])


def latent_sizes(api: dict) -> set[tuple[int, int]]:
    """(width, height) of every EmptyLatentImage-like node with literal sizes."""
    sizes = set()
    for node in api.values():
        if node["class_type"].startswith("Empty") and "Latent" in node["class_type"]:
            w, h = node["inputs"].get("width"), node["inputs"].get("height")
            if isinstance(w, int) and isinstance(h, int):
                sizes.add((w, h))
    return sizes


def run_and_check_images(server, api: dict, expected_size: tuple[int, int] | None,
                         entry: dict | None = None) -> list[Path]:
    """Runs the prompt (or checks the finished `entry` of it): success, saved PNGs of the expected size."""
    entry = server.run(api) if entry is None else entry
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = server.output_images(entry)
    saved = [p for p in images if p.parent.is_relative_to(server.output_dir)]
    assert saved, f"no saved images; outputs: {entry['outputs']}"
    for path in images:
        assert path.is_file() and path.stat().st_size > 0, f"{path} missing or empty"
        size = png_size(path)
        if expected_size is not None and path in saved:
            assert size == expected_size, f"{path.name}: {size}, expected {expected_size}"
    return images


# --- the host itself --------------------------------------------------------------------------

CORE_UI_WORKFLOW = {
    "last_node_id": 9, "last_link_id": 9, "version": 0.4, "groups": [], "config": {}, "extra": {},
    "nodes": [
        {"id": 4, "type": "CheckpointLoaderSimple", "mode": 0, "inputs": [],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1]},
                     {"name": "CLIP", "type": "CLIP", "links": [3, 5]},
                     {"name": "VAE", "type": "VAE", "links": [8]}],
         "widgets_values": ["sd15_tiny.safetensors"]},
        {"id": 6, "type": "CLIPTextEncode", "mode": 0, "inputs": [{"name": "clip", "type": "CLIP", "link": 3}],
         "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [4]}],
         "widgets_values": ["a lighthouse on a cliff at dawn"]},
        {"id": 7, "type": "CLIPTextEncode", "mode": 0, "inputs": [{"name": "clip", "type": "CLIP", "link": 5}],
         "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [6]}],
         "widgets_values": ["blurry, low quality"]},
        {"id": 5, "type": "EmptyLatentImage", "mode": 0, "inputs": [],
         "outputs": [{"name": "LATENT", "type": "LATENT", "links": [2]}], "widgets_values": [64, 64, 1]},
        {"id": 3, "type": "KSampler", "mode": 0,
         "inputs": [{"name": "model", "type": "MODEL", "link": 1},
                    {"name": "positive", "type": "CONDITIONING", "link": 4},
                    {"name": "negative", "type": "CONDITIONING", "link": 6},
                    {"name": "latent_image", "type": "LATENT", "link": 2}],
         "outputs": [{"name": "LATENT", "type": "LATENT", "links": [7]}],
         "widgets_values": [1234, "fixed", 4, 7.0, "euler", "normal", 1.0]},
        {"id": 8, "type": "VAEDecode", "mode": 0,
         "inputs": [{"name": "samples", "type": "LATENT", "link": 7}, {"name": "vae", "type": "VAE", "link": 8}],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [9]}], "widgets_values": []},
        {"id": 9, "type": "SaveImage", "mode": 0, "inputs": [{"name": "images", "type": "IMAGE", "link": 9}],
         "outputs": [], "widgets_values": ["e2e_core"]},
        {"id": 10, "type": "Note", "mode": 0, "inputs": [], "outputs": [], "widgets_values": ["host check"]},
    ],
    "links": [[1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"],
              [4, 6, 0, 3, 1, "CONDITIONING"], [5, 4, 1, 7, 0, "CLIP"], [6, 7, 0, 3, 2, "CONDITIONING"],
              [7, 3, 0, 8, 0, "LATENT"], [8, 4, 2, 8, 1, "VAE"], [9, 8, 0, 9, 0, "IMAGE"]],
}


def test_core_sd15_workflow_runs(comfy_server):
    """Checkpoint -> CLIPTextEncode x2 -> EmptyLatentImage 64x64 -> KSampler 4 steps -> VAEDecode -> SaveImage."""
    api = ui_to_api(CORE_UI_WORKFLOW, comfy_server.object_info())
    assert sorted(n["class_type"] for n in api.values()) == sorted(
        ["CheckpointLoaderSimple", "CLIPTextEncode", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode",
         "SaveImage"])
    images = run_and_check_images(comfy_server, api, (64, 64))
    assert len(images) == 1


def test_rejected_prompt_carries_the_server_error(comfy_server):
    from tests.harness.comfy_host import PromptRejected

    api = ui_to_api(CORE_UI_WORKFLOW, comfy_server.object_info())
    api["4"]["inputs"]["ckpt_name"] = "no_such_checkpoint.safetensors"
    with pytest.raises(PromptRejected) as err:
        comfy_server.queue(api)
    assert err.value.status == 400
    assert "4" in err.value.node_errors
    assert any(e["type"] == "value_not_in_list" for e in err.value.node_errors["4"]["errors"])


def test_handwritten_object_info_matches_the_server(comfy_server):
    """The converter unit tests use a trimmed object_info; it must describe the real nodes."""
    live = comfy_server.object_info()
    for name, node in HANDWRITTEN_OBJECT_INFO.items():
        assert name in live, name
        for section in ("required", "optional"):
            assert node["input_order"].get(section) == live[name]["input_order"].get(section), (name, section)
        assert widget_layout(node) == widget_layout(live[name]), name
        assert node["output"] == live[name]["output"], name


# --- the pack ----------------------------------------------------------------------------------


def pack_nodes(object_info: dict) -> dict[str, dict]:
    return {name: node for name, node in object_info.items() if PACK_DIR_NAME in str(node.get("python_module", ""))}


def test_pack_nodes_are_listed(comfy_server):
    nodes = pack_nodes(comfy_server.object_info())
    missing = REQUIRED_NODES - set(nodes)
    assert not missing, f"pack nodes missing from /object_info: {sorted(missing)}\n{comfy_server.log_tail(80)}"


def test_pack_imported_cleanly(comfy_server):
    # Only the start-up part of the log: the shared server later runs the hostile-input tests,
    # whose refusals ComfyUI logs with tracebacks on purpose.
    log = comfy_server.log_text().split("\nStarting server", 1)[0]
    assert "Import times for custom nodes" in log, "the server log has no start-up section"
    # The pack as ComfyUI sees it (custom_nodes/<name>) or its real path; not ComfyUI's own copy in .cache/.
    mentions_pack = re.compile(rf"{re.escape(PACK_DIR_NAME)}|{re.escape(str(REPO))}/(?!\.cache/|\.venv/)").search
    bad = [line for line in log.splitlines()
           if ("IMPORT FAILED" in line or "Cannot import" in line) and mentions_pack(line)]
    assert not bad, "\n".join(bad)
    # Every traceback block in the log: none may pass through the pack.
    blocks = re.split(r"(?m)^(?=Traceback \(most recent call last\):)", log)[1:]
    pack_tracebacks = [b[:3000] for b in blocks if mentions_pack(b.split("\n\n")[0])]
    assert not pack_tracebacks, "\n---\n".join(pack_tracebacks)
    count = len(pack_nodes(comfy_server.object_info()))
    loaded = re.findall(rf"{re.escape(PACK_DIR_NAME)}: loaded (\d+) nodes", log)
    assert loaded, f"no '{PACK_DIR_NAME}: loaded N nodes' line in the log"
    assert int(loaded[-1]) == count, f"log says {loaded[-1]} nodes, /object_info lists {count}"


def test_there_are_workflows():
    assert WORKFLOWS, "workflows/ holds no *.json"


@pytest.mark.parametrize("workflow_path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_shipped_workflow_runs(comfy_server, workflow_path):
    standins.workflow_models([workflow_path])  # every model it names has a stand-in (or fail here)
    workflow = standins.load_workflow(workflow_path)
    standins.stage_inputs(workflow, comfy_server.input_dir, max_side=None if FULL else MAX_SIDE)
    api = ui_to_api(workflow, comfy_server.object_info())
    if not FULL:
        shrink(api, MAX_SIDE, MAX_STEPS)
    sizes = latent_sizes(api)
    entry = comfy_server.wait(comfy_server.queue(api))
    run_and_check_images(comfy_server, api, next(iter(sizes)) if len(sizes) == 1 else None, entry)
    previews = face_previews(api)
    assert len(previews) == ui_face_previews(workflow), previews
    for node_id in previews:
        paths = comfy_server.output_images({"outputs": {node_id: entry["outputs"][node_id]}})
        assert paths and all(png_size(p) == (224, 224) for p in paths), paths


def ui_face_previews(workflow: dict) -> int:
    """How many image output nodes of the UI workflow show Encode Face's `faces` (its output 1)."""
    types = {node["id"]: node["type"] for node in workflow["nodes"]}
    return sum(1 for _, origin, slot, target, _, _ in workflow["links"]
               if types[origin] == "IPAdapterExactEncodeFace" and slot == 1
               and types[target] in ("PreviewImage", "SaveImage"))


def face_previews(api: dict) -> list[str]:
    """Ids of the image outputs that show Encode Face's aligned faces (its output 1)."""
    return [node_id for node_id, node in api.items()
            if node["class_type"] in ("PreviewImage", "SaveImage") and isinstance(node["inputs"].get("images"), list)
            and api[node["inputs"]["images"][0]]["class_type"] == "IPAdapterExactEncodeFace"
            and node["inputs"]["images"][1] == 1]
