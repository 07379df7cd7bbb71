"""Shared test setup for ComfyUI-IPAdapter-Exact.

At import (before any test module):
* ``tests`` and ``ipadapter_pack`` are registered as packages without executing an
  ``__init__.py``: ``ipadapter_pack`` is this checkout, so pure unit tests can
  ``import ipadapter_pack.ip_adapter_core.layout`` without ComfyUI loading the node pack.
  (The repository root is itself a package -- the pack's ``__init__.py`` imports ComfyUI --
  which is why ``tests/`` must not have an ``__init__.py``: pytest would import the pack.)
* ComfyUI (``$COMFYUI_PATH`` or ``.cache/comfyui-0.3.75``) is put first on ``sys.path`` (and the
  checkout taken off it: its ``nodes/`` would shadow ComfyUI's ``nodes``), with
  the CPU-only torchvision workaround armed and ``comfy.cli_args.args.cpu = True`` set before
  anything can import ``comfy.model_management``.

Fixtures:
* ``models`` (session): the generated random-weight model files (``models["checkpoints/x"]``,
  ``models.ensure(...)``, ``models.root``).
* ``comfy_inprocess`` (session): ComfyUI imported in this process, fixture model folders
  registered (checkpoints, clip_vision, ipadapter, controlnet, loras), output/input/temp/user
  in a temporary folder; ``load_pack()`` loads the pack through ComfyUI's own loader. Run model
  code inside ``torch.inference_mode()``, as ComfyUI's executor does.
* ``comfy_server`` (session): one real ComfyUI server with the pack, shared by all server
  tests, stopped at the end; its log is copied to ``.test-artifacts/comfyui-server.log``.
"""

from __future__ import annotations

import logging
import runpy
import sys
from pathlib import Path

import pytest

_imports = runpy.run_path(str(Path(__file__).resolve().parent / "harness" / "imports.py"))
REPO = _imports["REPO"]
ARTIFACTS = REPO / ".test-artifacts"
COMFY_DIR = _imports["setup"](force_cpu=True)

from tests.harness import comfy_host  # noqa: E402
from tests.harness.comfy_host import MODEL_FOLDERS, ComfyServer  # noqa: E402

log = logging.getLogger("tests")


class Models:
    """The generated stand-in model tree (tests/fixtures/generate.py)."""

    def __init__(self):
        from tests.fixtures import generate

        self._generate = generate
        self.root = Path(generate.MODELS_ROOT)

    def ensure(self, *names: str) -> dict[str, Path]:
        return {name: Path(p) for name, p in self._generate.ensure(*names).items()}

    def __getitem__(self, name: str) -> Path:
        return self.ensure(name)[name]


@pytest.fixture(scope="session")
def models() -> Models:
    return Models()


class InProcessComfy:
    """ComfyUI imported into the test process."""

    def __init__(self, comfy_dir: Path, work: Path, models: Models):
        import comfy.model_management
        import folder_paths

        import nodes

        self.comfy_dir = comfy_dir
        self.work = work
        self.models = models
        self.folder_paths = folder_paths
        self.model_management = comfy.model_management
        self.nodes = nodes
        self._pack = None

    def load_pack(self):
        """Loads the pack the way ComfyUI does (once); returns its imported module."""
        if self._pack is None:
            import asyncio

            link = self.work / "custom_nodes" / comfy_host.PACK_DIR_NAME
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(REPO, target_is_directory=True)
            before = set(self.nodes.NODE_CLASS_MAPPINGS)
            if not asyncio.run(self.nodes.load_custom_node(str(link))):
                raise RuntimeError(f"ComfyUI could not load the pack from {link} (see the log above)")
            self._pack = sys.modules[str(link).replace(".", "_x_")]
            log.info("pack loaded in-process: %s", sorted(set(self.nodes.NODE_CLASS_MAPPINGS) - before))
        return self._pack


@pytest.fixture(scope="session")
def comfy_inprocess(tmp_path_factory, models) -> InProcessComfy:
    comfy_dir = COMFY_DIR or comfy_host.comfy_dir()  # raises with the how-to when missing
    import folder_paths

    work = tmp_path_factory.mktemp("comfy_inprocess")
    for sub in ("output", "input", "temp", "user"):
        (work / sub).mkdir()
    folder_paths.set_output_directory(str(work / "output"))
    folder_paths.set_input_directory(str(work / "input"))
    folder_paths.set_temp_directory(str(work / "temp"))
    folder_paths.set_user_directory(str(work / "user"))
    for name in MODEL_FOLDERS:
        folder_paths.add_model_folder_path(name, str(models.root / name), is_default=True)
    return InProcessComfy(comfy_dir, work, models)


def server_model_names() -> list[str]:
    """The fixture files the server tests need: the core test's checkpoint and the workflows' models."""
    from tests.harness import standins

    names = {"checkpoints/sd15_tiny.safetensors"}
    # Lenient: a workflow naming a model without stand-in fails its own test, not the server.
    names.update(standins.fixture_names_for_workflows(sorted((REPO / "workflows").glob("*.json")), strict=False))
    return sorted(names)


@pytest.fixture(scope="session")
def comfy_server(models, tmp_path_factory):
    from tests.harness import standins

    workflows = sorted((REPO / "workflows").glob("*.json"))
    models.ensure(*server_model_names())
    # Real file names used by the workflows are linked to their generated stand-ins.
    aliases = standins.build_models_tree(tmp_path_factory.mktemp("models"), workflows, models.ensure, strict=False)
    server = ComfyServer(models_root=[models.root, aliases], save_log_to=ARTIFACTS / "comfyui-server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pack(comfy_inprocess):
    """The pack's nodes package, in-process (after ComfyUI itself has loaded the pack once)."""
    comfy_inprocess.load_pack()
    from ipadapter_pack import nodes

    return nodes


@pytest.fixture(scope="session")
def sd15(comfy_inprocess, models):
    """The SD1.5 stand-in checkpoint's MODEL, loaded once for the in-process tests."""
    import comfy.sd

    path = models["checkpoints/sd15_tiny.safetensors"]
    return comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)[0]


@pytest.fixture(scope="session")
def vit_h(comfy_inprocess, models):
    """The ViT-H stand-in CLIP_VISION, loaded once (1.2 GB)."""
    import comfy.clip_vision

    return comfy.clip_vision.load(str(models["clip_vision/vit_h.safetensors"]))


@pytest.fixture(scope="module", autouse=True)
def _release_models_after_each_module():
    """After each test module: ComfyUI unloads what it loaded and the garbage collector runs, so the big
    stand-ins of one module (Flux, SD3, SDXL) are gone before the next one loads its own. One process runs
    the whole suite; without this its resident memory kept growing (13.6 GB when the OOM killer ended a run
    that shared this 24 GB machine with other work)."""
    yield
    import gc

    management = sys.modules.get("comfy.model_management")
    if management is not None:
        management.unload_all_models()
        management.soft_empty_cache()
    gc.collect()
