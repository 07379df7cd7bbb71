"""The real ComfyUI frontend (served by the test server) in headless Chromium, driven by Playwright.

For every workflow in workflows/: load it into the page with ``app.loadGraphData`` as a user's
drag and drop does, check that every node type is registered (no "missing nodes"), that the page
raised no error, shrink the run through the graph's own widgets (KSampler steps <= 4, latent
width/height <= 64), queue it with ``app.queuePrompt`` -- the frontend's own graph-to-prompt
conversion -- and wait on the server's /history until it finished successfully.

Chromium is Debian's /usr/bin/chromium (scripts/bootstrap.sh installs it; set
IPADAPTER_CHROMIUM for another one); Playwright never downloads a browser here. A screenshot
of the loaded basic_image_prompt graph is kept in .test-artifacts/.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from tests.harness import standins
from tests.harness.comfy_host import PACK_DIR_NAME, REPO

pytestmark = pytest.mark.server

log = logging.getLogger(__name__)

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
ARTIFACTS = REPO / ".test-artifacts"
CHROMIUM = os.environ.get("IPADAPTER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_SIDE, MAX_STEPS = 64, 4
RUN_TIMEOUT_S = 300
SCREENSHOT_OF = "basic_image_prompt"
TIMES: dict[str, float] = {}

SHRINK_JS = """([maxSide, maxSteps]) => {
    const changed = [];
    for (const node of app.graph._nodes) {
        const w = (name) => (node.widgets || []).find((x) => x.name === name);
        const steps = w("steps");
        if (steps && typeof steps.value === "number" && steps.value > maxSteps && !w("end_at_step")) {
            steps.value = maxSteps; changed.push(`${node.id}.steps`);
        }
        if (node.type.startsWith("Empty") && node.type.includes("Latent")) {
            const width = w("width"), height = w("height");
            if (width && height && Math.max(width.value, height.value) > maxSide) {
                const scale = maxSide / Math.max(width.value, height.value);
                width.value = Math.max(8, Math.floor(width.value * scale / 8) * 8);
                height.value = Math.max(8, Math.floor(height.value * scale / 8) * 8);
                changed.push(`${node.id}.size`);
            }
        }
    }
    app.graph.setDirtyCanvas(true, true);
    return changed;
}"""

CHECK_JS = """(types) => {
    const registered = LiteGraph.registered_node_types;
    return {
        unregistered: types.filter((t) => !registered[t]),
        graphNodes: app.graph._nodes.length,
        graphUnregistered: app.graph._nodes.filter((n) => !registered[n.type]).map((n) => n.type),
        missingFlags: app.graph._nodes.filter((n) => n.has_errors || n.constructor?.nodeData === undefined
                                                   && !["Note", "MarkdownNote", "Reroute", "PrimitiveNode"]
                                                        .includes(n.type)).map((n) => n.type),
    };
}"""


@pytest.fixture(scope="module")
def browser_page(comfy_server):
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: run `make setup` (scripts/bootstrap.sh installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    for path in WORKFLOWS:  # the images the LoadImage nodes name, before the page lists input/
        standins.stage_inputs(standins.load_workflow(path), comfy_server.input_dir, max_side=MAX_SIDE)
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(comfy_server.url, wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_function(
                "() => window.app && window.app.graph && window.LiteGraph"
                " && Object.keys(LiteGraph.registered_node_types).length > 100", timeout=120_000)
            yield page, errors
        finally:
            browser.close()
            ARTIFACTS.mkdir(exist_ok=True)
            (ARTIFACTS / "browser-times.json").write_text(json.dumps(TIMES, indent=1) + "\n")


def history(server) -> dict:
    return server._get_json("/history") or {}


def wait_for_new_prompt(server, known: set[str], timeout: float) -> tuple[str, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for prompt_id, entry in history(server).items():
            if prompt_id in known:
                continue
            status = entry.get("status") or {}
            if status.get("completed") or status.get("status_str") in ("success", "error"):
                return prompt_id, entry
        assert server.alive(), server.log_tail()
        time.sleep(0.5)
    raise TimeoutError(f"no finished prompt within {timeout:.0f} s\n{server.log_tail()}")


def test_pack_nodes_are_registered_in_the_frontend(browser_page, comfy_server):
    page, errors = browser_page
    pack = [name for name, node in comfy_server.object_info().items()
            if PACK_DIR_NAME in str(node.get("python_module", ""))]
    info = page.evaluate("""(ids) => ids.map((id) => {
        const t = LiteGraph.registered_node_types[id];
        return [id, !!t, t?.category ?? t?.nodeData?.category ?? null];
    })""", pack)
    assert pack and all(ok for _, ok, _ in info), info
    assert all(str(cat).startswith("IP-Adapter Exact") for _, _, cat in info), info
    assert not errors, errors


@pytest.mark.parametrize("workflow_path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_loads_and_runs_in_the_frontend(browser_page, comfy_server, workflow_path):
    page, errors = browser_page
    errors.clear()
    workflow = standins.load_workflow(workflow_path)
    types = sorted({n["type"] for n in workflow["nodes"]})
    start = time.monotonic()
    page.evaluate("async (wf) => { await app.loadGraphData(wf); }", workflow)
    page.wait_for_timeout(300)
    check = page.evaluate(CHECK_JS, types)
    assert not check["unregistered"], f"node types not registered in the frontend: {check['unregistered']}"
    assert not check["graphUnregistered"], check
    assert check["graphNodes"] == len(workflow["nodes"]), check
    dialogs = page.locator(".p-dialog, [role=dialog]").filter(has_text="issing")
    assert dialogs.count() == 0, dialogs.first.inner_text()
    if workflow_path.stem == SCREENSHOT_OF:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"browser-{SCREENSHOT_OF}.png"))

    changed = page.evaluate(SHRINK_JS, [MAX_SIDE, MAX_STEPS])
    assert changed, "nothing to shrink: no KSampler steps / latent size widgets found"
    known = set(history(comfy_server))
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    prompt_id, entry = wait_for_new_prompt(comfy_server, known, RUN_TIMEOUT_S)
    TIMES[workflow_path.stem] = round(time.monotonic() - start, 2)
    log.info("%s: loaded, queued from the frontend and finished in %.1f s", workflow_path.stem,
             TIMES[workflow_path.stem])
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    assert comfy_server.output_images(entry), entry["outputs"]
    # The frontend converted the graph itself: what ran is the shrunk graph.
    prompt = entry["prompt"][2]
    steps = [n["inputs"]["steps"] for n in prompt.values() if "steps" in n["inputs"]]
    assert steps and max(steps) <= MAX_STEPS, steps
    assert not errors, f"page errors: {errors}"


def test_workflows_are_offered_as_templates(comfy_server):
    """ComfyUI serves a custom node's workflows/ folder to the frontend's template browser."""
    templates = comfy_server._get_json("/workflow_templates")
    assert PACK_DIR_NAME in templates, templates
    assert sorted(templates[PACK_DIR_NAME]) == sorted(p.stem for p in WORKFLOWS)
    served = comfy_server._get_json(f"/api/workflow_templates/{PACK_DIR_NAME}/{SCREENSHOT_OF}.json")
    assert served == standins.load_workflow(REPO / "workflows" / f"{SCREENSHOT_OF}.json")
