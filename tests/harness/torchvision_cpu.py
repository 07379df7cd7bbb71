"""CPU-only test-host workaround for a CUDA build of torchvision on a CPU build of torch.

PyPI's torchvision 0.28.0 is a CUDA build. Next to a CPU torch its C++ extension cannot be
loaded, so the ``torchvision::nms`` / ``torchvision::qnms`` operators are never defined and
``import torchvision`` dies in ``torchvision/_meta_registrations.py`` at
``register_fake("torchvision::nms")``. ComfyUI imports torchvision but never calls those ops.

``install()`` defines the two schemas (only when they are missing after trying to load the
real extension) right before torchvision is first imported. This belongs to the test host
and the demo, never to the pack.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY = None  # keeps the torch.library.Library alive: dropping it would drop the definitions


def _missing_ops() -> list[str]:
    import torch

    return [name for name in _SCHEMAS if not torch._C._jit_get_schemas_for_operator(f"torchvision::{name}")]


def _try_real_extension() -> None:
    """Loads torchvision's own C++ extension if it fits this torch (then nothing is needed)."""
    import torch

    spec = importlib.machinery.PathFinder.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    for folder in spec.submodule_search_locations:
        for lib in sorted(Path(folder).glob("_C.*")):
            if lib.suffix in (".so", ".pyd", ".dylib"):
                try:
                    torch.ops.load_library(str(lib))
                    return
                except (OSError, ImportError, RuntimeError) as exc:
                    log.debug("torchvision extension %s does not load here: %s", lib, exc)


def define_missing_schemas() -> list[str]:
    """Defines the torchvision op schemas that are missing; returns the names it defined."""
    global _LIBRARY
    if not _missing_ops():
        return []
    _try_real_extension()
    missing = _missing_ops()
    if not missing:
        return []
    import torch

    if _LIBRARY is None:
        _LIBRARY = torch.library.Library("torchvision", "DEF")
    for name in missing:
        _LIBRARY.define(_SCHEMAS[name])
    log.info("CPU test host: defined torchvision op schemas %s (torchvision C++ extension unavailable)", missing)
    return missing


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs define_missing_schemas() once, just before the first `import torchvision`."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            uninstall()
            define_missing_schemas()
        return None  # the ordinary finders do the actual import


_HOOK = _BeforeTorchvision()


def uninstall() -> None:
    while _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def install() -> None:
    """Applies the workaround before torchvision is imported (lazily, so torch is not imported early).

    If torchvision is already imported there is nothing left to do (it imported, so the ops exist).
    """
    if "torchvision" in sys.modules:
        return
    if _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
