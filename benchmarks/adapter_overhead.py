"""What the adapter costs: UNet step time with vs without it, time inside the image path, memory.

Runs on the real SD1.5 UNet topology (random weights) through ComfyUI, in one process,
with and without the adapter interleaved round by round, and prints medians and ratios:

    .venv/bin/python benchmarks/adapter_overhead.py [--rounds 7] [--sizes 256 512]

A whole step on a shared 2-core machine varies by more than the adapter costs, so the time
spent inside the image-attention term itself is measured too, at the same shapes.
Not a test: it prints figures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import runpy
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def setup_imports() -> None:
    """The pack as `ipadapter_pack` and ComfyUI in-process (on CUDA when there is one)."""
    runpy.run_path(str(REPO / "tests" / "harness" / "imports.py"))["setup"](force_cpu=False)


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class ImagePathTimer:
    """Wraps IPApplication.image_term to add up the seconds spent in the image term."""

    def __init__(self, cls):
        self.cls, self.original, self.seconds = cls, cls.image_term, 0.0

    def __enter__(self):
        timer = self

        def timed(app, *args, **kwargs):
            start = time.perf_counter()
            try:
                return timer.original(app, *args, **kwargs)
            finally:
                timer.seconds += time.perf_counter() - start

        self.cls.image_term = timed
        return self

    def __exit__(self, *exc):
        self.cls.image_term = self.original


def adapter_weight_bytes(models) -> int:
    """Bytes of distinct adapter weight storage reachable from the patched models' patches."""
    seen, total = set(), 0
    for model in models:
        for patch in model.model_options["transformer_options"]["patches_replace"]["attn2"].values():
            for app in patch.applications():
                for p in app.adapter.parameters():
                    if p.data_ptr() not in seen:
                        seen.add(p.data_ptr())
                        total += p.numel() * p.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    args = parser.parse_args()
    setup_imports()
    torch.set_grad_enabled(False)

    from safetensors.torch import save_file

    from ipadapter_pack.ip_adapter_core.attention import IPApplication
    from ipadapter_pack.ip_adapter_core.embeds import ImageEmbeds
    from ipadapter_pack.nodes.apply import apply_adapter
    from ipadapter_pack.nodes.comfy_seam import ADAPTERS
    from tests.fixtures.generate import adapter_state_dict
    from tests.harness.reference_unets import build_pair, comfy_forward

    with torch.inference_mode():
        pair = build_pair("SD1.5", seed=0)
        hidden = pair.hidden_sizes
        comfy_model = pair.comfy
        del pair.diffusers
        gc.collect()
        path = REPO / "out" / "bench_sd15_base.safetensors"
        path.parent.mkdir(exist_ok=True)
        save_file(adapter_state_dict("base", hidden, 768, seed=0), str(path))
        adapter = ADAPTERS.get(str(path))
        embeds = ImageEmbeds(torch.randn(1, 1024), torch.zeros(1, 1024), "image_embeds")
        patched = apply_adapter(comfy_model, adapter, embeds, 1.0)

        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SD1.5 UNet real topology, "
              f"batch 2 (uncond+cond), base adapter (4 tokens), {args.rounds} interleaved rounds")
        for size in args.sizes:
            side = size // 8
            x = torch.randn(2, 4, side, side)
            text = torch.randn(2, 77, 768)
            t = torch.tensor([500.0, 500.0])

            def step(model, x=x, t=t, text=text):
                return comfy_forward(model, x, t, text, [1, 0])

            step(comfy_model), step(patched)  # warm up (and fill the K/V cache once)
            bare, with_ip, inside = [], [], []
            for _ in range(args.rounds):
                start = time.perf_counter()
                step(comfy_model)
                bare.append(time.perf_counter() - start)
                with ImagePathTimer(IPApplication) as timer:
                    start = time.perf_counter()
                    step(patched)
                    with_ip.append(time.perf_counter() - start)
                inside.append(timer.seconds)
            ratios = [w / b for w, b in zip(with_ip, bare, strict=True)]
            med_bare, med_ip, med_in = (statistics.median(v) for v in (bare, with_ip, inside))
            print(f"{size}px: step median bare {med_bare * 1000:.0f} ms, with adapter {med_ip * 1000:.0f} ms; "
                  f"ratio median {statistics.median(ratios):.3f} (rounds {min(ratios):.2f}-{max(ratios):.2f}); "
                  f"image path itself {med_in * 1000:.1f} ms = {100 * med_in / med_bare:.2f} % of a bare step")

        # Memory: one vs three applications of the same file.
        before = rss_mib()
        three = [apply_adapter(comfy_model, adapter, embeds, w) for w in (0.5, 1.0, 1.5)]
        stacked = apply_adapter(apply_adapter(patched, adapter, embeds, 0.5), adapter, embeds, 0.7)
        after = rss_mib()
        one_bytes = adapter_weight_bytes([patched])
        three_bytes = adapter_weight_bytes(three + [stacked])
        print(f"adapter weights reachable: one application {one_bytes / 2**20:.1f} MiB, three separate + one "
              f"stack of three {three_bytes / 2**20:.1f} MiB (ratio {three_bytes / one_bytes:.2f}); "
              f"RSS +{after - before:.1f} MiB for the extra applications; live file copies: {ADAPTERS.live_copies()}")
        x = torch.randn(2, 4, 64, 64)
        text = torch.randn(2, 77, 768)
        gc.collect()
        base_rss = rss_mib()
        comfy_forward(patched, x, torch.tensor([500.0, 500.0]), text, [1, 0])
        one_peak = rss_mib() - base_rss
        comfy_forward(stacked, x, torch.tensor([500.0, 500.0]), text, [1, 0])
        three_peak = rss_mib() - base_rss
        print(f"RSS growth over a 512px step: one adapter {one_peak:.1f} MiB, three stacked {three_peak:.1f} MiB")


if __name__ == "__main__":
    main()
