"""A real, headless ComfyUI server with this pack installed, for end-to-end tests and the demo.

    with ComfyServer(models_root=MODELS_ROOT) as server:
        entry = server.run(api_prompt)
        images = server.output_images(entry)

The server runs in its own process (``launch.py`` -> ComfyUI ``main.py --cpu``) on a free
loopback port, with a throw-away base directory whose ``custom_nodes/`` holds a symlink to
this checkout and whose model folders come from ``models_root`` through an
``--extra-model-paths-config`` file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "ComfyUI-IPAdapter-Exact"
COMFYUI_VERSION = "0.3.75"
LAUNCH = Path(__file__).resolve().parent / "launch.py"
MODEL_FOLDERS = ("checkpoints", "clip_vision", "ipadapter", "controlnet", "loras", "insightface")

BOOT_TIMEOUT_S = 180.0
RUN_TIMEOUT_S = 600.0


class ComfyError(RuntimeError):
    """Base class of the errors raised by the test host."""


class ServerDied(ComfyError):
    pass


class PromptRejected(ComfyError):
    """POST /prompt answered with an error (HTTP 400): ``body`` is the server's JSON."""

    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        error = body.get("error", {}) if isinstance(body, dict) else {}
        node_errors = body.get("node_errors", {}) if isinstance(body, dict) else {}
        super().__init__(f"prompt rejected (HTTP {status}): {error.get('message', body)}"
                         + (f"; node errors: {json.dumps(node_errors)[:2000]}" if node_errors else ""))

    @property
    def error(self) -> dict:
        return self.body.get("error", {}) if isinstance(self.body, dict) else {}

    @property
    def node_errors(self) -> dict:
        return self.body.get("node_errors", {}) if isinstance(self.body, dict) else {}


class PromptFailed(ComfyError):
    """The prompt ran and ended with status 'error': ``entry`` is its /history entry."""

    def __init__(self, prompt_id: str, entry: dict):
        self.prompt_id = prompt_id
        self.entry = entry
        self.messages = error_messages(entry)
        super().__init__(f"prompt {prompt_id} failed: " + " | ".join(self.messages))


def error_messages(entry: dict) -> list[str]:
    """The readable error lines of a /history entry (execution_error / execution_interrupted)."""
    out = []
    for event, data in (entry.get("status") or {}).get("messages") or []:
        if event == "execution_error":
            tb = "".join(data.get("traceback") or [])
            out.append(f"{data.get('node_type')} (node {data.get('node_id')}): "
                       f"{data.get('exception_type')}: {data.get('exception_message')}\n{tb}")
        elif event == "execution_interrupted":
            out.append(f"interrupted at node {data.get('node_id')}")
    return out or [json.dumps(entry.get("status"))]


def comfy_dir() -> Path:
    """The ComfyUI checkout to run: $COMFYUI_PATH, else the copy that scripts/bootstrap.sh fetches."""
    env = os.environ.get("COMFYUI_PATH")
    cache = Path(os.environ.get("IPADAPTER_CACHE") or REPO / ".cache")  # where scripts/bootstrap.sh puts it
    path = Path(env).expanduser() if env else cache / f"comfyui-{COMFYUI_VERSION}"
    if not (path / "main.py").is_file():
        how = ("COMFYUI_PATH must point to a ComfyUI checkout (the folder that holds main.py)" if env else
               "run `make setup` (scripts/bootstrap.sh) to fetch ComfyUI, "
               "or set COMFYUI_PATH to your own ComfyUI checkout")
        raise FileNotFoundError(f"no ComfyUI at {path}: {how}")
    return path.resolve()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_extra_model_paths(path: Path, models_roots, folders=MODEL_FOLDERS) -> Path:
    """An extra_model_paths.yaml mapping each model folder to <root>/<folder>, for each root in order."""
    roots = [models_roots] if isinstance(models_roots, (str, Path)) else list(models_roots)
    lines = []
    for i, root in enumerate(roots):
        lines += [f"ipadapter_exact_models_{i}:", f"  base_path: {json.dumps(str(Path(root).resolve()))}"]
        lines += [f"  {name}: {name}" for name in folders]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class ComfyServer:
    """A ComfyUI server process with the pack installed (use as a context manager).

    models_root: a folder holding checkpoints/, clip_vision/, ipadapter/, controlnet/, loras/, insightface/
                 (or a list of such folders, searched in order)
    base_dir:    ComfyUI --base-directory (default: a new temporary folder, removed by stop()
                 unless keep_base=True)
    extra_args:  more main.py arguments
    save_log_to: where stop() copies the server log (it lives in base_dir otherwise)
    """

    def __init__(self, models_root: Path | str | list[Path | str] | None = None, *, comfy: Path | str | None = None,
                 base_dir: Path | str | None = None, keep_base: bool = False, port: int | None = None,
                 python: str | None = None, extra_args: list[str] | tuple[str, ...] = (),
                 boot_timeout: float = BOOT_TIMEOUT_S, install_pack: bool = True,
                 save_log_to: Path | str | None = None):
        self.comfy = Path(comfy).resolve() if comfy else comfy_dir()
        if models_root is None:
            self.models_roots: list[Path] = []
        elif isinstance(models_root, (str, Path)):
            self.models_roots = [Path(models_root).resolve()]
        else:
            self.models_roots = [Path(r).resolve() for r in models_root]
        self._own_base = base_dir is None
        self.base = Path(base_dir).resolve() if base_dir else Path(tempfile.mkdtemp(prefix="comfy-ipadapter-"))
        self.keep_base = keep_base
        self.port = port or free_port()
        self.python = python or os.environ.get("COMFY_PYTHON") or sys.executable
        self.extra_args = list(extra_args)
        self.boot_timeout = boot_timeout
        self.install_pack = install_pack
        self.save_log_to = Path(save_log_to) if save_log_to else None
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "comfyui.log"
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self._object_info: dict | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> ComfyServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _prepare_base(self) -> list[str]:
        for sub in ("custom_nodes", "input", "output", "temp", "user/default"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        settings = self.base / "user" / "default" / "comfy.settings.json"
        if not settings.exists():
            settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}), encoding="utf-8")
        if self.install_pack:
            link = self.base / "custom_nodes" / PACK_DIR_NAME
            if link.is_symlink() or link.exists():
                if link.resolve() != REPO:
                    raise ComfyError(f"{link} exists and is not a link to {REPO}")
            else:
                link.symlink_to(REPO, target_is_directory=True)
        args = []
        if self.models_roots:
            yaml_path = write_extra_model_paths(self.base / "extra_model_paths.yaml", self.models_roots)
            args = ["--extra-model-paths-config", str(yaml_path)]
        return args

    def command(self) -> list[str]:
        return [self.python, str(LAUNCH), str(self.comfy), "--cpu", "--listen", "127.0.0.1",
                "--port", str(self.port), "--base-directory", str(self.base), "--disable-auto-launch",
                "--database-url", "sqlite:///:memory:"]

    def start(self, port_attempts: int = 3) -> ComfyServer:
        """Boots the server and waits until it answers; retries on a new port if the port was taken."""
        for attempt in range(port_attempts):
            try:
                return self._start_once()
            except ServerDied as exc:
                if "address already in use" not in str(exc).lower() or attempt == port_attempts - 1:
                    self.stop()
                    raise
                log.warning("port %d was taken; retrying on another one", self.port)
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
        raise AssertionError("unreachable")

    def _start_once(self) -> ComfyServer:
        if self.proc is not None:
            raise ComfyError("server already started")
        cmd = self.command() + self._prepare_base() + self.extra_args
        env = dict(os.environ)
        env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1",
                   IPADAPTER_HARNESS_PARENT_PID=str(os.getpid()))
        log.info("starting ComfyUI %s on port %d (base %s)", self.comfy, self.port, self.base)
        log.debug("command: %s", " ".join(cmd))
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log_file, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except ServerDied:
            self._close_process()
            raise
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        t0 = time.monotonic()
        deadline = t0 + self.boot_timeout
        while True:
            if not self.alive():
                raise ServerDied(f"ComfyUI exited with code {self.proc.returncode} while booting\n"
                                 + self.log_tail())
            try:
                stats = self._get_json("/system_stats", timeout=5)
            except (urllib.error.URLError, OSError, ValueError):
                stats = None
            # Make sure the answer comes from our process, not from an older server on this port.
            if stats is not None and str(self.base) in " ".join(stats.get("system", {}).get("argv", [])):
                if self.alive():
                    log.info("ComfyUI ready on %s after %.1f s", self.url, time.monotonic() - t0)
                    return
            if time.monotonic() > deadline:
                raise ComfyError(f"ComfyUI did not answer on {self.url} within {self.boot_timeout:.0f} s\n"
                                 + self.log_tail())
            time.sleep(0.25)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _close_process(self) -> None:
        """Forgets a dead server process (keeps the base folder, so start() may try again)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=20)
        self.proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                log.warning("ComfyUI did not stop in 20 s; killing it")
                self.proc.kill()
                self.proc.wait(timeout=20)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.save_log_to is not None and self.log_path.exists():
            self.save_log_to.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.log_path, self.save_log_to)
        if self._own_base and not self.keep_base and self.base.exists():
            shutil.rmtree(self.base, ignore_errors=True)

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    # -- HTTP ----------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def _get_json(self, path: str, timeout: float = 60) -> Any:
        return self._request("GET", path, timeout=timeout)

    def object_info(self, refresh: bool = False) -> dict:
        if self._object_info is None or refresh:
            self._object_info = self._get_json("/object_info", timeout=120)
        return self._object_info

    def system_stats(self) -> dict:
        return self._get_json("/system_stats")

    def queue(self, api_prompt: dict) -> str:
        """POST /prompt; returns the prompt id, raises PromptRejected on a validation error."""
        try:
            answer = self._request("POST", "/prompt", {"prompt": api_prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = {"error": {"message": raw.decode("utf-8", "replace")}}
            raise PromptRejected(exc.code, body) from None
        if answer.get("node_errors"):
            log.warning("prompt %s queued with node errors: %s", answer.get("prompt_id"), answer["node_errors"])
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = RUN_TIMEOUT_S) -> dict:
        """Polls /history until the prompt finished; returns its entry, raises PromptFailed on error."""
        deadline = time.monotonic() + timeout
        quoted = urllib.parse.quote(prompt_id)
        delay = 0.1
        while True:
            history = self._get_json(f"/history/{quoted}")
            entry = (history or {}).get(prompt_id)
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("completed") or status.get("status_str") in ("success", "error"):
                    if status.get("status_str") == "error":
                        raise PromptFailed(prompt_id, entry)
                    return entry
            if not self.alive():
                raise ServerDied(f"ComfyUI died while running prompt {prompt_id}\n" + self.log_tail())
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s\n" + self.log_tail())
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    def run(self, api_prompt: dict, timeout: float = RUN_TIMEOUT_S) -> dict:
        return self.wait(self.queue(api_prompt), timeout=timeout)

    def output_images(self, entry: dict) -> list[Path]:
        """The image files that a finished prompt wrote (SaveImage: output/, PreviewImage: temp/)."""
        roots = {"output": self.base / "output", "temp": self.base / "temp", "input": self.base / "input"}
        paths = []
        for node_out in (entry.get("outputs") or {}).values():
            for image in node_out.get("images") or []:
                root = roots.get(image.get("type", "output"), roots["output"])
                paths.append(root / image.get("subfolder", "") / image["filename"])
        return paths

    # -- logs ----------------------------------------------------------------------------------
    def log_text(self) -> str:
        if self._log_file is not None:
            self._log_file.flush()
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.log_path} ---\n" + "\n".join(tail)
