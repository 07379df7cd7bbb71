"""UI-format ComfyUI workflows (what users save and drag into ComfyUI) -> API-format prompts.

The frontend does this conversion in the browser (``graphToPrompt``) before POST /prompt.
``ui_to_api`` repeats it in Python for headless tests, with the node definitions from
``GET /object_info`` telling which inputs are widgets and in which order their values sit in
``widgets_values``. Covered, following the frontend (ComfyUI_frontend 1.32):

* widget values in input order (required, then optional), skipping the frontend-only extras:
  the control widget after an INT with ``control_after_generate`` (or, by legacy rule, an INT
  named ``seed``/``noise_seed``), control + filter-list widgets after a COMBO with
  ``control_after_generate``, and the ``upload`` button that ``image_upload``/``video_upload``
  combos add at the end of the required inputs;
* old workflows that stored values for ``forceInput`` inputs (the frontend's migration);
* widgets converted to inputs and linked: the link wins over the stored value;
* widgets without a stored value (widgets_values too short) get their defaults;
* virtual nodes: Note / MarkdownNote (dropped), Reroute (followed upstream), PrimitiveNode
  (its value is written into the widget it feeds);
* muted nodes (mode 2) are dropped and so are the inputs that pointed at them; bypassed nodes
  (mode 4) are dropped and their consumers rewired to the bypassed node's input of the same
  type, as the frontend does;
* links in the list form ``[id, origin, origin_slot, target, target_slot, type]`` and the
  object form.

Not covered: subgraphs / group nodes (a clear error is raised) and dynamic-prompt syntax in
text widgets (``{a|b}`` is passed through unchanged; the frontend would pick one at random).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

MODE_MUTED = 2
MODE_BYPASS = 4
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
VIRTUAL_TYPES = NOTE_TYPES | {"Reroute", "PrimitiveNode"}
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")


class WorkflowError(ValueError):
    """The UI workflow cannot be converted (unknown node type, subgraph, malformed data)."""


def _spec_type(spec: list) -> str:
    kind = spec[0]
    return "COMBO" if isinstance(kind, (list, tuple)) else str(kind)


def _spec_options(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _ordered_inputs(node_def: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, optional) for required then optional inputs, in the server's input order."""
    inputs = node_def.get("input", {})
    order = node_def.get("input_order", {})
    out = []
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        names = order.get(section) or list(specs)
        out.extend((name, specs[name], section == "optional") for name in names if name in specs)
    return out


def _extra_widget_values(name: str, spec: list) -> int:
    """How many frontend-only widget values follow this widget in widgets_values."""
    kind, opts = _spec_type(spec), _spec_options(spec)
    control = opts.get("control_after_generate")
    if kind == "INT":
        if control is None:
            control = name in ("seed", "noise_seed")
        return 1 if control else 0
    if kind == "COMBO" and control:
        return 2  # control mode + control_filter_list
    return 0


def widget_layout(node_def: dict) -> list[tuple[str | None, int]]:
    """The widgets_values layout of a node: (input name or None for a frontend-only slot, extras)."""
    layout: list[tuple[str | None, int]] = []
    upload_after_required = False
    seen_optional = False
    for name, spec, optional in _ordered_inputs(node_def):
        if optional and not seen_optional:
            seen_optional = True
            if upload_after_required:
                layout.append((None, 0))
                upload_after_required = False
        opts = _spec_options(spec)
        if _spec_type(spec) not in WIDGET_TYPES or opts.get("forceInput"):
            continue
        layout.append((name, _extra_widget_values(name, spec)))
        if not optional and _spec_type(spec) == "COMBO" and any(opts.get(f) for f in UPLOAD_FLAGS):
            upload_after_required = True
    if upload_after_required:
        layout.append((None, 0))
    return layout


def widget_default(spec: list) -> Any:
    """The value the frontend gives a new widget: the spec's default, else the first choice / zero."""
    opts = _spec_options(spec)
    if "default" in opts:
        return opts["default"]
    kind = _spec_type(spec)
    if kind == "COMBO":
        choices = spec[0] if isinstance(spec[0], (list, tuple)) else opts.get("options") or []
        return choices[0] if choices else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind)


def _widget_values(node: dict, node_def: dict) -> dict[str, Any]:
    values = node.get("widgets_values")
    if isinstance(values, dict):  # some custom nodes store a name -> value mapping
        return dict(values)
    values = list(values or [])
    layout = widget_layout(node_def)
    expected = sum(1 + extra for _, extra in layout)
    if len(values) != expected:
        legacy = _legacy_forceinput_layout(node_def)
        if legacy is not None and len(values) == sum(1 + extra for _, extra in legacy):
            layout = legacy
        else:
            log.debug("node %s (%s): %d widget values, layout expects %d",
                      node.get("id"), node.get("type"), len(values), expected)
    specs = {name: spec for name, spec, _ in _ordered_inputs(node_def)}
    out: dict[str, Any] = {}
    pos = 0
    for name, extra in layout:
        if name is not None:
            # Widgets the saved workflow has no value for (a node that gained inputs since) keep
            # their defaults, as in the frontend.
            out[name] = values[pos] if pos < len(values) else widget_default(specs[name])
        pos += 1 + extra
    return out


def _legacy_forceinput_layout(node_def: dict) -> list[tuple[str | None, int]] | None:
    """Old workflows also stored a value for each forceInput input (frontend: migrateWidgetsValues)."""
    layout: list[tuple[str | None, int]] = []
    has_forced = False
    for name, spec, _optional in _ordered_inputs(node_def):
        opts = _spec_options(spec)
        if _spec_type(spec) not in WIDGET_TYPES:
            continue
        extra = 1 if (opts.get("control_after_generate") or name in ("seed", "noise_seed")) else 0
        has_forced = has_forced or bool(opts.get("forceInput"))
        layout.append((None if opts.get("forceInput") else name, extra))
    return layout if has_forced else None


def _links_by_id(workflow: dict) -> dict[int, tuple[Any, int, Any, int, str]]:
    out = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            out[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                               link.get("type", "*"))
        else:
            link_id, origin, origin_slot, target, target_slot, kind = link[:6]
            out[link_id] = (origin, origin_slot, target, target_slot, kind)
    return out


def ui_to_api(ui_workflow: dict, object_info: dict) -> dict[str, dict]:
    """Converts a UI-format workflow into the API format that POST /prompt takes.

    ``object_info`` is the answer of ``GET /object_info`` (all nodes, or at least those used).
    Returns ``{node_id: {"inputs": {...}, "class_type": ..., "_meta": {"title": ...}}}``.
    """
    if "nodes" not in ui_workflow:
        raise WorkflowError("not a UI-format workflow (no 'nodes'); API-format prompts need no conversion")
    subgraph_ids = {sg.get("id") for sg in (ui_workflow.get("definitions") or {}).get("subgraphs") or []}
    nodes = {node["id"]: node for node in ui_workflow["nodes"]}
    links = _links_by_id(ui_workflow)

    def resolve(link_id: Any, want_type: str | None) -> tuple[str, Any] | None:
        """Follows a link upstream through reroutes and bypassed nodes, like graphToPrompt.

        Returns ("link", (origin_id, slot)), ("value", primitive value) or None (no source).
        """
        seen = set()
        while link_id is not None and link_id in links:
            if link_id in seen:
                raise WorkflowError(f"link cycle through link {link_id}")
            seen.add(link_id)
            origin_id, origin_slot = links[link_id][0], links[link_id][1]
            parent = nodes.get(origin_id)
            if parent is None:
                return None
            ptype, pmode = parent.get("type"), parent.get("mode", 0)
            if ptype == "Reroute":
                ins = parent.get("inputs") or []
                link_id = ins[0].get("link") if ins else None
                continue
            if ptype == "PrimitiveNode":
                vals = parent.get("widgets_values") or []
                return ("value", vals[0]) if vals else None
            if ptype in NOTE_TYPES:
                return None
            if pmode == MODE_BYPASS:
                ins = parent.get("inputs") or []
                candidates = [origin_slot] + list(range(len(ins)))
                link_id = None
                for idx in candidates:
                    if isinstance(idx, int) and 0 <= idx < len(ins) and ins[idx].get("type") == want_type:
                        link_id = ins[idx].get("link")
                        break
                if link_id is None:
                    return None
                continue
            return ("link", (str(origin_id), int(origin_slot)))
        return None

    api: dict[str, dict] = {}
    for node_id in sorted(nodes, key=_id_order):
        node = nodes[node_id]
        ntype = node.get("type")
        mode = node.get("mode", 0)
        if ntype in VIRTUAL_TYPES or mode in (MODE_MUTED, MODE_BYPASS):
            continue
        if ntype in subgraph_ids:
            raise WorkflowError(f"node {node_id} is a subgraph instance; subgraphs are not supported")
        node_def = object_info.get(ntype)
        if node_def is None:
            raise WorkflowError(f"node {node_id}: type {ntype!r} is not in object_info (pack not loaded?)")

        inputs: dict[str, Any] = _widget_values(node, node_def)
        for slot in node.get("inputs") or []:
            name = (slot.get("widget") or {}).get("name") or slot.get("name")
            link_id = slot.get("link")
            if link_id is None:
                continue
            found = resolve(link_id, slot.get("type"))
            if found is None:
                if not slot.get("widget"):
                    inputs.pop(name, None)
                continue
            kind, value = found
            if kind == "link":
                inputs[name] = [value[0], value[1]]
            elif slot.get("widget"):
                inputs[name] = value
        api[str(node_id)] = {
            "inputs": inputs,
            "class_type": ntype,
            "_meta": {"title": node.get("title") or node_def.get("display_name") or ntype},
        }

    # Inputs fed by nodes that are not part of the prompt (muted, missing) are removed.
    for entry in api.values():
        for name in [n for n, v in entry["inputs"].items() if _is_link(v) and v[0] not in api]:
            del entry["inputs"][name]
    return api


def _id_order(node_id: Any) -> tuple[int, int, str]:
    text = str(node_id)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def _is_link(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def shrink(api: dict, max_side: int = 64, max_steps: int = 4) -> dict:
    """Makes an API prompt cheap to run, in place: latent sides capped at max_side (aspect kept,
    multiples of 8) and sampler steps at max_steps (advanced samplers with a step window are left
    alone). For tests and stand-in demo runs, where the picture itself carries no meaning."""
    for node in api.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind.startswith("Empty") and "Latent" in kind:
            w, h = inputs.get("width"), inputs.get("height")
            if isinstance(w, int) and isinstance(h, int) and max(w, h) > max_side:
                scale = max_side / max(w, h)
                inputs["width"] = max(8, int(w * scale) // 8 * 8)
                inputs["height"] = max(8, int(h * scale) // 8 * 8)
        steps = inputs.get("steps")
        if isinstance(steps, int) and not isinstance(steps, bool) and steps > max_steps:
            end = inputs.get("end_at_step")
            if isinstance(end, int) and end < 10000:
                continue
            inputs["steps"] = max_steps
    return api
