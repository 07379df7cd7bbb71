"""What the adapter costs: UNet step time with vs without it, time inside the image path, memory.

Runs on the real SD1.5 UNet topology (random weights; or SDXL's depths at reduced widths)
through ComfyUI, in one process, with and without the adapter interleaved round by round, and
prints medians and ratios; on CUDA (fp16 by default) when there is a GPU:

    .venv/bin/python benchmarks/adapter_overhead.py [--rounds 7] [--sizes 256 512]
    .venv/bin/python benchmarks/adapter_overhead.py --model SDXL --sizes 512 1024 --device cuda --dtype fp16

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


def setup_imports(force_cpu: bool) -> None:
    """The pack as `ipadapter_pack` and ComfyUI in-process."""
    runpy.run_path(str(REPO / "tests" / "harness" / "imports.py"))["setup"](force_cpu=force_cpu)


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class ImagePathTimer:
    """Wraps IPApplication.image_term to add up the seconds spent in the image term."""

    def __init__(self, cls, sync=lambda: None):
        self.cls, self.original, self.sync, self.seconds = cls, cls.image_term, sync, 0.0

    def __enter__(self):
        timer = self

        def timed(app, *args, **kwargs):
            timer.sync()
            start = time.perf_counter()
            try:
                return timer.original(app, *args, **kwargs)
            finally:
                timer.sync()
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


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--model", choices=("SD1.5", "SDXL"), default="SD1.5",
                        help="SD1.5: the real topology and widths; SDXL: the real depths at reduced widths")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="default: fp16 on CUDA, fp32 on the CPU")
    args = parser.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.dtype or ("fp16" if cuda else "fp32")]
    setup_imports(force_cpu=not cuda)
    torch.set_grad_enabled(False)

    from safetensors.torch import save_file

    from ipadapter_pack.ip_adapter_core.attention import IPApplication
    from ipadapter_pack.ip_adapter_core.embeds import ImageEmbeds
    from ipadapter_pack.nodes.apply import apply_adapter
    from ipadapter_pack.nodes.comfy_seam import ADAPTERS
    from tests.fixtures.generate import adapter_state_dict
    from tests.harness.reference_unets import build_pair, comfy_forward

    context_dim, embed_dim = (768, 1024) if args.model == "SD1.5" else (2048, 1280)
    with torch.inference_mode():
        pair = build_pair(args.model, seed=0)
        hidden = pair.hidden_sizes
        comfy_model = pair.comfy
        del pair.diffusers
        gc.collect()
        comfy_model.model.to(device, dtype)
        path = REPO / "out" / f"bench_{args.model}_base.safetensors"
        path.parent.mkdir(exist_ok=True)
        save_file(adapter_state_dict("base", hidden, context_dim, seed=0), str(path))
        adapter = ADAPTERS.get(str(path))
        adapter.model.to(device)
        embeds = ImageEmbeds(torch.randn(1, embed_dim), torch.zeros(1, embed_dim), "image_embeds")
        patched = apply_adapter(comfy_model, adapter, embeds, 1.0)
        name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
        print(f"torch {torch.__version__} on {name}, {str(dtype).removeprefix('torch.')}; {args.model} UNet, "
              f"batch 2 (uncond+cond), base adapter (4 tokens), {args.rounds} interleaved rounds")
        y = None if args.model == "SD1.5" else torch.randn(2, 2816, device=device, dtype=dtype)
        for size in args.sizes:
            side = size // 8
            x = torch.randn(2, 4, side, side, device=device, dtype=dtype)
            text = torch.randn(2, 77, context_dim, device=device, dtype=dtype)
            t = torch.tensor([500.0, 500.0], device=device)

            def step(model, x=x, t=t, text=text):
                out = comfy_forward(model, x, t, text, [1, 0], y=y)
                sync(device)
                return out

            step(comfy_model), step(patched)  # warm up (and fill the K/V cache once)
            bare, with_ip, inside = [], [], []
            for _ in range(args.rounds):
                start = time.perf_counter()
                step(comfy_model)
                bare.append(time.perf_counter() - start)
                start = time.perf_counter()
                step(patched)
                with_ip.append(time.perf_counter() - start)
                # The image path alone, in a separate pass: timing it needs a sync around each call.
                with ImagePathTimer(IPApplication, lambda: sync(device)) as timer:
                    step(patched)
                inside.append(timer.seconds)
            ratios = [w / b for w, b in zip(with_ip, bare, strict=True)]
            med_bare, med_ip, med_in = (statistics.median(v) for v in (bare, with_ip, inside))
            print(f"{size}px: step median bare {med_bare * 1000:.1f} ms, with adapter {med_ip * 1000:.1f} ms; "
                  f"ratio median {statistics.median(ratios):.3f} (rounds {min(ratios):.2f}-{max(ratios):.2f}); "
                  f"image path itself {med_in * 1000:.2f} ms = {100 * med_in / med_bare:.2f} % of a bare step")
        if cuda:
            return  # the memory figures below are about host RSS

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
        text = torch.randn(2, 77, context_dim)
        gc.collect()
        base_rss = rss_mib()
        comfy_forward(patched, x, torch.tensor([500.0, 500.0]), text, [1, 0], y=y)
        one_peak = rss_mib() - base_rss
        comfy_forward(stacked, x, torch.tensor([500.0, 500.0]), text, [1, 0], y=y)
        three_peak = rss_mib() - base_rss
        print(f"RSS growth over a 512px step: one adapter {one_peak:.1f} MiB, three stacked {three_peak:.1f} MiB")


if __name__ == "__main__":
    main()
