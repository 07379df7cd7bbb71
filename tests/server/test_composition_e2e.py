"""The pack acts together with the rest of ComfyUI, in the real server: saved pictures change
when the ControlNet hint, the LoRA strength or the adapter weight changes, and an adapter at
weight 0 gives exactly the picture of the same graph without the adapter.

Each test takes a shipped workflow (ui_to_api + shrink, as test_server_e2e does: 64 px, 4
steps), changes single values of the API prompt and compares the saved PNGs pixel by pixel.
ComfyUI's cache keeps what did not change, so a variant only re-runs the nodes it touches.
"""

from __future__ import annotations

import copy
import itertools
import logging

import numpy as np
import pytest
from PIL import Image

from tests.harness import standins
from tests.harness.comfy_host import REPO
from tests.harness.workflow import shrink, ui_to_api

pytestmark = pytest.mark.server

log = logging.getLogger(__name__)

MAX_SIDE, MAX_STEPS = 64, 4
# "Clearly different": mean absolute difference over all pixels and channels, in 8-bit levels.
MIN_MEAN_DIFF = 1.0
_runs = itertools.count()


# --- helpers ----------------------------------------------------------------------------------


def prompt_for(server, stem: str) -> dict:
    """The shipped workflow as the (shrunk) API prompt the server runs; its input images staged."""
    workflow = standins.load_workflow(REPO / "workflows" / f"{stem}.json")
    standins.stage_inputs(workflow, server.input_dir, max_side=MAX_SIDE)
    return shrink(ui_to_api(workflow, server.object_info()), MAX_SIDE, MAX_STEPS)


def ids_of(api: dict, class_type: str) -> list[str]:
    return sorted((i for i, n in api.items() if n["class_type"] == class_type), key=int)


def run_pictures(server, api: dict) -> dict[str, np.ndarray]:
    """Runs the prompt; {SaveImage node id: its picture as uint8 [H, W, 3]}.

    Every run saves under its own filename prefix, so no picture of another run is read back.
    """
    api = copy.deepcopy(api)
    tag = f"composition_{next(_runs):03d}"
    for node_id in ids_of(api, "SaveImage"):
        api[node_id]["inputs"]["filename_prefix"] = f"{tag}_{node_id}"
    entry = server.run(api)
    assert entry["status"]["status_str"] == "success", entry["status"]
    pictures = {}
    for node_id in ids_of(api, "SaveImage"):
        images = (entry["outputs"].get(node_id) or {}).get("images") or []
        assert len(images) == 1, f"SaveImage {node_id}: {images}"
        path = server.output_dir / images[0].get("subfolder", "") / images[0]["filename"]
        assert path.name.startswith(f"{tag}_{node_id}"), path
        with Image.open(path) as img:
            pictures[node_id] = np.asarray(img.convert("RGB"))
    return pictures


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def assert_differs(a: np.ndarray, b: np.ndarray, what: str) -> None:
    diff = mean_diff(a, b)
    log.info("%s: mean abs difference %.2f levels, max %d", what, diff, max_diff(a, b))
    assert diff > MIN_MEAN_DIFF, f"{what}: the picture barely changed (mean abs difference {diff:.3f} levels)"


def assert_same(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert max_diff(a, b) == 0, f"{what}: pictures differ (max {max_diff(a, b)}, mean {mean_diff(a, b):.3f} levels)"


def assert_real_picture(a: np.ndarray) -> None:
    """Stand-in pictures have a spread of values (see tests/fixtures/generate.py, TAESD decoder)."""
    assert a.std() > 10, f"flat picture (std {a.std():.2f} levels): the comparisons would mean nothing"


def without_adapters(api: dict) -> dict:
    """The same graph with every IP-Adapter node taken out: each Apply's consumers get the Apply's
    own input model, then nodes that no output needs any more are dropped."""
    api = copy.deepcopy(api)
    pack = {i for i, n in api.items() if n["class_type"].startswith("IPAdapterExact")}
    applies = {i: api[i]["inputs"]["model"] for i in ids_of(api, "IPAdapterExactApply")}
    assert applies, "no IPAdapterExactApply in the prompt"
    for node in api.values():
        for name, value in node["inputs"].items():
            while isinstance(value, list) and len(value) == 2 and value[0] in applies:
                value = applies[value[0]]
            node["inputs"][name] = value
    for node_id in pack:
        del api[node_id]
    # Keep what the output nodes still reach.
    keep, todo = set(), ids_of(api, "SaveImage")
    while todo:
        node_id = todo.pop()
        if node_id in keep:
            continue
        keep.add(node_id)
        todo += [v[0] for v in api[node_id]["inputs"].values() if isinstance(v, list) and len(v) == 2]
    assert not keep & pack, "an output still depends on an IP-Adapter node"
    return {i: n for i, n in api.items() if i in keep}


# --- the tests --------------------------------------------------------------------------------


def test_adapter_weight_changes_the_picture(comfy_server):
    api = prompt_for(comfy_server, "basic_image_prompt")
    (apply_id,) = ids_of(api, "IPAdapterExactApply")
    (save_id,) = ids_of(api, "SaveImage")
    assert api[apply_id]["inputs"]["weight"] == 1.0
    full = run_pictures(comfy_server, api)[save_id]
    assert_real_picture(full)
    half = copy.deepcopy(api)
    half[apply_id]["inputs"]["weight"] = 0.5
    assert_differs(run_pictures(comfy_server, half)[save_id], full, "adapter weight 1.0 -> 0.5")


def test_weight_zero_is_the_plain_graph(comfy_server):
    """At weight 0 the patched model computes exactly what the unpatched one does."""
    api = prompt_for(comfy_server, "basic_image_prompt")
    (apply_id,) = ids_of(api, "IPAdapterExactApply")
    (save_id,) = ids_of(api, "SaveImage")
    zero = copy.deepcopy(api)
    zero[apply_id]["inputs"]["weight"] = 0.0
    plain = without_adapters(api)
    assert {n["class_type"] for n in plain.values()} == {
        "CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode", "SaveImage"}
    with_zero = run_pictures(comfy_server, zero)[save_id]
    without = run_pictures(comfy_server, plain)[save_id]
    assert_real_picture(without)
    assert_same(with_zero, without, "adapter at weight 0 vs the graph without adapter nodes")
    # ... and the adapter does act when its weight is not 0 (else the equality says nothing).
    assert_differs(run_pictures(comfy_server, api)[save_id], without, "adapter weight 1.0 vs no adapter")


def test_controlnet_hint_steers_the_picture(comfy_server):
    api = prompt_for(comfy_server, "with_controlnet")
    (save_id,) = ids_of(api, "SaveImage")
    (control_id,) = ids_of(api, "ControlNetApplyAdvanced")
    hint_id = api[control_id]["inputs"]["image"][0]
    assert api[hint_id]["class_type"] == "LoadImage"
    first = run_pictures(comfy_server, api)[save_id]
    assert_real_picture(first)

    # Another hint: the staged one mirrored and inverted (same size, other edges).
    name = api[hint_id]["inputs"]["image"]
    other_name = "composition_other_hint.png"
    with Image.open(comfy_server.input_dir / name) as img:
        other = 255 - np.asarray(img.convert("RGB"))[:, ::-1]
    Image.fromarray(np.ascontiguousarray(other)).save(comfy_server.input_dir / other_name)
    changed = copy.deepcopy(api)
    changed[hint_id]["inputs"]["image"] = other_name
    assert_differs(run_pictures(comfy_server, changed)[save_id], first, "ControlNet hint changed")


def test_lora_strength_changes_the_picture(comfy_server):
    """with_lora has a LoRA before the adapter (one branch) and after it (the other branch): the
    strength of one changes its own branch's picture and leaves the other branch's alone."""
    api = prompt_for(comfy_server, "with_lora")
    saves = ids_of(api, "SaveImage")
    prefix = {i: api[i]["inputs"]["filename_prefix"] for i in saves}
    before_save = next(i for i in saves if prefix[i].endswith("lora_before"))
    after_save = next(i for i in saves if prefix[i].endswith("lora_after"))
    loras = ids_of(api, "LoraLoader")
    # The "after" LoRA takes the adapter's output model; the "before" one the checkpoint's.
    after_lora = next(i for i in loras if api[api[i]["inputs"]["model"][0]]["class_type"] == "IPAdapterExactApply")
    before_lora = next(i for i in loras if i != after_lora)
    base = run_pictures(comfy_server, api)
    for picture in base.values():
        assert_real_picture(picture)

    # The LoRA before the adapter (the after-branch is cached and must come out unchanged).
    # Changing the other LoRA too would cost another 30 s on 2 cores for the mirror image of this.
    variant = copy.deepcopy(api)
    assert variant[before_lora]["inputs"]["strength_model"] == 0.8
    variant[before_lora]["inputs"]["strength_model"] = 1.6
    pictures = run_pictures(comfy_server, variant)
    assert_differs(pictures[before_save], base[before_save], "LoRA before the adapter, strength_model 0.8 -> 1.6")
    assert_same(pictures[after_save], base[after_save], "the after-branch when the before-LoRA changes")
