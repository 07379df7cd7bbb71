"""The one import set-up for tests, scripts, the demo and benchmarks.

The repository root is a ComfyUI custom-node package whose folders (`nodes/`, `models/`) would
shadow ComfyUI's own modules, so it is never put on sys.path. Instead:

* `register_packages()` makes `tests` and `ipadapter_pack` (= this checkout, its __init__.py
  not run, so the pack's modules import without loading the node pack) importable;
* `prepare_comfy()` puts ComfyUI ($COMFYUI_PATH or the bundled copy) first on sys.path, arms
  the CPU-only torchvision workaround and selects the CPU before anything imports
  comfy.model_management.

Scripts outside tests/ load this file by path (it imports nothing of the repository at module
level), then call both:

    runpy.run_path(str(REPO / "tests" / "harness" / "imports.py"))["setup"]()
"""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK_PACKAGE = "ipadapter_pack"

log = logging.getLogger("tests")


def _register_package(name: str, path: Path) -> None:
    existing = sys.modules.get(name)
    if existing is not None and str(path) in list(getattr(existing, "__path__", [])):
        return
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(path)]
    pkg.__file__ = None
    sys.modules[name] = pkg


def _pytest_root_package_names(repo: Path) -> list[tuple[str, Path]]:
    """The dotted name(s) under which pytest's Package collector would import the root __init__.py."""
    parts = [(repo.name, repo)]
    folder = repo.parent
    while (folder / "__init__.py").is_file():
        parts.insert(0, (folder.name, folder))
        folder = folder.parent
    return [(".".join(name for name, _ in parts[: i + 1]), path) for i, (_, path) in enumerate(parts)]


def register_packages() -> None:
    """`tests` and `ipadapter_pack` as packages, without executing the pack's __init__.py."""
    _register_package("tests", REPO / "tests")
    _register_package(PACK_PACKAGE, REPO)
    # Under pytest the root (it has an __init__.py) is collected as a Package and its __init__.py
    # imported under the folder's name -- which would load the whole pack and ComfyUI into every
    # run. Registering that name first makes the import a no-op.
    for name, path in _pytest_root_package_names(REPO):
        if name not in sys.modules:
            _register_package(name, path)


def _is_repo(entry: str) -> bool:
    try:
        return Path(entry or ".").resolve() == REPO
    except OSError:
        return False


def prepare_comfy(force_cpu: bool = True) -> Path | None:
    """Makes ComfyUI importable in this process; None if there is no ComfyUI yet (`make setup`
    fetches it). ComfyUI runs on the CPU if `force_cpu` or when there is no CUDA device."""
    register_packages()
    from tests.harness import comfy_host, torchvision_cpu

    torchvision_cpu.install()  # diffusers imports torchvision too, with or without ComfyUI
    try:
        path = comfy_host.comfy_dir()
    except FileNotFoundError as exc:
        log.warning("%s", exc)
        return None
    # `python -m pytest` / `python scripts/x.py` may have put the checkout on sys.path.
    sys.path[:] = [p for p in sys.path if not _is_repo(p)]
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))  # first, as `python main.py` has it
    if "comfy.model_management" in sys.modules:
        log.warning("comfy.model_management was imported before the CPU could be selected")
        return path
    import comfy.cli_args
    import torch

    if force_cpu or not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    return path


def setup(force_cpu: bool = True) -> Path | None:
    """Both steps; returns the ComfyUI folder (or None when there is none yet)."""
    register_packages()
    return prepare_comfy(force_cpu)
