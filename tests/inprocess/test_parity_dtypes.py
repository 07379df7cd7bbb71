"""Half precision: the pack against diffusers in the same dtype, through ComfyUI's sampler path.

Model: the SD1.5 topology (16 cross-attention layers, 8 heads, context 768) with every level
320 wide (111M parameters; ComfyUI detects it as SD15). Why not the real 320/640/1280 widths:
this CPU has no native fp16 convolutions (conv2d fp16 is ~40x slower than fp32 here), so one
real-size fp16 forward at a 16x16 latent takes ~50 s; the narrow UNet at 8x8 (fp16) and
16x16 (bf16) latents takes about a second. What is checked here does not depend on the widths:
which dtype the image tokens and K/V are made in, and how far the result moves.

"native": ComfyUI computing in the weights' dtype, as on a GPU with fp16/bf16 support (on CPU
ComfyUI would cast to fp32, so the model is loaded with its manual cast switched off); diffusers
is the same UNet `.to(dtype)`. "manual cast": ComfyUI's CPU default for half-precision weights
(stored in fp16, every op computed in fp32); its diffusers twin is an fp32 UNet holding the
fp16-rounded weights, so that comparison is held to the fp32 tolerance.

Tolerances (max |ours - diffusers| / max |diffusers| of the CFG noise prediction). fp32 compute
(fp32 UNet, manual cast): 1e-4, as everywhere. fp16/bf16: the bare UNets are compared first, the
same way on the same step (bare ComfyUI vs bare diffusers, no adapter; measured: fp16 6.6e-3,
bf16 7.2e-2 -- CFG 5 multiplies the per-branch rounding by about 6, and 8 mantissa bits through a
deep random UNet is that coarse); the adapter is then allowed 1.5x that measured bare difference
(measured ratios: fp16 0.84, bf16 1.01). The bare figure itself is capped by BARE_BOUND.
Every case also asserts the dtype and device of the image tokens (the projection's output) and
of the queries/K/V the layers actually use: the UNet's compute dtype, on the UNet's device.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file

from tests.fixtures.generate import adapter_state_dict
from tests.harness import parity
from tests.harness.parity import TOLERANCE, record, relative_difference

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
BARE_BOUND = {"native fp16": 1e-2, "native bf16": 1e-1, "fp32": TOLERANCE / 3, "manual cast fp16": TOLERANCE / 3}
HALF_MULTIPLE = 1.5  # adapter tolerance in fp16/bf16: this times the bare difference on the same step
LATENTS = {"native fp16": (8, 8), "native bf16": (16, 16), "fp32": (16, 16), "manual cast fp16": (16, 16)}
WEIGHT = 1.0

# case: (UNet kind, adapter file dtype)
CASES = {
    "fp16 UNet, fp16 file": ("native fp16", FP16),
    "bf16 UNet, bf16 file": ("native bf16", BF16),
    "bf16 UNet, fp32 file": ("native bf16", FP32),
    "fp32 UNet, fp16 file": ("fp32", FP16),
    "fp16 weights in fp32 (manual cast), fp16 file": ("manual cast fp16", FP16),
}


@dataclass
class Setting:
    """One kind of UNet pair, the step it is compared on, and its bare comparison."""

    pair: object
    step: parity.CFGStep
    bare: parity.Reference
    bare_diff: float

    @property
    def tolerance(self) -> float:
        if parity.compute_dtype(self.pair.comfy) == FP32:
            return TOLERANCE
        return HALF_MULTIPLE * self.bare_diff


@pytest.fixture(scope="module")
def settings(comfy_inprocess):
    """The fp32 narrow pair and, built on demand, its half-precision twins (with bare figures)."""
    base = parity.build_pair("SD1.5", seed=5, narrow=True, share_weights=True)
    built: dict[str, Setting] = {}

    def get(kind: str) -> Setting:
        if kind not in built:
            if kind == "fp32":
                pair = base
            else:
                compute, dtype = kind.rsplit(" ", 1)
                pair = parity.derive_pair(base, {"fp16": FP16, "bf16": BF16}[dtype], compute.replace(" ", "_"))
            step = parity.make_step(pair, LATENTS[kind], batch=1, seed=11)
            with torch.inference_mode():
                parity.unload_diffusers_adapter(pair.diffusers)
                bare = parity.reference(pair, step)
                diff, _ = parity.sampler_parity(pair.comfy, bare)
            built[kind] = Setting(pair, step, bare, diff)
        return built[kind]

    yield get
    built.clear()
    gc.collect()


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(BARE_BOUND))
def test_bare_unets_in_dtype(settings, kind):
    setting = settings(kind)
    record(f"sampler SD1.5-narrow {kind} bare", setting.bare_diff)
    assert setting.bare_diff <= BARE_BOUND[kind], (
        f"{kind}: the bare UNets differ by {setting.bare_diff:.2e} (bound {BARE_BOUND[kind]:.1e})")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
@torch.inference_mode()
def test_adapter_in_dtype(settings, case, tmp_path):
    apply_adapter, cache, image_embeds = parity.pack_api()
    kind, file_dtype = CASES[case]
    setting = settings(kind)
    pair, step, bare = setting.pair, setting.step, setting.bare
    flat = {k: v.to(file_dtype) for k, v in
            adapter_state_dict("plus", parity.hidden_sizes(pair.diffusers), pair.context_dim, seed=31).items()}
    path = tmp_path / "plus.safetensors"
    save_file(flat, str(path))
    adapter = cache.get(str(path))

    gen = torch.Generator().manual_seed(12)
    cond, uncond = parity.encodings("plus", 1, gen)
    parity.load_diffusers_adapter(pair.diffusers, flat, WEIGHT)
    ref = parity.reference(pair, step, image_embeds=torch.cat([uncond, cond])[:, None])

    patched = apply_adapter(pair.comfy, adapter, image_embeds(cond, uncond, adapter.spec.encoder_output), WEIGHT)
    (application,) = parity.applications(patched)
    with parity.spy_key_values(application) as used:
        diff, _ = parity.sampler_parity(patched, ref)
    effect = relative_difference(ref.eps, bare.eps)
    record(f"sampler SD1.5-narrow {case}", diff)
    record(f"sampler SD1.5-narrow {case} adapter effect", effect)

    want = (parity.compute_dtype(pair.comfy), pair.comfy.load_device)
    got_tokens = {(t.dtype, t.device) for t in (application.cond_tokens, application.uncond_tokens)}
    got_kv = {where for call in used for where in [call["q"], *call["kv"]]}
    tolerance = setting.tolerance
    record(f"sampler SD1.5-narrow {case} tolerance", tolerance)
    assert len(used) == len(adapter.spec.layers), f"{len(used)} layer calls asked for image K/V"
    assert effect > 2 * tolerance, f"{case}: the adapter changes the step by {effect:.2e} only: no teeth"
    problems = []
    if got_kv != {want}:
        problems.append(f"queries/K/V ran in {got_kv}, the UNet computes in {want}")
    if got_tokens != {want}:
        problems.append(f"the image tokens were projected in {got_tokens}, the UNet computes in {want} "
                        "(diffusers projects in the UNet's dtype)")
    if not diff <= tolerance:
        problems.append(f"ours vs diffusers differ by {diff:.2e} (tolerance {tolerance:.1e})")
    assert not problems, f"{case}: " + "; ".join(problems)
