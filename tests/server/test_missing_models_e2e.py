"""A workflow that names a model file the server does not have gets ComfyUI's normal validation
answer -- HTTP 400, node_errors naming the input, "Value not in list" with the files that are
there -- before anything runs: no traceback, and the server keeps serving."""

from __future__ import annotations

import re

import pytest

from tests.harness import standins
from tests.harness.comfy_host import PACK_DIR_NAME, REPO, PromptRejected
from tests.harness.workflow import shrink, ui_to_api

pytestmark = pytest.mark.server

STEM = "basic_image_prompt"


def basic_prompt(server) -> dict:
    workflow = standins.load_workflow(REPO / "workflows" / f"{STEM}.json")
    standins.stage_inputs(workflow, server.input_dir, max_side=64)
    return shrink(ui_to_api(workflow, server.object_info()), 64, 4)


def node_of(api: dict, class_type: str) -> str:
    (node_id,) = [i for i, n in api.items() if n["class_type"] == class_type]
    return node_id


@pytest.mark.parametrize("class_type,input_name,available", [
    ("IPAdapterExactLoader", "ipadapter_file", "ip-adapter_sd15.safetensors"),
    ("CLIPVisionLoader", "clip_name", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"),
])
def test_missing_model_file_is_a_validation_error(comfy_server, class_type, input_name, available):
    api = basic_prompt(comfy_server)
    node_id = node_of(api, class_type)
    missing = "not-downloaded-yet.safetensors"
    api[node_id]["inputs"][input_name] = missing
    log_before = len(comfy_server.log_text())

    with pytest.raises(PromptRejected) as rejected:
        comfy_server.queue(api)
    answer = rejected.value
    assert answer.status == 400
    assert answer.error.get("type") == "prompt_outputs_failed_validation", answer.body
    assert set(answer.node_errors) == {node_id}, answer.node_errors
    node_error = answer.node_errors[node_id]
    assert node_error["class_type"] == class_type
    (error,) = node_error["errors"]
    assert error["type"] == "value_not_in_list"
    assert error["message"] == "Value not in list"
    assert error["extra_info"]["input_name"] == input_name
    assert error["extra_info"]["received_value"] == missing
    # The details name the input and the value asked for, and list the files that are there
    # (ComfyUI writes "(list of length N)" and leaves input_config out for a list longer than 20;
    # the frontend then shows the combo's own choices, from /object_info).
    assert error["details"].startswith(f"{input_name}: '{missing}' not in "), error["details"]
    config = error["extra_info"].get("input_config")
    if config is not None:
        assert available in error["details"] and available in config[0], error
    else:
        assert "(list of length" in error["details"], error["details"]
    choices = comfy_server.object_info()[class_type]["input"]["required"][input_name][0]
    assert available in choices and missing not in choices

    # Nothing ran, nothing was logged as a traceback, and the server answers and runs prompts.
    new_log = comfy_server.log_text()[log_before:]
    assert "Traceback" not in new_log, new_log[-3000:]
    assert not re.search(re.escape(PACK_DIR_NAME) + r".*Error", new_log), new_log[-3000:]
    assert comfy_server.alive()
    assert comfy_server.system_stats()["system"]
    entry = comfy_server.run(basic_prompt(comfy_server))
    assert entry["status"]["status_str"] == "success"
    assert comfy_server.output_images(entry)
