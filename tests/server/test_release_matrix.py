"""The pack against other ComfyUI releases than the bundled 0.3.75 (tests/harness/comfyui_releases.txt).

For every release the table expects to **pass**:
* the SD1.5 parity tests and the layer-map checks (``releases.PARITY_TESTS``) run in a child
  pytest whose ComfyUI is that tree (``COMFYUI_PATH``); every one of them must pass. The parity
  UNet keeps SD1.5's topology at 320 channels per level there (see ``releases.PARITY_WIDTH_ENV``);
* a real server of that tree loads the pack without an import error and runs
  ``workflows/basic_image_prompt.json`` (64 px, 4 steps, stand-in weights) to a saved PNG.

For every release the table expects the pack to **refuse**: the server still starts, the pack's
"needs ComfyUI X or newer" line is in the start-up log (the refusal happens while ComfyUI loads the
custom nodes, never during sampling), X is the floor pyproject.toml declares, and none of the
pack's nodes is listed.

The trees are fetched on first use by scripts/comfyui_releases.sh into .cache/comfyui-<name>/.
Server logs, the child's output and its parity figures go to .test-artifacts/releases/<name>/,
wall times to .test-artifacts/releases/timings.json.

    .venv/bin/python -m pytest tests/server/test_release_matrix.py -q -ra        # the whole matrix
    .venv/bin/python -m pytest tests/server/test_release_matrix.py -k 0.8.0      # one release
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import resource
import time
from datetime import date

import pytest

from tests.harness import releases, standins
from tests.harness.comfy_host import PACK_DIR_NAME, REPO
from tests.harness.workflow import shrink, ui_to_api

log = logging.getLogger(__name__)

ROWS = releases.releases()
PASS = [row for row in ROWS if row.expect == "pass"]
REFUSE = [row for row in ROWS if row.expect == "refuse"]
ARTIFACTS = REPO / ".test-artifacts" / "releases"
MAX_SIDE, MAX_STEPS = 64, 4


def ids(rows):
    return [row.name for row in rows]


def tree_of(row):
    """The release's tree, or a one-line failure saying why it cannot be had (no traceback)."""
    try:
        return releases.ensure_tree(row)
    except releases.TreeUnavailable as exc:
        reason = str(exc)
    pytest.fail(reason, pytrace=False)  # outside the except: no chained traceback


class Timings:
    """Per release and step: wall seconds, and CPU seconds of the child processes (the child pytest, the
    server), which a busy shared machine inflates far less than wall time."""

    def __init__(self):
        self.table: dict[str, dict[str, dict[str, float]]] = {}

    @contextlib.contextmanager
    def measure(self, release: str, step: str):
        t0, before = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            yield
        finally:
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            self.table.setdefault(release, {})[step] = {"wall_s": round(time.monotonic() - t0, 1),
                                                        "cpu_s": round(cpu, 1)}

    def write(self) -> None:
        if not self.table:
            return
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "timings.json").write_text(json.dumps(self.table, indent=1, sort_keys=True), encoding="utf-8")
        for release, steps in sorted(self.table.items()):
            log.info("release %s: %s", release, ", ".join(
                f"{step} {t['wall_s']:.0f} s wall / {t['cpu_s']:.0f} s CPU" for step, t in steps.items()))


@pytest.fixture(scope="module")
def timings():
    """Timings of the matrix, written to .test-artifacts/releases/timings.json at the end."""
    table = Timings()
    yield table
    table.write()


def pack_nodes(object_info: dict) -> list[str]:
    return sorted(name for name, node in object_info.items() if PACK_DIR_NAME in str(node.get("python_module", "")))


def pack_import_failures(startup: str) -> list[str]:
    return [line for line in startup.splitlines()
            if ("IMPORT FAILED" in line or "Cannot import" in line) and PACK_DIR_NAME in line]


# --- the table itself -------------------------------------------------------------------------


def test_matrix_spans_a_year_of_older_releases_and_a_newer_one():
    bundled = date(*(int(p) for p in releases.BUNDLED_DATE.split("-")), 1)
    older = [row for row in ROWS if row.month < bundled]
    assert len(older) >= 2, f"the matrix needs at least two releases older than {releases.BUNDLED}: {ids(older)}"
    span = (bundled.year - min(r.month for r in older).year) * 12 + bundled.month - min(r.month for r in older).month
    assert span >= 12, f"the older releases reach back {span} months before {releases.BUNDLED}; at least 12 wanted"
    assert any(row.month > bundled for row in ROWS), f"no release newer than {releases.BUNDLED} in the matrix"
    assert PASS, "no release where the pack is expected to work"


# --- releases the pack supports -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("row", PASS, ids=ids(PASS))
def test_parity_on_release(row, timings):
    tree = tree_of(row)
    node_ids = releases.parity_tests(row.name)
    with timings.measure(row.name, "parity"):
        run = releases.run_pytest(tree, node_ids, artifacts=ARTIFACTS / row.name)
    # A node id ending in a test function (no [parameters]) stands for all of its cases: at least one.
    expected = {node_id.rsplit("::", 1)[1] for node_id in node_ids}
    exact = {name for name in expected if "[" in name}
    families = expected - exact
    ran = set(run.outcomes)
    missing = (exact - ran) | {name for name in families if not any(r.split("[")[0] == name for r in ran)}
    assert not missing and run.returncode == 0 and set(run.outcomes.values()) == {"passed"}, (
        f"{row}: the pack's parity tests on this ComfyUI did not all pass (missing: {sorted(missing)})\n"
        f"{run.report()}")


RUNS = [(row, name) for row in PASS for name in releases.server_workflows(row.name)]


@pytest.mark.server
@pytest.mark.parametrize("row,workflow_name", RUNS, ids=[f"{row.name}-{name}" for row, name in RUNS])
def test_workflow_on_release(row, workflow_name, models, tmp_path, timings):
    tree = tree_of(row)
    workflow_path = REPO / "workflows" / f"{workflow_name}.json"
    aliases = standins.build_models_tree(tmp_path / "models", [workflow_path], models.ensure)
    server = releases.ReleaseServer(tree, [models.root, aliases],
                                    save_log_to=ARTIFACTS / row.name / f"server-{workflow_name}.log")
    with timings.measure(row.name, f"server {workflow_name}"), server:  # starts it; stopped (log saved) after
        startup = releases.startup_log(server.log_text())
        assert not pack_import_failures(startup), "\n".join(pack_import_failures(startup)) + "\n" + server.log_tail()
        assert releases.refusal(startup) is None, f"{row}: the pack refused this ComfyUI\n{server.log_tail()}"
        object_info = server.object_info()
        listed = pack_nodes(object_info)
        loaded = re.findall(rf"{re.escape(PACK_DIR_NAME)}: loaded (\d+) nodes", startup)
        assert loaded and int(loaded[-1]) == len(listed) > 0, (
            f"{row}: log says {loaded} nodes, /object_info lists {listed}\n{server.log_tail()}")

        workflow = standins.load_workflow(workflow_path)
        standins.stage_inputs(workflow, server.input_dir, max_side=MAX_SIDE)
        api = shrink(ui_to_api(workflow, object_info), MAX_SIDE, MAX_STEPS)
        entry = server.run(api)
        assert entry["status"]["status_str"] == "success", entry["status"]
        saved = [p for p in server.output_images(entry) if p.parent.is_relative_to(server.output_dir)]
        assert saved, f"{row}: no saved image; outputs: {entry['outputs']}"
        from PIL import Image

        for path in saved:
            with Image.open(path) as image:
                assert image.format == "PNG" and max(image.size) <= MAX_SIDE, (path, image.format, image.size)


# --- releases the pack refuses ------------------------------------------------------------------


@pytest.mark.server
@pytest.mark.parametrize("row", REFUSE, ids=ids(REFUSE))
def test_refused_at_load_time(row, tmp_path, timings):
    tree = tree_of(row)
    server = releases.ReleaseServer(tree, save_log_to=ARTIFACTS / row.name / "server.log")
    with timings.measure(row.name, "server"), server:  # starts it; stopped (log saved) on the way out
        startup = releases.startup_log(server.log_text())
        line = releases.refusal(startup)
        assert line is not None, (
            f"{row}: the pack loaded on a ComfyUI it does not support; it must refuse at load time with "
            f"'{PACK_DIR_NAME} needs ... ComfyUI X.Y.Z or newer ...'\n{server.log_tail()}")
        floor = releases.declared_minimum()
        assert floor and re.search(rf"\b{re.escape(floor)}\b", line), (
            f"the refusal must name the oldest supported ComfyUI that pyproject.toml declares "
            f"(requires-comfyui: {floor}); it says: {line}")
        listed = pack_nodes(server.object_info())
        assert not listed, f"{row}: refused, yet ComfyUI lists the pack's nodes {listed}"
        assert server.alive(), "the refusal must leave ComfyUI running"


# --- the declared floor ---------------------------------------------------------------------


def test_declared_floor_agrees_with_the_matrix():
    """pyproject's requires-comfyui floor is stated in the README, and matches what the matrix expects."""
    floor = releases.declared_minimum()
    assert floor, ('pyproject.toml declares no oldest supported ComfyUI: add requires-comfyui = ">=X.Y.Z" under '
                   "[tool.comfy]")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert re.search(rf"ComfyUI[^\n]{{0,80}}\b{re.escape(floor)}\b", readme), (
        f"README.md does not name the oldest supported ComfyUI ({floor}, from pyproject.toml)")
    assert releases.version_key(releases.BUNDLED) >= releases.version_key(floor)
    for row in ROWS:
        version = releases.comfyui_version(tree_of(row))
        if version is not None:  # trees older than 2025 carry no comfyui_version.py
            supported = releases.version_key(version) >= releases.version_key(floor)
            assert supported == (row.expect == "pass"), (
                f"{row}: ComfyUI {version} vs the declared floor {floor}, but the table expects {row.expect}")


def test_pack_and_readme_know_the_newest_tested_release():
    """The newest release the matrix passes is the one the pack's load-time check names as tested, and the
    README's tested-on list names it."""
    versions = [row.name for row in PASS if re.fullmatch(r"\d+\.\d+\.\d+", row.name)]
    newest = max(versions, key=releases.version_key)
    seam = "\n".join(path.read_text(encoding="utf-8") for path in sorted((REPO / "nodes").rglob("*.py")))
    found = re.findall(r'^NEWEST_TESTED = "([^"]+)"', seam, re.M)
    assert found == [newest], f"the pack's NEWEST_TESTED is {found}, the matrix's newest passing release {newest}"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    tested = readme[readme.index("Tested on ComfyUI"):][:600]
    for version in versions:
        assert re.search(rf"\b{re.escape(version)}\b", tested), f"README's tested-on list lacks {version}: {tested}"
