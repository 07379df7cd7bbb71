#!/usr/bin/env python3
"""Runs a shipped workflow on a real, headless ComfyUI with this pack and saves the image.

    .venv/bin/python scripts/demo.py [--workflow workflows/basic_image_prompt.json] [--out out/demo.png]

(`make demo` runs it after `make setup`.) ComfyUI is $COMFYUI_PATH or the copy that
scripts/bootstrap.sh fetched. Model files: the ones the workflow names, looked up in
$IPADAPTER_MODELS (a ComfyUI-style models folder: checkpoints/, clip_vision/, ipadapter/, ...),
else in $COMFYUI_PATH/models. If any is missing there, the demo runs on generated random-weight
stand-ins with the same layouts (tests/fixtures/generate.py) and says so: the picture is then
noise by design, and what the demo shows is that the whole path runs inside ComfyUI.
"""

from __future__ import annotations

import argparse
import logging
import os
import runpy
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The test host lives in tests/harness; the one import set-up registers it (and never puts the
# repository root, whose folder names shadow ComfyUI's own modules, on sys.path).
runpy.run_path(str(REPO / "tests" / "harness" / "imports.py"))["register_packages"]()

from tests.harness import standins  # noqa: E402
from tests.harness.comfy_host import MODEL_FOLDERS, ComfyServer, comfy_dir  # noqa: E402
from tests.harness.workflow import shrink, ui_to_api  # noqa: E402

log = logging.getLogger("demo")

STAND_IN_NOTICE = "No real weights found; using generated random stand-in weights: the image is noise by design."
# With stand-in weights the picture means nothing, so the run is made cheap unless --full.
STAND_IN_MAX_SIDE, STAND_IN_MAX_STEPS = 256, 8


def real_models_root(workflow: dict) -> tuple[Path | None, str]:
    """The folder that holds every model the workflow names, and a note on where it looked."""
    candidates = []
    if os.environ.get("IPADAPTER_MODELS"):
        candidates.append(("IPADAPTER_MODELS", Path(os.environ["IPADAPTER_MODELS"]).expanduser()))
    elif os.environ.get("COMFYUI_PATH"):
        candidates.append(("COMFYUI_PATH/models", Path(os.environ["COMFYUI_PATH"]).expanduser() / "models"))
    notes = []
    for label, root in candidates:
        missing = standins.missing_real_models(workflow, [root], MODEL_FOLDERS)
        if not missing:
            return root.resolve(), f"real weights from {label} = {root}"
        notes.append(f"{label} = {root} lacks {', '.join(missing)}")
    return None, "; ".join(notes) or "neither IPADAPTER_MODELS nor COMFYUI_PATH is set"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflow", type=Path, default=REPO / "workflows" / "basic_image_prompt.json")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "demo.png")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed for the run")
    parser.add_argument("--full", action="store_true",
                        help=f"with stand-in weights, run the workflow as saved (default: latent capped at "
                             f"{STAND_IN_MAX_SIDE} px, at most {STAND_IN_MAX_STEPS} steps)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="[demo] %(message)s", stream=sys.stderr)

    workflow_path = args.workflow.resolve()
    if not workflow_path.is_file():
        print(f"demo: no workflow at {workflow_path}", file=sys.stderr)
        return 2
    workflow = standins.load_workflow(workflow_path)
    t0 = time.monotonic()
    comfy = comfy_dir()

    root, note = real_models_root(workflow)
    stand_ins = root is None
    work = Path(tempfile.mkdtemp(prefix="ipadapter-demo-"))
    try:
        if stand_ins:
            log.info("%s", note)
            print(STAND_IN_NOTICE, flush=True)
            from tests.fixtures import generate

            log.info("generating (or reusing) stand-in weights under %s", generate.MODELS_ROOT)
            models_roots = [standins.build_models_tree(work / "models", [workflow_path], generate.ensure)]
        else:
            log.info("%s", note)
            models_roots = [root]

        log.info("starting ComfyUI (%s) with the pack", comfy)
        with ComfyServer(models_root=models_roots, comfy=comfy, base_dir=work / "comfy",
                         save_log_to=REPO / "out" / "demo-comfyui.log") as server:
            standins.stage_inputs(workflow, server.input_dir, max_side=STAND_IN_MAX_SIDE if stand_ins and not args.full
                                  else None)
            api = ui_to_api(workflow, server.object_info())
            if stand_ins and not args.full:
                shrink(api, STAND_IN_MAX_SIDE, STAND_IN_MAX_STEPS)
                log.info("stand-in run: latent capped at %d px and sampling at %d steps (--full: as saved)",
                         STAND_IN_MAX_SIDE, STAND_IN_MAX_STEPS)
            log.info("running %s (%d nodes)", workflow_path.name, len(api))
            t_run = time.monotonic()
            entry = server.run(api, timeout=args.timeout)
            log.info("workflow finished in %.1f s", time.monotonic() - t_run)
            saved = [p for p in server.output_images(entry) if p.parent.is_relative_to(server.output_dir)]
            if not saved:
                print(f"demo: the workflow saved no image (outputs: {entry.get('outputs')})", file=sys.stderr)
                return 1
            out = args.out.resolve()
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(saved[0], out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    log.info("done in %.1f s (server log: %s)", time.monotonic() - t0, REPO / "out" / "demo-comfyui.log")
    if stand_ins:
        print(STAND_IN_NOTICE)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
