#!/usr/bin/env python3
"""Soak test: many prompts through one real ComfyUI server; memory must stay flat.

    .venv/bin/python scripts/soak.py [--prompts 50] [--warmup 5] [--tolerance 5] [--encode]

Runs N prompts that alternate the SD1.5 stand-in adapters (base, plus, full-face), their
encodings (several "pictures" per adapter kind, saved as embeds files), weights, weight types
and start/end ranges, on the generated random-weight models (tests/fixtures/generate.py). After
a warm-up the server process's RSS (with its children) must stay within --tolerance percent of
its value at the end of the warm-up, and the pack's GET /ipadapter_exact/stats must show one
live adapter weight set per distinct file and every file read once. --encode encodes real
pictures with the CLIP vision model instead of loading embeds (fp16 ViT-H on a CPU: seconds
per picture). Prints the figures; exits 1 when a bound is broken.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import types
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if "tests" not in sys.modules:  # the test host, without the pack's root on sys.path (see demo.py)
    _tests = types.ModuleType("tests")
    _tests.__path__ = [str(REPO / "tests")]
    sys.modules["tests"] = _tests

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
PICTURES = 3  # encodings (or pictures) per adapter kind
WEIGHT_TYPES = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")
EMBEDS_FORMAT = "ipadapter-exact-embeds/1"


@dataclass
class SoakResult:
    prompts: int
    warmup: int
    seconds: float = 0.0
    rss_mib: list[float] = field(default_factory=list)  # after each prompt
    stats: list[dict] = field(default_factory=list)  # /ipadapter_exact/stats after each prompt
    distinct_files: int = len(ADAPTERS)

    @property
    def baseline_mib(self) -> float:
        return self.rss_mib[self.warmup - 1]

    @property
    def max_drift_pct(self) -> float:
        after = self.rss_mib[self.warmup:]
        return max((abs(r - self.baseline_mib) / self.baseline_mib * 100 for r in after), default=0.0)

    @property
    def final_drift_pct(self) -> float:
        return (self.rss_mib[-1] - self.baseline_mib) / self.baseline_mib * 100

    def problems(self, tolerance_pct: float) -> list[str]:
        out = []
        if self.max_drift_pct > tolerance_pct:
            out.append(f"RSS drifted {self.max_drift_pct:.1f} % from {self.baseline_mib:.0f} MiB after warm-up "
                       f"(bound {tolerance_pct} %)")
        last = self.stats[-1]
        if last["live_adapters"] != self.distinct_files:
            out.append(f"{last['live_adapters']} live adapter weight sets for {self.distinct_files} files")
        if last["files_read"] != self.distinct_files:
            out.append(f"{last['files_read']} file reads for {self.distinct_files} distinct unchanged files")
        return out

    def summary(self) -> str:
        live = sorted({s["live_adapters"] for s in self.stats})
        return (f"{self.prompts} prompts in {self.seconds:.0f} s; RSS after {self.warmup} warm-up prompts "
                f"{self.baseline_mib:.0f} MiB, min/max after {min(self.rss_mib[self.warmup:]):.0f}/"
                f"{max(self.rss_mib[self.warmup:]):.0f} MiB, max drift {self.max_drift_pct:.2f} %, final "
                f"{self.final_drift_pct:+.2f} %; live adapter copies {live} for {self.distinct_files} files; "
                f"files read {self.stats[-1]['files_read']}")


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


def stage_inputs(server: ComfyServer, encode: bool) -> None:
    """Encodings (embeds files) or pictures for every adapter kind, in the server's folders."""
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
            write_png(server.input_dir / f"soak_{picture}.png", 48 + 16 * picture, 64, seed=picture)


def soak_prompt(i: int, encode: bool) -> dict:
    adapters = list(ADAPTERS)
    adapter = adapters[i % len(adapters)]
    picture = (i // len(adapters)) % PICTURES
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": Path(CHECKPOINT).name}},
        "2": {"class_type": "IPAdapterExactLoader", "inputs": {"ipadapter_file": Path(adapter).name}},
        "5": {"class_type": "IPAdapterExactLoadEmbeds", "inputs": {"embeds_file": embeds_name(adapter, picture)}},
        "6": {"class_type": "IPAdapterExactApply", "inputs": {
            "model": ["1", 0], "ipadapter": ["2", 0], "image_embeds": ["5", 0],
            "weight": round(0.3 + 0.1 * (i % 8), 2), "weight_type": WEIGHT_TYPES[i % len(WEIGHT_TYPES)],
            "start_at": 0.0 if i % 2 else 0.1, "end_at": 1.0 if i % 3 else 0.8, "combine_embeds": "concat"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a lighthouse"}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "KSampler", "inputs": {
            "model": ["6", 0], "positive": ["7", 0], "negative": ["8", 0], "latent_image": ["9", 0],
            "seed": i, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}},
    }
    if encode:
        prompt["3"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": Path(ENCODER).name}}
        prompt["4"] = {"class_type": "LoadImage", "inputs": {"image": f"soak_{picture}.png"}}
        prompt["5"] = {"class_type": "IPAdapterExactEncode", "inputs": {
            "ipadapter": ["2", 0], "clip_vision": ["3", 0], "image": ["4", 0],
            "crop": ("center", "pad", "squash")[i % 3], "negative": "reference (zero)"}}
    return prompt


def run_soak(server: ComfyServer, prompts: int = 50, warmup: int = 5, encode: bool = False,
             progress=None) -> SoakResult:
    """Runs the prompts on a started server (models: the generated tree) and records RSS and stats."""
    if not 0 < warmup < prompts:
        raise ValueError(f"warm-up ({warmup}) must be at least 1 and below the number of prompts ({prompts})")
    stage_inputs(server, encode)
    result = SoakResult(prompts, warmup)
    t0 = time.monotonic()
    for i in range(prompts):
        server.run(soak_prompt(i, encode), timeout=600)
        result.rss_mib.append(process_rss_mib(server.proc.pid))
        result.stats.append(adapter_stats(server))
        if progress is not None:
            progress(i, result)
    result.seconds = time.monotonic() - t0
    return result


def needed_models() -> list[str]:
    return [CHECKPOINT, *ADAPTERS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=5.0, help="allowed RSS drift after warm-up, percent")
    parser.add_argument("--encode", action="store_true", help="encode pictures with CLIP ViT-H (slow on a CPU)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="[soak] %(message)s")

    from tests.fixtures import generate

    names = needed_models() + ([ENCODER] if args.encode else [])
    generate.ensure(*names)
    with tempfile.TemporaryDirectory(prefix="ipadapter-soak-") as work:
        with ComfyServer(models_root=[generate.MODELS_ROOT], base_dir=Path(work) / "comfy",
                         save_log_to=REPO / ".test-artifacts" / "soak-comfyui.log") as server:
            def progress(i, result):
                log.info("prompt %d/%d: RSS %.0f MiB, %s", i + 1, args.prompts, result.rss_mib[-1],
                         result.stats[-1])

            result = run_soak(server, args.prompts, args.warmup, args.encode, progress)
    print(result.summary())
    print("RSS MiB per prompt: " + " ".join(f"{r:.0f}" for r in result.rss_mib))
    problems = result.problems(args.tolerance)
    for problem in problems:
        print(f"FAIL: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
