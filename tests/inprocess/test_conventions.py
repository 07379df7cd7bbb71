"""ComfyUI conventions every node of the pack follows (in-process, a few seconds).

* one menu group: every CATEGORY is "IP-Adapter Exact" (or a sub-category of it);
* a DESCRIPTION (the frontend's node help), a tooltip on every input, named outputs with
  tooltips, a display name;
* widget defaults that the widget accepts (a COMBO default among its choices, numbers in range);
* node ids of our own: none of the ids the most used IP-Adapter pack registers (ComfyUI keeps
  one global table, so a shared id breaks users who have both packs);
* pack code logs, never prints.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GROUP = "IP-Adapter Exact"
PACK_CODE = ("nodes", "models", "ip_adapter_core")
ID_PREFIX = "IPAdapterExact"

# The ids ComfyUI_IPAdapter_plus registers (REFERENCE.md section 6, "Node ids already taken by
# the most used IP-Adapter pack"), copied here so the test stands alone.
TAKEN_IDS = frozenset("""
IPAdapter IPAdapterAdvanced IPAdapterBatch IPAdapterFaceID IPAAdapterFaceIDBatch IPAdapterFaceIDKolors
IPAdapterTiled IPAdapterTiledBatch IPAdapterEmbeds IPAdapterEmbedsBatch IPAdapterStyleComposition
IPAdapterStyleCompositionBatch IPAdapterMS IPAdapterClipVisionEnhancer IPAdapterClipVisionEnhancerBatch
IPAdapterPreciseStyleTransfer IPAdapterPreciseStyleTransferBatch IPAdapterPreciseComposition
IPAdapterPreciseCompositionBatch IPAdapterFromParams IPAdapterUnifiedLoader IPAdapterUnifiedLoaderFaceID
IPAdapterUnifiedLoaderCommunity IPAdapterModelLoader IPAdapterInsightFaceLoader IPAdapterEncoder
IPAdapterCombineEmbeds IPAdapterNoise PrepImageForClipVision IPAdapterSaveEmbeds IPAdapterLoadEmbeds
IPAdapterWeights IPAdapterWeightsFromStrategy IPAdapterPromptScheduleFromWeightsStrategy IPAdapterCombineWeights
IPAdapterRegionalConditioning IPAdapterCombineParams IPAdapterApply
""".split())


@pytest.fixture(scope="module")
def pack(comfy_inprocess):
    """The pack as ComfyUI loaded it (its NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS)."""
    return comfy_inprocess.load_pack()


def node_classes(pack) -> list[tuple[str, type]]:
    return sorted(pack.NODE_CLASS_MAPPINGS.items())


def inputs_of(cls) -> list[tuple[str, str, tuple]]:
    """(section, name, spec) for the required and optional inputs (hidden ones have no widget)."""
    types = cls.INPUT_TYPES()
    return [(section, name, spec) for section in ("required", "optional")
            for name, spec in (types.get(section) or {}).items()]


def options_of(spec: tuple) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def test_the_pack_has_nodes(pack):
    assert len(pack.NODE_CLASS_MAPPINGS) >= 4


def test_one_menu_group(pack):
    for node_id, cls in node_classes(pack):
        category = getattr(cls, "CATEGORY", None)
        assert category == GROUP or str(category).startswith(GROUP + "/"), (node_id, category)


def test_display_names_and_descriptions(pack):
    names = pack.NODE_DISPLAY_NAME_MAPPINGS
    assert set(names) == set(pack.NODE_CLASS_MAPPINGS)
    assert len(set(names.values())) == len(names), "two nodes share a display name"
    for node_id, cls in node_classes(pack):
        assert names[node_id].strip(), node_id
        description = getattr(cls, "DESCRIPTION", None)
        assert isinstance(description, str) and len(description.strip()) >= 20, (node_id, description)
        assert "TODO" not in description and "to be written" not in description, node_id


def test_every_input_has_a_tooltip(pack):
    missing = [f"{node_id}.{name}" for node_id, cls in node_classes(pack)
               for _, name, spec in inputs_of(cls)
               if not str(options_of(spec).get("tooltip", "")).strip()]
    assert not missing, f"inputs without a tooltip: {missing}"


def test_outputs_are_named_and_explained(pack):
    for node_id, cls in node_classes(pack):
        types = tuple(cls.RETURN_TYPES)
        assert callable(getattr(cls, getattr(cls, "FUNCTION", ""), None)), f"{node_id}: FUNCTION is not a method"
        if not types:
            assert getattr(cls, "OUTPUT_NODE", False), f"{node_id} has no outputs and is not an output node"
            continue
        names = getattr(cls, "RETURN_NAMES", None)
        assert names is not None and len(names) == len(types), f"{node_id}: RETURN_NAMES {names} for {types}"
        assert all(isinstance(n, str) and n.strip() for n in names), (node_id, names)
        assert len(set(names)) == len(names), (node_id, names)
        tooltips = getattr(cls, "OUTPUT_TOOLTIPS", None)
        assert tooltips is not None and len(tooltips) == len(types), f"{node_id}: OUTPUT_TOOLTIPS {tooltips}"
        assert all(isinstance(t, str) and t.strip() for t in tooltips), (node_id, tooltips)


def test_widget_defaults_are_accepted_by_their_widgets(pack):
    for node_id, cls in node_classes(pack):
        for _, name, spec in inputs_of(cls):
            kind, opts = spec[0], options_of(spec)
            where = f"{node_id}.{name}"
            if isinstance(kind, (list, tuple)):
                if "default" in opts and kind:  # an empty file list is fine: no files installed
                    assert opts["default"] in kind, f"{where}: default {opts['default']!r} not among {list(kind)}"
            elif kind in ("INT", "FLOAT") and "default" in opts:
                low, high = opts.get("min", float("-inf")), opts.get("max", float("inf"))
                assert low <= opts["default"] <= high, f"{where}: default {opts['default']} outside [{low}, {high}]"
                if kind == "INT":
                    assert isinstance(opts["default"], int), where


def test_node_ids_are_our_own(pack):
    ids = set(pack.NODE_CLASS_MAPPINGS)
    assert not ids & TAKEN_IDS, f"ids taken by ComfyUI_IPAdapter_plus: {sorted(ids & TAKEN_IDS)}"
    assert all(i.startswith(ID_PREFIX) for i in ids), sorted(i for i in ids if not i.startswith(ID_PREFIX))


def print_calls(path: Path) -> list[int]:
    """Lines that call the print builtin (AST) or name it at all (tokens, so `show = print` is
    caught too); strings and comments that mention print( do not count."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    lines = {node.lineno for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"}
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    lines |= {tok.start[0] for tok in tokens if tok.type == tokenize.NAME and tok.string == "print"}
    return sorted(lines)


def test_pack_code_logs_and_never_prints():
    files = [REPO / "__init__.py"] + [p for folder in PACK_CODE for p in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 5
    found = {str(p.relative_to(REPO)): lines for p in files if (lines := print_calls(p))}
    assert not found, f"print in pack code (use logging): {found}"


def test_the_print_check_catches_a_print(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("import logging\n# print('a comment')\nlogging.info('print( in a string is fine')\n"
                      "if True:\n    print('no')\nshow = print\n")
    assert print_calls(sample) == [5, 6]
