"""The soak in short (scripts/soak.py), through a real server of its own: memory flat after warm-up
with saved embeds and with real CLIP encoding (Encode Image on the ViT-H stand-in), exactly the
adapter file in use alive after every prompt, a file read only when it was not alive -- and read
again, once, when it changes on disk; adapter files cycled through the server are freed and the
memory comes back. Also checks the pack's read-only stats route, GET /ipadapter_exact/stats.

Own server (not the shared one): the live-copy and read counts must start from zero, and the RSS
must be this pack's alone.

How ComfyUI 0.3.75 keeps node outputs (the default "classic" cache, execution.py / caching.py):
outputs are keyed by the node's input signature; when a prompt starts, every cached output
whose key the new prompt does not use is dropped (`set_prompt` + `clean_unused`). So the outputs
of the last prompt stay alive until the next prompt starts, a prompt with the same loader and the
same file keeps them (the loader does not run again), and a prompt without them -- or with
another file in the same loader -- lets them go. With the weak adapter cache that means: after a
prompt, exactly its own adapter files are alive; after a graph without adapters, none.
(`--cache-lru N` / `--cache-ram` keep more outputs, and with them more adapter files.)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time

import pytest

from tests.conftest import ARTIFACTS, REPO
from tests.harness.comfy_host import ComfyServer

pytestmark = pytest.mark.server

PROMPTS, WARMUP = 12, 5
# Real CLIP encoding: one or two ViT-H passes per prompt (the plus/full-face negative is a second
# pass), a few seconds each on a CPU. The warm-up covers all three adapters and the encoder's load.
ENCODE_PROMPTS, ENCODE_WARMUP = 10, 4
# Measured on 2 shared CPU cores, stand-in models: with embeds, RSS about 1340-1395 MiB after
# warm-up (it steps with the size of the one adapter file alive: plus 72 MiB, the others about 21),
# drift against the warm-up prompt with the same file at most 0.2 % (50 prompts); with CLIP
# encoding about 2575 MiB (the ViT-H stand-in is loaded), drift at most 0.8 %. The bound is the
# issue's 5 %, not loosened. Cycling 10 adapter files: RSS back to +0 MiB of its level before.
RSS_TOLERANCE_PCT = 5.0
CYCLE_FILES = 10


def _load_soak():
    spec = importlib.util.spec_from_file_location("ipadapter_soak", REPO / "scripts" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


soak = _load_soak()


@pytest.fixture(scope="module")
def soak_server(models, tmp_path_factory):
    models.ensure(*soak.needed_models(encode=True))
    base = tmp_path_factory.mktemp("soak") / "comfy"
    server = ComfyServer(models_root=[models.root], base_dir=base, save_log_to=ARTIFACTS / "soak-comfyui.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def check_soak(result) -> None:
    summary = result.summary()
    print(summary)  # shown with -s / in the report
    problems = result.problems(RSS_TOLERANCE_PCT)
    assert not problems, summary + "\n" + "\n".join(problems)
    # the files took turns: each prompt's own file alive, never two at once
    assert result.distinct_files == len(soak.ADAPTERS)
    assert max(s["live_adapters"] for s in result.stats) == 1


def test_stats_route_answers_before_any_adapter(soak_server):
    stats = soak.adapter_stats(soak_server)
    assert stats == {"files_read": 0, "live_adapters": 0, "cached_files": []}


def test_short_soak_keeps_memory_and_copies_flat(soak_server):
    check_soak(soak.run_soak(soak_server, PROMPTS, WARMUP))


def test_short_soak_with_clip_encoding(soak_server):
    t0 = time.monotonic()
    result = soak.run_soak(soak_server, ENCODE_PROMPTS, ENCODE_WARMUP, encode=True)
    check_soak(result)
    print(f"encode soak: {time.monotonic() - t0:.0f} s for {ENCODE_PROMPTS} prompts")


def test_changed_file_is_read_again_once(soak_server, models):
    folder = soak_server.base / "models" / "ipadapter"
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / "soak_copy.safetensors"
    shutil.copyfile(models["ipadapter/sd15_tiny_base.safetensors"], copy)

    def run(seed):
        prompt = soak.soak_prompt(0, encode=False)
        prompt["2"]["inputs"]["ipadapter_file"] = copy.name
        prompt["10"]["inputs"]["seed"] = seed
        soak_server.run(prompt, timeout=300)
        return soak.adapter_stats(soak_server)

    before = soak.adapter_stats(soak_server)
    first = run(1)
    assert first["files_read"] == before["files_read"] + 1
    assert run(2)["files_read"] == first["files_read"]  # unchanged on disk: not read again
    stat = copy.stat()
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = run(3)
    assert changed["files_read"] == first["files_read"] + 1
    # the old weights of the file were let go: one live copy, of this file
    assert changed["live_adapters"] == first["live_adapters"] == 1
    assert changed["cached_files"] == [copy.name]


def test_cycled_adapter_files_are_freed_and_memory_returns(soak_server, models):
    """Ten copies of the plus stand-in (75 MB each) under ten names, each run once, then a graph
    without any adapter: no adapter stays alive, and the RSS comes back to within one file's size
    of its level before cycling (a cache that kept every file would hold ten: +750 MB)."""
    source = models[soak.CYCLE_SOURCE]
    result = soak.cycle_adapters(soak_server, source, CYCLE_FILES)
    print(result.summary())
    names = [f"soak_cycle_{i:02d}.safetensors" for i in range(CYCLE_FILES)]
    assert result.stats_before["live_adapters"] == 0 and result.stats_before["cached_files"] == []
    # during the cycle only the file of the last run was alive, each file read once
    assert [s["cached_files"] for s in result.stats_cycle] == [[name] for name in names]
    assert [s["live_adapters"] for s in result.stats_cycle] == [1] * CYCLE_FILES
    assert result.stats_after["files_read"] == result.stats_before["files_read"] + CYCLE_FILES
    # the graph without adapters evicted the last adapter run's outputs: nothing alive
    assert result.stats_after["live_adapters"] == 0 and result.stats_after["cached_files"] == []
    assert result.returned_mib <= result.file_mib, result.summary()
