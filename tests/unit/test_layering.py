"""The pack's layering, read from its source: ip_adapter_core/ and models/ never import ComfyUI, and in nodes/
only the seam (the nodes/comfy_seam package) does. A ComfyUI import elsewhere would spread its calling
conventions through the pack and break the release matrix's promise that only the seam moves with ComfyUI."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMFY_MODULES = {"comfy", "comfy_extras", "comfy_api", "folder_paths", "server", "execution", "node_helpers",
                 "comfy_execution", "latent_preview"}


def comfy_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"{path.relative_to(REPO)}:{node.lineno} imports {n}" for n in names
                  if n.split(".")[0] in COMFY_MODULES]
    return found


def test_core_and_models_never_import_comfyui():
    offenders = [hit for folder in ("ip_adapter_core", "models") for path in sorted((REPO / folder).rglob("*.py"))
                 for hit in comfy_imports(path)]
    assert not offenders, offenders


def test_only_the_seam_imports_comfyui_in_nodes():
    seam = REPO / "nodes" / "comfy_seam"
    assert seam.is_dir() and (seam / "__init__.py").is_file(), "the seam is the package nodes/comfy_seam/"
    offenders = [hit for path in sorted((REPO / "nodes").rglob("*.py")) if not path.is_relative_to(seam)
                 for hit in comfy_imports(path)]
    assert not offenders, offenders
    assert any(comfy_imports(path) for path in seam.rglob("*.py")), "the seam no longer imports ComfyUI?"
