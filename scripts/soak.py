#!/usr/bin/env python3
"""Soak test: many prompts through one real ComfyUI server; memory must stay flat.

    .venv/bin/python scripts/soak.py [--prompts 50] [--warmup 5] [--tolerance 5]
                                     [--mode both|embeds|encode] [--cycle 10]

Runs N prompts that alternate the SD1.5 stand-in adapters (base, plus, full-face), their
encodings (several "pictures" per adapter kind), weights, weight types and start/end ranges, on
the generated random-weight models (tests/fixtures/generate.py), in two forms, each on a fresh
server of its own:

* embeds: the encodings come from saved embeds files (IP-Adapter Load Embeds);
* encode: real CLIP encoding, IP-Adapter Encode Image on the ViT-H stand-in (fp16 ViT-H on a
  CPU: seconds per picture; the plus and full-face negatives are a second encoder pass).

After a warm-up (which must run every adapter file) the server process's RSS (with its
children) must stay within --tolerance percent of its value after the last warm-up prompt that
used the same adapter file (only the file in use is alive, so the RSS steps with its size).
GET /ipadapter_exact/stats must show, after every prompt, exactly the adapter file that prompt
used alive (one weight set: the cache is weak, and ComfyUI keeps the outputs of the last prompt
only), and a file read from disk exactly when it was not alive at the prompt's start.

--cycle N (default 10, 0 to skip) then runs N copies of one adapter file under N names, each
once, then a graph without any adapter, and reports the RSS before and after and the live
adapter count (must be 0: nothing keeps a file's weights once no output uses them).
Prints the figures; exits 1 when a bound is broken.
"""

from __future__ import annotations

import argparse
import json
import logging
import runpy
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if "tests" not in sys.modules or "ipadapter_pack" not in sys.modules:  # not under pytest: the shared set-up
    runpy.run_path(str(REPO / "tests" / "harness" / "imports.py"))["register_packages"]()

from tests.harness.comfy_host import ComfyServer  # noqa: E402

log = logging.getLogger("soak")

CHECKPOINT = "checkpoints/sd15_tiny.safetensors"
ENCODER = "clip_vision/vit_h.safetensors"
# adapter file -> the encodings it takes: (output, shape of one reference)
ADAPTERS = {
    "ipadapter/sd15_tiny_base.safetensors": ("image_embeds", (1, 1024)),
    "ipadapter/sd15_tiny_plus.safetensors": ("penultimate", (1, 257, 1280)),
    "ipadapter/sd15_tiny_fullface.safetensors": ("penultimate", (1, 257, 1280)),
}
CYCLE_SOURCE = "ipadapter/sd15_tiny_plus.safetensors"  # the largest SD1.5 stand-in adapter (75 MB)
PICTURES = 3  # encodings (or pictures) per adapter kind
WEIGHT_TYPES = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")
CROPS = ("center", "pad", "squash")
EMBEDS_FORMAT = "ipadapter-exact-embeds/1"
MODES = ("embeds", "encode")


@dataclass
class SoakResult:
    prompts: int
    warmup: int
    encode: bool = False
    seconds: float = 0.0
    rss_mib: list[float] = field(default_factory=list)  # after each prompt
    stats: list[dict] = field(default_factory=list)  # /ipadapter_exact/stats after each prompt
    adapters: list[str] = field(default_factory=list)  # the adapter file each prompt used
    stats_before: dict = field(default_factory=lambda: {"files_read": 0, "live_adapters": 0, "cached_files": []})

    @property
    def mode(self) -> str:
        return "encode" if self.encode else "embeds"

    @property
    def distinct_files(self) -> int:
        return len(set(self.adapters))

    @property
    def baseline_mib(self) -> float:
        return self.rss_mib[self.warmup - 1]

    def baseline_for(self, i: int) -> float:
        """RSS after the last warm-up prompt that used prompt i's adapter file.

        Only the file in use is alive, so the RSS steps with the file's size (plus 72 MiB, base
        and full-face about 21 MiB); each prompt is compared with a warm-up prompt that held the
        same file, and the steps do not count as drift. Falls back to the end of the warm-up."""
        same = [j for j in range(self.warmup) if self.adapters[j] == self.adapters[i]]
        return self.rss_mib[same[-1]] if same else self.baseline_mib

    def drift_pct(self, i: int) -> float:
        return (self.rss_mib[i] - self.baseline_for(i)) / self.baseline_for(i) * 100

    @property
    def max_drift_pct(self) -> float:
        return max((abs(self.drift_pct(i)) for i in range(self.warmup, len(self.rss_mib))), default=0.0)

    @property
    def final_drift_pct(self) -> float:
        return self.drift_pct(len(self.rss_mib) - 1)

    def expected_reads(self) -> list[bool]:
        """Per prompt: must its adapter file be read from disk? Exactly when it was not alive when
        the prompt started (the cache hands out a live copy, and keeps nothing else)."""
        out = []
        for i, name in enumerate(self.adapters):
            before = self.stats[i - 1] if i else self.stats_before
            out.append(name not in before["cached_files"])
        return out

    def problems(self, tolerance_pct: float) -> list[str]:
        out = []
        if self.max_drift_pct > tolerance_pct:
            out.append(f"RSS drifted {self.max_drift_pct:.1f} % from its level after warm-up with the same adapter "
                       f"file (bound {tolerance_pct} %)")
        reads = self.stats_before["files_read"]
        per_prompt = zip(self.stats, self.adapters, self.expected_reads(), strict=True)
        for i, (stats, name, must_read) in enumerate(per_prompt):
            if stats["live_adapters"] != 1 or stats["cached_files"] != [name]:
                out.append(f"after prompt {i + 1} ({name}): {stats['live_adapters']} live adapter weight sets, "
                           f"cached {stats['cached_files']}; expected that one file's weights only")
            if stats["files_read"] - reads != int(must_read):
                out.append(f"prompt {i + 1} ({name}): {stats['files_read'] - reads} file reads, expected "
                           f"{int(must_read)} ({'not ' if not must_read else ''}alive at the prompt's start)")
            reads = stats["files_read"]
        return out

    def summary(self) -> str:
        live = sorted({s["live_adapters"] for s in self.stats})
        reads = self.stats[-1]["files_read"] - self.stats_before["files_read"]
        return (f"{self.mode}: {self.prompts} prompts in {self.seconds:.0f} s; RSS after {self.warmup} warm-up "
                f"prompts {self.baseline_mib:.0f} MiB, min/max after {min(self.rss_mib[self.warmup:]):.0f}/"
                f"{max(self.rss_mib[self.warmup:]):.0f} MiB, max drift {self.max_drift_pct:.2f} % (against the "
                f"warm-up prompt with the same adapter file), final {self.final_drift_pct:+.2f} %; "
                f"live adapter copies after each prompt {live} "
                f"({self.distinct_files} files in turn); files read {reads}")


@dataclass
class CycleResult:
    """RSS and stats around cycling N adapter files through the server, then a plain graph."""

    files: int
    rss_before_mib: float = 0.0
    rss_after_mib: float = 0.0
    rss_cycle_mib: list[float] = field(default_factory=list)  # after each adapter run
    stats_cycle: list[dict] = field(default_factory=list)
    stats_before: dict = field(default_factory=dict)
    stats_after: dict = field(default_factory=dict)
    file_mib: float = 0.0  # size of one adapter file
    seconds: float = 0.0

    @property
    def returned_mib(self) -> float:
        """RSS after the plain graph minus RSS before cycling (positive: not all returned)."""
        return self.rss_after_mib - self.rss_before_mib

    def summary(self) -> str:
        return (f"cycle: {self.files} adapter files of {self.file_mib:.0f} MiB each, one run each, in "
                f"{self.seconds:.0f} s; RSS before {self.rss_before_mib:.0f} MiB, during "
                f"{min(self.rss_cycle_mib):.0f}-{max(self.rss_cycle_mib):.0f} MiB, after a graph without "
                f"adapters {self.rss_after_mib:.0f} MiB ({self.returned_mib:+.0f} MiB); live adapters during "
                f"{sorted({s['live_adapters'] for s in self.stats_cycle})}, after {self.stats_after['live_adapters']}"
                f" (cached {self.stats_after['cached_files']}); files read "
                f"{self.stats_after['files_read'] - self.stats_before['files_read']}")


def process_rss_mib(pid: int) -> float:
    import psutil

    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def adapter_stats(server: ComfyServer) -> dict:
    with urllib.request.urlopen(server.url + "/ipadapter_exact/stats", timeout=60) as resp:
        return json.loads(resp.read())


def embeds_name(adapter: str, picture: int) -> str:
    return f"soak_{Path(adapter).stem}_{picture}.safetensors"


def picture_name(picture: int) -> str:
    return f"soak_{picture}.png"


def stage_inputs(server: ComfyServer, encode: bool) -> None:
    """Encodings (embeds files) for every adapter kind, and pictures, in the server's folders."""
    import torch
    from safetensors.torch import save_file

    from tests.harness.hostile_corpus import write_png

    folder = server.output_dir / "ipadapter_embeds"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (adapter, (output, shape)) in enumerate(ADAPTERS.items()):
        for picture in range(PICTURES):
            gen = torch.Generator().manual_seed(1000 * i + picture)
            cond = torch.randn(*shape, generator=gen)
            metadata = {"format": EMBEDS_FORMAT, "output": output, "width": str(shape[-1]), "source": "soak"}
            save_file({"cond": cond, "uncond": torch.zeros(shape)}, str(folder / embeds_name(adapter, picture)),
                      metadata=metadata)
    if encode:
        for picture in range(PICTURES):
            write_png(server.input_dir / picture_name(picture), 48 + 16 * picture, 64, seed=picture)


def adapter_for(i: int) -> str:
    return list(ADAPTERS)[i % len(ADAPTERS)]


def soak_prompt(i: int, encode: bool) -> dict:
    adapter = adapter_for(i)
    picture = (i // len(ADAPTERS)) % PICTURES
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": Path(CHECKPOINT).name}},
        "2": {"class_type": "IPAdapterExactLoader", "inputs": {"ipadapter_file": Path(adapter).name}},
        "5": {"class_type": "IPAdapterExactLoadEmbeds", "inputs": {"embeds_file": embeds_name(adapter, picture)}},
        "6": {"class_type": "IPAdapterExactApply", "inputs": {
            "model": ["1", 0], "ipadapter": ["2", 0], "image_embeds": ["5", 0],
            "weight": round(0.3 + 0.1 * (i % 8), 2), "weight_type": WEIGHT_TYPES[i % len(WEIGHT_TYPES)],
            "start_at": 0.0 if i % 2 else 0.1, "end_at": 1.0 if i % 3 else 0.8, "combine_embeds": "concat"}},
        **plain_prompt(i, model=["6", 0]),
    }
    if encode:
        prompt["3"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": Path(ENCODER).name}}
        prompt["4"] = {"class_type": "LoadImage", "inputs": {"image": picture_name(picture)}}
        prompt["5"] = {"class_type": "IPAdapterExactEncode", "inputs": {
            "ipadapter": ["2", 0], "clip_vision": ["3", 0], "image": ["4", 0],
            "crop": CROPS[(i + i // len(ADAPTERS)) % len(CROPS)], "negative": "reference (zero)"}}
    return prompt


def plain_prompt(seed: int, model: list | None = None) -> dict:
    """The sampling half of the soak graph; alone (model from the checkpoint), a graph without adapters."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": Path(CHECKPOINT).name}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a lighthouse"}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "KSampler", "inputs": {
            "model": model or ["1", 0], "positive": ["7", 0], "negative": ["8", 0], "latent_image": ["9", 0],
            "seed": seed, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}},
    }


def run_soak(server: ComfyServer, prompts: int = 50, warmup: int = 5, encode: bool = False,
             progress=None) -> SoakResult:
    """Runs the prompts on a started server (models: the generated tree) and records RSS and stats."""
    if not len(ADAPTERS) <= warmup < prompts:
        raise ValueError(f"warm-up ({warmup}) must run every adapter file ({len(ADAPTERS)} prompts) and stay "
                         f"below the number of prompts ({prompts})")
    stage_inputs(server, encode)
    result = SoakResult(prompts, warmup, encode, stats_before=adapter_stats(server))
    t0 = time.monotonic()
    for i in range(prompts):
        server.run(soak_prompt(i, encode), timeout=600)
        result.adapters.append(Path(adapter_for(i)).name)
        result.rss_mib.append(process_rss_mib(server.proc.pid))
        result.stats.append(adapter_stats(server))
        if progress is not None:
            progress(i, result)
    result.seconds = time.monotonic() - t0
    return result


def cycle_adapters(server: ComfyServer, source: Path, files: int = 10, settle: int = 2) -> CycleResult:
    """Copies `source` (an SD1.5 adapter taking penultimate encodings) under `files` new names in
    the server's models/ipadapter, runs each once, then a graph without any adapter.

    RSS before: after `settle` runs of the plain graph (whatever earlier prompts left is gone);
    RSS after: after one more run of the plain graph, which evicts the last adapter run's outputs
    from ComfyUI's cache."""
    output, _shape = ADAPTERS[CYCLE_SOURCE]
    stage_inputs(server, encode=False)
    folder = server.base / "models" / "ipadapter"
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(files):
        name = f"soak_cycle_{i:02d}.safetensors"
        shutil.copyfile(source, folder / name)
        names.append(name)
    result = CycleResult(files, file_mib=source.stat().st_size / 2**20)
    for i in range(settle):
        server.run(plain_prompt(10_000 + i), timeout=600)
    result.rss_before_mib = process_rss_mib(server.proc.pid)
    result.stats_before = adapter_stats(server)
    t0 = time.monotonic()
    for i, name in enumerate(names):
        prompt = soak_prompt(1, encode=False)  # i = 1: the plus adapter's prompt
        assert ADAPTERS[adapter_for(1)][0] == output
        prompt["2"]["inputs"]["ipadapter_file"] = name
        prompt["10"]["inputs"]["seed"] = i
        server.run(prompt, timeout=600)
        result.rss_cycle_mib.append(process_rss_mib(server.proc.pid))
        result.stats_cycle.append(adapter_stats(server))
    server.run(plain_prompt(10_000 + settle), timeout=600)
    result.seconds = time.monotonic() - t0
    result.rss_after_mib = process_rss_mib(server.proc.pid)
    result.stats_after = adapter_stats(server)
    return result


def needed_models(encode: bool = False) -> list[str]:
    return [CHECKPOINT, *ADAPTERS] + ([ENCODER] if encode else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=5.0, help="allowed RSS drift after warm-up, percent")
    parser.add_argument("--mode", choices=("both", *MODES), default="both",
                        help="embeds files, real CLIP encoding (ViT-H stand-in, slow on a CPU), or both in turn")
    parser.add_argument("--encode", action="store_true", help="same as --mode encode (kept for old command lines)")
    parser.add_argument("--cycle", type=int, default=10, help="adapter files to cycle through (0: skip)")
    parser.add_argument("--cycle-bound", type=float, default=None,
                        help="allowed RSS growth after cycling, MiB (default: one adapter file's size)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="[soak] %(message)s")
    modes = ["encode"] if args.encode else list(MODES) if args.mode == "both" else [args.mode]

    from tests.fixtures import generate

    generate.ensure(*needed_models(encode="encode" in modes))
    failures: list[str] = []
    for mode in modes:
        with tempfile.TemporaryDirectory(prefix="ipadapter-soak-") as work:
            with ComfyServer(models_root=[generate.MODELS_ROOT], base_dir=Path(work) / "comfy",
                             save_log_to=REPO / ".test-artifacts" / f"soak-{mode}-comfyui.log") as server:
                def progress(i, result):
                    log.info("%s prompt %d/%d: RSS %.0f MiB, %s", result.mode, i + 1, args.prompts,
                             result.rss_mib[-1], result.stats[-1])

                result = run_soak(server, args.prompts, args.warmup, mode == "encode", progress)
                print(result.summary())
                print(f"{mode}: RSS MiB per prompt: " + " ".join(f"{r:.0f}" for r in result.rss_mib))
                failures += [f"{mode}: {p}" for p in result.problems(args.tolerance)]
                if args.cycle and mode == modes[-1]:
                    cycle = cycle_adapters(server, Path(generate.MODELS_ROOT) / CYCLE_SOURCE, args.cycle)
                    print(cycle.summary())
                    bound = cycle.file_mib if args.cycle_bound is None else args.cycle_bound
                    if cycle.stats_after["live_adapters"] != 0 or cycle.stats_after["cached_files"]:
                        failures.append(f"cycle: adapters still alive after a graph without adapters: "
                                        f"{cycle.stats_after}")
                    if cycle.returned_mib > bound:
                        failures.append(f"cycle: RSS {cycle.returned_mib:+.0f} MiB above its level before cycling "
                                        f"(bound {bound:.0f} MiB)")
    for failure in failures:
        print(f"FAIL: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
