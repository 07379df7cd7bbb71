"""ui_to_api: UI-format workflows (what users drag into ComfyUI) to API prompts, core nodes only.

OBJECT_INFO (tests/harness/object_info_sample.py) is a trimmed copy of ComfyUI 0.3.75's GET
/object_info for the nodes used (input specs and order only); test_server_e2e.py checks it
against the live server.
"""

from __future__ import annotations

import copy

import pytest

from tests.harness.object_info_sample import OBJECT_INFO
from tests.harness.workflow import WorkflowError, ui_to_api, widget_layout


def _node(node_id, ntype, inputs=(), outputs=(), widgets=None, mode=0, title=None):
    node = {"id": node_id, "type": ntype, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": node_id,
            "mode": mode, "inputs": [dict(i) for i in inputs], "outputs": [dict(o) for o in outputs],
            "properties": {}}
    if widgets is not None:
        node["widgets_values"] = widgets
    if title:
        node["title"] = title
    return node


def _in(name, kind, link, widget=False):
    out = {"name": name, "type": kind, "link": link}
    if widget:
        out["widget"] = {"name": name}
    return out


def _out(name, kind, links):
    return {"name": name, "type": kind, "links": list(links)}


# The links: [id, origin node, origin slot, target node, target slot, type]
LINKS = [
    [1, 1, 0, 30, 0, "MODEL"],         # checkpoint MODEL -> reroute 30
    [2, 30, 0, 5, 0, "MODEL"],         # reroute 30 -> KSampler.model
    [3, 1, 1, 2, 0, "CLIP"],
    [4, 1, 1, 3, 0, "CLIP"],
    [5, 2, 0, 14, 0, "CONDITIONING"],  # positive -> bypassed ControlNet apply (slot 0)
    [6, 3, 0, 14, 1, "CONDITIONING"],  # negative -> bypassed ControlNet apply (slot 1)
    [7, 14, 0, 5, 2, "CONDITIONING"],  # bypassed out 0 -> KSampler.positive
    [8, 14, 1, 5, 3, "CONDITIONING"],  # bypassed out 1 -> KSampler.negative
    [9, 4, 0, 5, 4, "LATENT"],
    [10, 20, 0, 4, 0, "INT"],          # PrimitiveNode -> EmptyLatentImage.width (converted widget)
    [11, 21, 0, 5, 1, "INT"],          # PrimitiveInt (a real node) -> KSampler.seed
    [12, 5, 0, 6, 0, "LATENT"],
    [13, 1, 2, 31, 0, "VAE"],          # VAE -> reroute 31 -> reroute 32 -> VAEDecode.vae
    [14, 31, 0, 32, 0, "VAE"],
    [15, 32, 0, 6, 1, "VAE"],
    [16, 6, 0, 7, 0, "IMAGE"],         # VAEDecode -> bypassed ImageInvert
    [17, 7, 0, 8, 0, "IMAGE"],         # bypassed ImageInvert -> SaveImage
    [18, 6, 0, 10, 0, "IMAGE"],        # VAEDecode -> ImageStitch.image1
    [19, 9, 0, 10, 5, "IMAGE"],        # muted LoadImage -> ImageStitch.image2 (optional)
    [20, 10, 0, 11, 0, "IMAGE"],
    [21, 9, 0, 14, 3, "IMAGE"],
]

UI_WORKFLOW = {
    "last_node_id": 40, "last_link_id": 21, "version": 0.4, "groups": [], "config": {}, "extra": {},
    "links": LINKS,
    "nodes": [
        _node(1, "CheckpointLoaderSimple", outputs=[_out("MODEL", "MODEL", [1]), _out("CLIP", "CLIP", [3, 4]),
                                                    _out("VAE", "VAE", [13])],
              widgets=["sd15_tiny.safetensors"]),
        _node(2, "CLIPTextEncode", [_in("clip", "CLIP", 3)], [_out("CONDITIONING", "CONDITIONING", [5])],
              widgets=["a red fox in the snow"], title="Positive"),
        _node(3, "CLIPTextEncode", [_in("clip", "CLIP", 4)], [_out("CONDITIONING", "CONDITIONING", [6])],
              widgets=["blurry"]),
        # width is a converted widget fed by a PrimitiveNode; the frontend keeps both values in sync.
        _node(4, "EmptyLatentImage", [_in("width", "INT", 10, widget=True)], [_out("LATENT", "LATENT", [9])],
              widgets=[96, 64, 1]),
        # seed: linked to a real node; the stored value and its "randomize" control value are ignored.
        _node(5, "KSampler",
              [_in("model", "MODEL", 2), _in("positive", "CONDITIONING", 7), _in("negative", "CONDITIONING", 8),
               _in("latent_image", "LATENT", 9), _in("seed", "INT", 11, widget=True)],
              [_out("LATENT", "LATENT", [12])],
              widgets=[123456, "randomize", 4, 7.5, "euler", "karras", 1.0]),
        _node(6, "VAEDecode", [_in("samples", "LATENT", 12), _in("vae", "VAE", 15)],
              [_out("IMAGE", "IMAGE", [16, 18])], widgets=[]),
        _node(7, "ImageInvert", [_in("image", "IMAGE", 16)], [_out("IMAGE", "IMAGE", [17])], widgets=[], mode=4),
        _node(8, "SaveImage", [_in("images", "IMAGE", 17)], [], widgets=["ipadapter_exact_test"]),
        _node(9, "LoadImage", [], [_out("IMAGE", "IMAGE", [19, 21]), _out("MASK", "MASK", [])],
              widgets=["reference.png", "image"], mode=2),
        _node(10, "ImageStitch", [_in("image1", "IMAGE", 18), _in("image2", "IMAGE", 19)],
              [_out("IMAGE", "IMAGE", [20])], widgets=["down", False, 4, "black"]),
        _node(11, "PreviewImage", [_in("images", "IMAGE", 20)], [], widgets=[]),
        _node(12, "Note", [], [], widgets=["Just a note."]),
        _node(13, "MarkdownNote", [], [], widgets=["# Also a note"]),
        _node(14, "ControlNetApplyAdvanced",
              [_in("positive", "CONDITIONING", 5), _in("negative", "CONDITIONING", 6),
               _in("control_net", "CONTROL_NET", None), _in("image", "IMAGE", 21), _in("vae", "VAE", None)],
              [_out("positive", "CONDITIONING", [7]), _out("negative", "CONDITIONING", [8])],
              widgets=[0.8, 0.0, 1.0], mode=4),
        _node(20, "PrimitiveNode", [], [{"name": "INT", "type": "INT", "links": [10], "widget": {"name": "width"}}],
              widgets=[96, "fixed"]),
        _node(21, "PrimitiveInt", [], [_out("INT", "INT", [11])], widgets=[42, "fixed"]),
        _node(30, "Reroute", [_in("", "*", 1)], [_out("", "MODEL", [2])]),
        _node(31, "Reroute", [_in("", "*", 13)], [_out("", "VAE", [14])]),
        _node(32, "Reroute", [_in("", "*", 14)], [_out("", "VAE", [15])]),
    ],
}

EXPECTED_API = {
    "1": {"inputs": {"ckpt_name": "sd15_tiny.safetensors"}, "class_type": "CheckpointLoaderSimple",
          "_meta": {"title": "Load Checkpoint"}},
    "2": {"inputs": {"text": "a red fox in the snow", "clip": ["1", 1]}, "class_type": "CLIPTextEncode",
          "_meta": {"title": "Positive"}},
    "3": {"inputs": {"text": "blurry", "clip": ["1", 1]}, "class_type": "CLIPTextEncode",
          "_meta": {"title": "CLIP Text Encode (Prompt)"}},
    "4": {"inputs": {"width": 96, "height": 64, "batch_size": 1}, "class_type": "EmptyLatentImage",
          "_meta": {"title": "Empty Latent Image"}},
    "5": {"inputs": {"seed": ["21", 0], "steps": 4, "cfg": 7.5, "sampler_name": "euler", "scheduler": "karras",
                     "denoise": 1.0, "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                     "latent_image": ["4", 0]},
          "class_type": "KSampler", "_meta": {"title": "KSampler"}},
    "6": {"inputs": {"samples": ["5", 0], "vae": ["1", 2]}, "class_type": "VAEDecode",
          "_meta": {"title": "VAE Decode"}},
    "8": {"inputs": {"filename_prefix": "ipadapter_exact_test", "images": ["6", 0]}, "class_type": "SaveImage",
          "_meta": {"title": "Save Image"}},
    "10": {"inputs": {"direction": "down", "match_image_size": False, "spacing_width": 4, "spacing_color": "black",
                      "image1": ["6", 0]},
           "class_type": "ImageStitch", "_meta": {"title": "Image Stitch"}},
    "11": {"inputs": {"images": ["10", 0]}, "class_type": "PreviewImage", "_meta": {"title": "Preview Image"}},
    "21": {"inputs": {"value": 42}, "class_type": "PrimitiveInt", "_meta": {"title": "Int"}},
}


def test_core_workflow_to_api_exact():
    assert ui_to_api(copy.deepcopy(UI_WORKFLOW), OBJECT_INFO) == EXPECTED_API


def test_links_in_object_form_give_the_same_prompt():
    wf = copy.deepcopy(UI_WORKFLOW)
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    wf["links"] = [dict(zip(keys, link, strict=True)) for link in wf["links"]]
    assert ui_to_api(wf, OBJECT_INFO) == EXPECTED_API


def test_conversion_does_not_modify_its_input():
    wf = copy.deepcopy(UI_WORKFLOW)
    ui_to_api(wf, OBJECT_INFO)
    assert wf == UI_WORKFLOW


def test_primitive_node_value_wins_over_the_stored_widget_value():
    wf = copy.deepcopy(UI_WORKFLOW)
    next(n for n in wf["nodes"] if n["id"] == 20)["widgets_values"] = [128, "increment"]
    assert ui_to_api(wf, OBJECT_INFO)["4"]["inputs"]["width"] == 128


def test_unlinked_converted_widget_keeps_its_value():
    wf = copy.deepcopy(UI_WORKFLOW)
    sampler = next(n for n in wf["nodes"] if n["id"] == 5)
    sampler["inputs"][-1]["link"] = None
    assert ui_to_api(wf, OBJECT_INFO)["5"]["inputs"]["seed"] == 123456


def test_muted_required_input_is_dropped_like_the_frontend():
    """A consumer of a muted node loses that input (the server then reports it missing)."""
    wf = copy.deepcopy(UI_WORKFLOW)
    next(n for n in wf["nodes"] if n["id"] == 6)["mode"] = 2  # mute VAEDecode
    api = ui_to_api(wf, OBJECT_INFO)
    assert "6" not in api
    assert "images" not in api["8"]["inputs"] and "image1" not in api["10"]["inputs"]


def test_bypass_with_no_matching_input_drops_the_link():
    wf = copy.deepcopy(UI_WORKFLOW)
    invert = next(n for n in wf["nodes"] if n["id"] == 7)
    invert["inputs"][0]["type"] = "MASK"
    assert "images" not in ui_to_api(wf, OBJECT_INFO)["8"]["inputs"]


def test_widget_layout_knows_the_frontend_only_values():
    assert widget_layout(OBJECT_INFO["KSampler"]) == [
        ("seed", 1), ("steps", 0), ("cfg", 0), ("sampler_name", 0), ("scheduler", 0), ("denoise", 0)]
    assert widget_layout(OBJECT_INFO["LoadImage"]) == [("image", 0), (None, 0)]
    combo_with_control = {"input": {"required": {"pick": [["a", "b"], {"control_after_generate": True}],
                                                 "noise_seed": ["INT", {}],
                                                 "seed": ["INT", {"control_after_generate": False}],
                                                 "strength": ["FLOAT", {"forceInput": True}],
                                                 "image": ["IMAGE"]},
                                    "optional": {"extra": ["STRING", {}]}}}
    assert widget_layout(combo_with_control) == [("pick", 2), ("noise_seed", 1), ("seed", 0), ("extra", 0)]


def test_legacy_values_for_force_input_are_skipped():
    info = {"Thing": {"input": {"required": {"a": ["FLOAT", {"forceInput": True}], "b": ["INT", {}]}},
                      "output": ["INT"], "display_name": "Thing"}}
    nodes = [_node(1, "Thing", widgets=[0.5, 7])]
    assert ui_to_api({"nodes": nodes, "links": []}, info)["1"]["inputs"] == {"b": 7}
    nodes = [_node(1, "Thing", widgets=[7])]
    assert ui_to_api({"nodes": nodes, "links": []}, info)["1"]["inputs"] == {"b": 7}


def test_unknown_node_types_and_subgraphs_are_errors():
    with pytest.raises(WorkflowError, match="NoSuchNode"):
        ui_to_api({"nodes": [_node(1, "NoSuchNode", widgets=[])], "links": []}, OBJECT_INFO)
    sub = "0f1e2d3c-0000-4000-8000-000000000000"
    wf = {"nodes": [_node(1, sub, widgets=[])], "links": [], "definitions": {"subgraphs": [{"id": sub}]}}
    with pytest.raises(WorkflowError, match="subgraph"):
        ui_to_api(wf, OBJECT_INFO)
    with pytest.raises(WorkflowError, match="API-format"):
        ui_to_api(EXPECTED_API, OBJECT_INFO)


def test_shrink_caps_latent_size_and_steps():
    from tests.harness.workflow import shrink

    api = copy.deepcopy(EXPECTED_API)
    api["4"]["inputs"].update(width=1024, height=768)
    api["5"]["inputs"]["steps"] = 30
    shrink(api, max_side=64, max_steps=4)
    assert (api["4"]["inputs"]["width"], api["4"]["inputs"]["height"]) == (64, 48)
    assert api["5"]["inputs"]["steps"] == 4
    assert api["1"] == EXPECTED_API["1"]


def test_missing_trailing_widget_values_take_the_defaults():
    """A node that gained inputs since the workflow was saved: the new widgets keep their defaults."""
    nodes = [_node(1, "KSampler", widgets=[7, "fixed", 12]), _node(2, "ImageStitch", widgets=None)]
    api = ui_to_api({"nodes": nodes, "links": []}, OBJECT_INFO)
    assert api["1"]["inputs"] == {"seed": 7, "steps": 12, "cfg": 8.0, "sampler_name": "euler",
                                  "scheduler": "simple", "denoise": 1.0}
    assert api["2"]["inputs"] == {"direction": "right", "match_image_size": True, "spacing_width": 0,
                                  "spacing_color": "white"}
