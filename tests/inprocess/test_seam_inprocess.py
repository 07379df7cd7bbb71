"""The ComfyUI seam in-process: schedule gating on the sampler's real path, host reads per model
call, other packs' patches, the combined prompt's negative, and the adapter cache's lifetime."""

from __future__ import annotations

import gc
import shutil

import pytest
import torch

STEPS = 8


def sample(model, seed: int = 0) -> torch.Tensor:
    """A real ComfyUI sampler run (euler, CFG 2) on an 8x8 latent with random text conditioning."""
    import comfy.sample

    gen = torch.Generator().manual_seed(seed)
    positive = [[torch.randn(1, 77, 768, generator=gen), {}]]
    negative = [[torch.randn(1, 77, 768, generator=gen), {}]]
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(1, 4, 8, 8, generator=gen)
    return comfy.sample.sample(model, noise, STEPS, 2.0, "euler", "normal", positive, negative, latent,
                               disable_pbar=True, seed=seed)


def base_embeds(width: int = 1024, count: int = 1):
    from ipadapter_pack.ip_adapter_core.embeds import ImageEmbeds

    gen = torch.Generator().manual_seed(3)
    return ImageEmbeds(torch.randn(count, width, generator=gen), torch.zeros(1, width), "image_embeds")


@pytest.fixture(scope="module")
def adapter(pack, models):
    from ipadapter_pack.nodes.comfy_seam import load_adapter_file

    models.ensure("ipadapter/sd15_tiny_base.safetensors")
    return load_adapter_file("sd15_tiny_base.safetensors")


class GateLog:
    """Records each gate decision with the sigma it was made for, and the gate's host reads."""

    def __init__(self, monkeypatch):
        from ipadapter_pack.nodes import comfy_seam

        self.decisions: list[tuple[float, bool]] = []
        self.host_reads = 0
        original_read, original_open = comfy_seam.sigma_on_host, comfy_seam.ScheduleGate.is_open

        def counted_read(sigmas):
            self.host_reads += 1
            return original_read(sigmas)

        def logged_open(gate, extra_options):
            result = original_open(gate, extra_options)
            self.decisions.append((float(extra_options["sigmas"].max()), result))
            return result

        monkeypatch.setattr(comfy_seam.gating, "sigma_on_host", counted_read)  # where ScheduleGate looks it up
        monkeypatch.setattr(comfy_seam.ScheduleGate, "is_open", logged_open)


def count_model_calls(model):
    """A clone whose UNet calls are counted (ComfyUI's unet function wrapper)."""
    calls = []

    def wrapper(apply_model, args):
        calls.append(float(args["timestep"].max()))
        return apply_model(args["input"], args["timestep"], **args["c"])

    counted = model.clone()
    counted.set_model_unet_function_wrapper(wrapper)
    return counted, calls


@torch.inference_mode()
def test_gate_uses_the_sampling_of_a_node_placed_after_apply(pack, sd15, adapter, monkeypatch):
    import comfy_extras.nodes_model_advanced as advanced

    from ipadapter_pack.nodes.apply import apply_adapter

    start, end = 0.3, 0.7
    patched = apply_adapter(sd15, adapter, base_embeds(), start_at=start, end_at=end)
    (final,) = advanced.ModelSamplingDiscrete().patch(patched, "v_prediction", True)  # zsnr: other sigmas
    log = GateLog(monkeypatch)
    sample(final)
    assert log.decisions, "the gate never ran"
    after = final.get_model_object("model_sampling")
    before = sd15.get_model_object("model_sampling")
    bounds_after = (after.percent_to_sigma(start), after.percent_to_sigma(end))
    bounds_before = (before.percent_to_sigma(start), before.percent_to_sigma(end))
    expected = [bounds_after[1] <= s <= bounds_after[0] for s, _ in log.decisions]
    assert [d for _, d in log.decisions] == expected
    assert any(expected) and not all(expected), "the window must open and close within the run"
    stale = [bounds_before[1] <= s <= bounds_before[0] for s, _ in log.decisions]
    assert stale != expected, "the two samplings must disagree here, or this test proves nothing"


@torch.inference_mode()
@pytest.mark.parametrize("start,end,reads_per_call", [(0.0, 1.0, 0), (0.2, 0.9, 1)])
def test_host_reads_per_model_call(pack, sd15, adapter, monkeypatch, start, end, reads_per_call):
    from ipadapter_pack.nodes.apply import apply_adapter

    counted, calls = count_model_calls(sd15)
    patched = apply_adapter(counted, adapter, base_embeds(), start_at=start, end_at=end)
    log = GateLog(monkeypatch)
    sample(patched)
    layers = len(adapter.spec.layers)
    assert len(log.decisions) == len(calls) * layers  # the gate is asked on every layer of every call
    assert log.host_reads == reads_per_call * len(calls)  # ... and reads the device at most once per call


class CallCount:
    """A counter that ComfyUI's deep copies of model options (on every clone) share."""

    def __init__(self):
        self.calls = 0

    def __deepcopy__(self, memo):
        return self


class ForeignPatch:
    """Another pack's attn2 replacement: plain attention plus a recognisable offset, counted."""

    def __init__(self, inner=None):
        self.count = CallCount()
        self.inner = inner

    @property
    def calls(self) -> int:
        return self.count.calls

    def __call__(self, q, k, v, extra_options):
        from ipadapter_pack.nodes.comfy_seam import text_attention

        self.count.calls += 1
        out = self.inner(q, k, v, extra_options) if self.inner else text_attention(q, k, v, extra_options)
        return out + 0.25


def forward(model, seed: int = 0) -> torch.Tensor:
    from tests.harness.reference_unets import comfy_forward

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, 768, generator=gen)
    return comfy_forward(model, x, torch.tensor([500.0, 500.0]), context, [1, 0])


@torch.inference_mode()
def test_foreign_patch_before_and_after(pack, sd15, adapter):
    from ipadapter_pack.nodes.apply import apply_adapter

    key = adapter.spec.layers[0]
    layers = len(adapter.spec.layers)
    plain, ours = forward(sd15), forward(apply_adapter(sd15, adapter, base_embeds()))

    # Another pack first (on one layer, under the 2-part key), then us: it runs once per call, kept.
    foreign = ForeignPatch()
    first = sd15.clone()
    first.set_model_attn2_replace(foreign, key[0], key[1])
    foreign_only = forward(first)
    foreign.count.calls = 0
    both = forward(apply_adapter(first, adapter, base_embeds()))
    assert foreign.calls == 1
    assert not torch.allclose(foreign_only, plain) and not torch.allclose(both, foreign_only)
    assert not torch.allclose(both, ours)

    # Us first, then a pack that wraps what it finds: our image term runs once per layer per call.
    from ipadapter_pack.ip_adapter_core.attention import IPApplication

    patched = apply_adapter(sd15, adapter, base_embeds())
    table = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    ours_on_layer = table[key]
    wrapper = ForeignPatch(inner=ours_on_layer)
    second = patched.clone()
    second.set_model_attn2_replace(wrapper, *key)
    terms = []
    original = IPApplication.image_term

    def counted(app, *args, **kwargs):
        terms.append(args[0])
        return original(app, *args, **kwargs)

    IPApplication.image_term = counted
    try:
        wrapped = forward(second)
    finally:
        IPApplication.image_term = original
    assert wrapper.calls == 1 and sorted(terms) == list(range(layers))
    assert not torch.allclose(wrapped, ours)


@pytest.mark.parametrize("variant", ["base", "plus", "fullface"])
@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("mode", ["concat", "add", "subtract", "average", "norm average"])
def test_combined_prompt_keeps_the_reference_negative(models, variant, count, mode):
    """Every combine mode on every projection kind: finite tokens, and the shared reference
    negative is the negative of the combined prompt (not N times it, not 0/0)."""
    from ipadapter_pack.ip_adapter_core.attention import IPApplication
    from ipadapter_pack.ip_adapter_core.embeds import ImageEmbeds, image_tokens
    from ipadapter_pack.models.files import load_adapter

    model = load_adapter(str(models[f"ipadapter/sd15_tiny_{variant}.safetensors"]))
    gen = torch.Generator().manual_seed(5)
    if variant == "base":
        cond, uncond, output = torch.randn(count, 1024, generator=gen), torch.zeros(1, 1024), "image_embeds"
    else:
        shape = (257, 1280)
        cond, uncond, output = torch.randn(count, *shape, generator=gen), torch.randn(1, *shape, generator=gen), \
            "penultimate"
    cond_tokens, uncond_tokens = image_tokens(model.image_tokens, ImageEmbeds(cond, uncond, output), mode, False)
    reference_negative = model.image_tokens(uncond)
    assert torch.isfinite(cond_tokens).all() and torch.isfinite(uncond_tokens).all()
    per_reference = count if mode == "concat" else 1
    torch.testing.assert_close(uncond_tokens, reference_negative.repeat(1, per_reference, 1))
    assert cond_tokens.shape == uncond_tokens.shape
    app = IPApplication(model, cond_tokens, uncond_tokens)
    q = torch.randn(2, 16, model.key_value(0).to_k_ip.weight.shape[0], generator=gen)
    assert torch.isfinite(app.image_term(0, q, heads=5, chunk_is_cond=[False, True])).all()


def test_separate_negatives_are_combined_like_the_references():
    from ipadapter_pack.ip_adapter_core.embeds import ImageEmbeds, combine, combine_embeds

    gen = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen)
    for mode in ("add", "subtract", "average", "norm average"):
        combined = combine_embeds(ImageEmbeds(cond, uncond, "image_embeds"), mode)
        torch.testing.assert_close(combined.uncond, combine(uncond, mode))
    zeros = combine_embeds(ImageEmbeds(cond, torch.zeros(3, 8), "image_embeds"), "norm average")
    assert torch.equal(zeros.uncond, torch.zeros(1, 8))


@torch.inference_mode()
def test_adapter_cache_frees_files_nothing_uses(pack, models, tmp_path):
    from ipadapter_pack.nodes.comfy_seam import ADAPTERS

    src = models["ipadapter/sd15_tiny_plus.safetensors"]
    gc.collect()
    baseline = ADAPTERS.live_copies()
    held = []
    for i in range(10):
        path = tmp_path / f"copy_{i}.safetensors"
        shutil.copy(src, path)
        held.append(ADAPTERS.get(str(path)))
    assert ADAPTERS.live_copies() == baseline + 10
    assert ADAPTERS.get(str(tmp_path / "copy_3.safetensors")) is held[3]  # in use: shared, not re-read
    del held
    gc.collect()
    assert ADAPTERS.live_copies() == baseline
    assert not [name for name in ADAPTERS.cached_files() if name.startswith("copy_")]
