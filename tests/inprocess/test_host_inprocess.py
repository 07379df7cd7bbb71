"""The in-process ComfyUI fixture: the pack loads through ComfyUI's own loader and sees the fixtures."""

from __future__ import annotations

import sys

from tests.harness.comfy_host import PACK_DIR_NAME


def test_pack_loads_in_process(comfy_inprocess, models):
    models.ensure("checkpoints/sd15_tiny.safetensors", "ipadapter/sd15_tiny_base.safetensors")
    pack = comfy_inprocess.load_pack()
    nodes = comfy_inprocess.nodes
    assert nodes.__file__.startswith(str(comfy_inprocess.comfy_dir)), "ComfyUI's nodes.py must win over the pack's"
    for name in ("IPAdapterExactLoader", "IPAdapterExactEncode", "IPAdapterExactApply", "IPAdapterExactSimple"):
        assert nodes.NODE_CLASS_MAPPINGS[name] is pack.NODE_CLASS_MAPPINGS[name]
        assert nodes.NODE_CLASS_MAPPINGS[name].RELATIVE_PYTHON_MODULE == f"custom_nodes.{PACK_DIR_NAME}"
    folder_paths = comfy_inprocess.folder_paths
    assert "sd15_tiny.safetensors" in folder_paths.get_filename_list("checkpoints")
    assert "sd15_tiny_base.safetensors" in folder_paths.get_filename_list("ipadapter")
    assert folder_paths.get_output_directory().startswith(str(comfy_inprocess.work))
    assert comfy_inprocess.load_pack() is pack  # loaded once
    assert comfy_inprocess.model_management.cpu_state == comfy_inprocess.model_management.CPUState.CPU


def test_pack_package_is_importable_without_its_init():
    import ipadapter_pack.ip_adapter_core.layout as layout

    assert layout.__name__ == "ipadapter_pack.ip_adapter_core.layout"
    assert getattr(sys.modules["ipadapter_pack"], "NODE_CLASS_MAPPINGS", None) is None
