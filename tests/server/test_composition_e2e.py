"""The pack acts together with the rest of ComfyUI, in the real server: saved pictures change
when the ControlNet hint, the LoRA strength or the adapter weight changes, and an adapter at
weight 0 gives exactly the picture of the same graph without the adapter. Every effect-bearing
workflow's control changes the picture where it should, and not where it must not:

* regional_masks: the masked adapter's reference or weight changes the masked half of the picture
  much more than the other half (the UNet mixes the halves, so "not at all" is only true at the
  attention layer: tests/inprocess/test_effects_inprocess.py proves that part exactly);
* batch_one_per_latent: another reference 2 changes picture 2 and leaves picture 1 bit-identical;
* sdxl_style_and_composition: another style image changes the picture;
* several_images: changing either reference changes the picture;
* noise image (basic_image_prompt with a Noise Image as Encode's negative_image): the noise seed
  changes the picture, and at adapter weight 0 it does not.

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
# regional_masks runs at 128 px (a 16x16 latent, mask grids 16, 8, 4 and 2 wide) so that every
# adapter layer has a left and a right half; see test_regional_mask_confines_the_change.
REGIONAL_SIDE = 128
REGIONAL_RATIO = 2.0
_runs = itertools.count()


# --- helpers ----------------------------------------------------------------------------------


def prompt_for(server, stem: str, max_side: int = MAX_SIDE) -> dict:
    """The shipped workflow as the (shrunk) API prompt the server runs; its input images staged."""
    workflow = standins.load_workflow(REPO / "workflows" / f"{stem}.json")
    standins.stage_inputs(workflow, server.input_dir, max_side=MAX_SIDE)
    return shrink(ui_to_api(workflow, server.object_info()), max_side, MAX_STEPS)


def ids_of(api: dict, class_type: str) -> list[str]:
    return sorted((i for i, n in api.items() if n["class_type"] == class_type), key=int)


def run_entry(server, api: dict, patience: int = 5) -> dict:
    """server.run, but a /history poll that times out on a starved server (shared CPUs) is asked again."""
    prompt_id = server.queue(api)
    for attempt in range(patience):
        try:
            return server.wait(prompt_id)
        except TimeoutError as exc:
            if "not finished after" in str(exc) or attempt == patience - 1:
                raise
            log.warning("the server did not answer a /history poll in time (%s); asking again", exc)
    raise AssertionError("unreachable")


def run_images(server, api: dict) -> dict[str, list[np.ndarray]]:
    """Runs the prompt; {SaveImage node id: its pictures (one per latent) as uint8 [H, W, 3]}.

    Every run saves under its own filename prefix, so no picture of another run is read back.
    """
    api = copy.deepcopy(api)
    tag = f"composition_{next(_runs):03d}"
    for node_id in ids_of(api, "SaveImage"):
        api[node_id]["inputs"]["filename_prefix"] = f"{tag}_{node_id}"
    entry = run_entry(server, api)
    assert entry["status"]["status_str"] == "success", entry["status"]
    pictures = {}
    for node_id in ids_of(api, "SaveImage"):
        images = (entry["outputs"].get(node_id) or {}).get("images") or []
        assert images, f"SaveImage {node_id} saved nothing"
        pictures[node_id] = []
        for image in images:
            path = server.output_dir / image.get("subfolder", "") / image["filename"]
            assert path.name.startswith(f"{tag}_{node_id}"), path
            with Image.open(path) as img:
                pictures[node_id].append(np.asarray(img.convert("RGB")))
    return pictures


def run_pictures(server, api: dict) -> dict[str, np.ndarray]:
    """Runs the prompt; {SaveImage node id: its one picture as uint8 [H, W, 3]}."""
    pictures = {}
    for node_id, images in run_images(server, api).items():
        assert len(images) == 1, f"SaveImage {node_id}: {len(images)} pictures"
        pictures[node_id] = images[0]
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


def other_picture(server, name: str, kind: str = "mirrored") -> str:
    """Another input picture of the same size made from the staged `name`: "mirrored" (and
    inverted) or "shifted" (rolled by a third and its colour channels rotated)."""
    other_name = f"{kind}_{name}"
    with Image.open(server.input_dir / name) as img:
        pixels = np.asarray(img.convert("RGB"))
    if kind == "mirrored":
        other = 255 - pixels[:, ::-1]
    elif kind == "shifted":
        other = np.roll(pixels, pixels.shape[1] // 3, axis=1)[..., [1, 2, 0]]
    else:
        raise ValueError(kind)
    Image.fromarray(np.ascontiguousarray(other)).save(server.input_dir / other_name)
    return other_name


def distinct_references(server, api: dict, loaders: list[str]) -> dict:
    """The workflows' input pictures are all the same drawing when none are shipped: give the
    second and later LoadImage nodes pictures of their own, so each reference is a different one."""
    api = copy.deepcopy(api)
    for loader in loaders[1:]:
        name = api[loader]["inputs"]["image"]
        api[loader]["inputs"]["image"] = other_picture(server, name, "shifted")
    return api


def input_of(api: dict, node_id: str, name: str) -> str:
    """The id of the node feeding input `name` of node `node_id`."""
    value = api[node_id]["inputs"][name]
    assert isinstance(value, list), f"{node_id}.{name} is not linked: {value!r}"
    return value[0]


def halves_diff(a: np.ndarray, b: np.ndarray, margin: int) -> tuple[float, float]:
    """Mean absolute difference (8-bit levels) of the left and the right half, each without the
    `margin` columns next to the middle (where the decoder mixes the halves)."""
    middle = a.shape[1] // 2
    left = mean_diff(a[:, : middle - margin], b[:, : middle - margin])
    right = mean_diff(a[:, middle + margin :], b[:, middle + margin :])
    return left, right


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


# --- effect-bearing workflows: the control acts where it should ------------------------------


def test_regional_mask_confines_the_change(comfy_server):
    """regional_masks: adapter A on the left half, B on the right. A's reference or weight changes
    the left half of the picture much more than the right one, B's reference the other way round.

    Measure: mean absolute difference per half in 8-bit levels, leaving out the columns next to
    the middle where the decoder mixes the halves. The UNet's convolutions and self-attention
    spread any change over the whole latent, so the far half moves too, but a mask that is
    ignored, inverted or misplaced gives ratios near 1 or below."""
    api = prompt_for(comfy_server, "regional_masks", REGIONAL_SIDE)
    (save_id,) = ids_of(api, "SaveImage")
    applies = ids_of(api, "IPAdapterExactApply")
    side = {api[input_of(api, a, "attn_mask")]["class_type"]: a for a in applies}
    left, right = side["MaskComposite"], side["InvertMask"]  # the workflow's left half and its inverse
    api = distinct_references(comfy_server, api, [input_of(api, input_of(api, a, "image_embeds"), "image")
                                                  for a in (left, right)])
    base = run_pictures(comfy_server, api)[save_id]
    assert_real_picture(base)
    margin = base.shape[1] // 8

    def reference_changed(apply_id):
        variant = copy.deepcopy(api)
        loader = input_of(api, input_of(api, apply_id, "image_embeds"), "image")
        variant[loader]["inputs"]["image"] = other_picture(comfy_server, api[loader]["inputs"]["image"])
        return variant

    weight_changed = copy.deepcopy(api)
    weight_changed[left]["inputs"]["weight"] = 0.3
    for what, variant, inside_left in (("A's reference", reference_changed(left), True),
                                       ("A's weight 0.9 -> 0.3", weight_changed, True),
                                       ("B's reference", reference_changed(right), False)):
        picture = run_pictures(comfy_server, variant)[save_id]
        left_diff, right_diff = halves_diff(picture, base, margin)
        inside, outside = (left_diff, right_diff) if inside_left else (right_diff, left_diff)
        log.info("regional, %s: inside %.2f, outside %.2f levels (ratio %.1f)", what, inside, outside,
                 inside / max(outside, 1e-9))
        assert inside > MIN_MEAN_DIFF, f"{what}: the masked half barely changed ({inside:.2f} levels)"
        assert inside >= REGIONAL_RATIO * outside, (
            f"{what}: the masked half changed {inside:.2f} levels, the other half {outside:.2f}: "
            f"expected at least {REGIONAL_RATIO}x more inside")


def test_one_image_per_latent_swap_changes_only_its_picture(comfy_server):
    """batch_one_per_latent: two references, two latents. Another reference 2 changes picture 2 and
    leaves picture 1 bit-identical (latents of a batch share no UNet op, encoder op or sampler
    op, so this is exact; test_effects_inprocess checks it for the model alone)."""
    api = prompt_for(comfy_server, "batch_one_per_latent")
    (save_id,) = ids_of(api, "SaveImage")
    (apply_id,) = ids_of(api, "IPAdapterExactApply")
    assert api[apply_id]["inputs"]["one_image_per_latent"] is True
    (batch_id,) = ids_of(api, "ImageBatch")
    second = input_of(api, batch_id, "image2")
    api = distinct_references(comfy_server, api, [input_of(api, batch_id, "image1"), second])
    base = run_images(comfy_server, api)[save_id]
    assert len(base) == 2
    for picture in base:
        assert_real_picture(picture)
    swapped = copy.deepcopy(api)
    swapped[second]["inputs"]["image"] = other_picture(comfy_server, api[second]["inputs"]["image"])
    pictures = run_images(comfy_server, swapped)[save_id]
    assert_differs(pictures[1], base[1], "picture 2 when reference 2 changes")
    assert_same(pictures[0], base[0], "picture 1 when reference 2 changes")


def test_style_image_changes_the_sdxl_picture(comfy_server):
    """sdxl_style_and_composition: another style image changes the picture. (That it acts on the
    style layers only, and not at style weight 0, is exact at the layer level: test_effects_inprocess.)"""
    api = prompt_for(comfy_server, "sdxl_style_and_composition")
    (save_id,) = ids_of(api, "SaveImage")
    (node_id,) = ids_of(api, "IPAdapterExactStyleComposition")
    api = distinct_references(comfy_server, api, [input_of(api, node_id, "image_composition"),
                                                  input_of(api, node_id, "image_style")])
    style_loader = input_of(api, node_id, "image_style")
    other_style = copy.deepcopy(api)
    other_style[style_loader]["inputs"]["image"] = other_picture(comfy_server, api[style_loader]["inputs"]["image"])
    base = run_pictures(comfy_server, api)[save_id]
    assert_real_picture(base)
    assert_differs(run_pictures(comfy_server, other_style)[save_id], base, "another style image")


def test_each_of_several_images_matters(comfy_server):
    """several_images: two references averaged by Combine Embeds; changing either changes the picture."""
    api = prompt_for(comfy_server, "several_images")
    (save_id,) = ids_of(api, "SaveImage")
    (combine_id,) = ids_of(api, "IPAdapterExactCombineEmbeds")
    slots = ("embeds_1", "embeds_2")
    api = distinct_references(comfy_server, api, [input_of(api, input_of(api, combine_id, s), "image") for s in slots])
    base = run_pictures(comfy_server, api)[save_id]
    assert_real_picture(base)
    for slot in slots:
        loader = input_of(api, input_of(api, combine_id, slot), "image")
        variant = copy.deepcopy(api)
        variant[loader]["inputs"]["image"] = other_picture(comfy_server, api[loader]["inputs"]["image"])
        assert_differs(run_pictures(comfy_server, variant)[save_id], base, f"another picture for {slot}")


def test_noise_image_seed_changes_the_picture_unless_the_weight_is_zero(comfy_server):
    """basic_image_prompt with an IP-Adapter Noise Image as Encode's negative_image: the noise seed
    changes the picture (through the negative half of CFG); at adapter weight 0 it cannot."""
    api = prompt_for(comfy_server, "basic_image_prompt")
    (save_id,) = ids_of(api, "SaveImage")
    (encode_id,) = ids_of(api, "IPAdapterExactEncode")
    (apply_id,) = ids_of(api, "IPAdapterExactApply")
    noise_id = str(max(int(i) for i in api) + 1)
    api[noise_id] = {"class_type": "IPAdapterExactNoise", "inputs": {"strength": 1.0, "seed": 1}}
    api[encode_id]["inputs"]["negative_image"] = [noise_id, 0]

    def pictures(seed, weight):
        variant = copy.deepcopy(api)
        variant[noise_id]["inputs"]["seed"] = seed
        variant[apply_id]["inputs"]["weight"] = weight
        return run_pictures(comfy_server, variant)[save_id]

    first = pictures(1, 1.0)
    assert_real_picture(first)
    assert_differs(pictures(2, 1.0), first, "noise seed 1 -> 2 at weight 1")
    assert_same(pictures(2, 0.0), pictures(1, 0.0), "noise seed 1 -> 2 at weight 0")
