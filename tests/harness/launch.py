"""Starts ComfyUI's main.py on a CPU-only test host.

    python tests/harness/launch.py /path/to/ComfyUI [main.py arguments ...]

Applies the torchvision workaround of ``torchvision_cpu.py`` (test host only, never the pack),
then runs main.py as ``__main__`` with sys.argv, sys.path[0] and the working directory set the
way ``cd ComfyUI && python main.py ...`` would set them. Pass absolute paths in the arguments.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys
from pathlib import Path


def _load_workaround():
    here = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location("_ipadapter_exact_torchvision_cpu", here / "torchvision_cpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _exit_with_parent() -> None:
    """With IPADAPTER_HARNESS_PARENT_PID set, exit as soon as that process is gone (no orphans)."""
    parent = os.environ.get("IPADAPTER_HARNESS_PARENT_PID")
    if not parent:
        return
    import threading
    import time

    def watch(pid: int) -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:
                pass
            if os.getppid() == 1:
                os._exit(0)

    threading.Thread(target=watch, args=(int(parent),), daemon=True, name="parent-watch").start()


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        sys.stderr.write(__doc__)
        raise SystemExit(2)
    comfy = Path(argv[0]).expanduser().resolve()
    main_py = comfy / "main.py"
    if not main_py.is_file():
        raise SystemExit(f"launch.py: no main.py in {comfy}")

    _load_workaround().install()
    _exit_with_parent()

    sys.argv = [str(main_py), *argv[1:]]
    # `python main.py` puts the script's folder first on sys.path; drop this harness folder.
    sys.path[0] = str(comfy)
    os.chdir(comfy)
    runpy.run_path(str(main_py), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
