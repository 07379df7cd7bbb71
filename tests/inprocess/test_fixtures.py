"""The generated model files load through ComfyUI's own loaders and detect as the real thing.

Uses the cached files under tests.fixtures.generate.MODELS_ROOT (generated on first use:
about 10 GB and a few minutes on 2 cores; later runs reuse them).
"""

from __future__ import annotations

import hashlib
import logging
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.fixtures import generate as gen

SD15 = "checkpoints/sd15_tiny.safetensors"
SD15_B = "checkpoints/sd15_tiny_b.safetensors"
SDXL = "checkpoints/sdxl_tiny.safetensors"
CONTROLNET = "controlnet/sd15_tiny_controlnet.safetensors"
LORA = "loras/sd15_tiny_lora.safetensors"


@pytest.fixture(scope="module")
def files():
    return gen.ensure()


@pytest.fixture(scope="module")
def comfy():
    return gen.import_comfy()


def warnings_in(caplog) -> list[str]:
    """Warnings logged while loading, less the host's own (no torchaudio on the test host)."""
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return [m for m in messages if "torchaudio" not in m]


def shapes_of(path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        if "torchaudio" not in record.getMessage():
            self.messages.append(record.getMessage())


def load_checkpoint(path):
    """(model, clip, vae, warnings logged while ComfyUI loaded it)."""
    import comfy.sd

    collect = _Collect()
    logging.getLogger().addHandler(collect)
    try:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    finally:
        logging.getLogger().removeHandler(collect)
    return model, clip, vae, collect.messages


@pytest.fixture(scope="module")
def sd15(files, comfy):
    return load_checkpoint(files[SD15])


def encode(clip, text):
    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))


LATENT = (1, 4, 16, 16)  # 128 px: enough to run every block, cheap on 2 cores


def sample(model, positive, negative, steps=2, seed=0, latent_shape=LATENT):
    import comfy.sample

    latent = torch.zeros(latent_shape)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative, latent,
                                   disable_pbar=True, seed=seed)


@pytest.fixture(scope="module")
def sd15_base(sd15):
    """Prompt conditionings and the plain sample every SD1.5 comparison starts from."""
    model, clip, _, _ = sd15
    positive, negative = encode(clip, "a photo of a cat"), encode(clip, "")
    return positive, negative, sample(model, positive, negative)


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


# ---- the tree -------------------------------------------------------------------------------


def test_models_root_is_keyed_by_generator_source(files):
    key = hashlib.sha256(open(gen.__file__, "rb").read()).hexdigest()[:12]
    assert gen.MODELS_ROOT.name == key and gen.MODELS_ROOT.parent.name == "models"
    for folder in ("checkpoints", "clip_vision", "ipadapter", "controlnet", "loras"):
        assert (gen.MODELS_ROOT / folder).is_dir()
    assert set(files) == set(gen.ALL) and "clip_vision/vit_g.safetensors" not in gen.ALL
    assert all(p.is_file() and p.parent.parent == gen.MODELS_ROOT for p in files.values())
    assert not list(gen.MODELS_ROOT.rglob("*.tmp"))


def test_vit_g_is_available_by_name_only():
    assert "clip_vision/vit_g.safetensors" in gen.NAMES and "clip_vision/vit_g.safetensors" not in gen.ALL
    spec = {k: s for k, s, _ in gen._clip_vision_spec("vit_g")}  # layout only: the file is 3.4 GiB
    assert "vision_model.encoder.layers.47.layer_norm1.weight" in spec  # what comfy/clip_vision.py keys on
    assert spec["visual_projection.weight"] == (1280, 1664)
    assert abs(sum(math.prod(s) for s in spec.values()) / 1e9 - 1.845) < 0.01


def test_specs_build_in_a_fresh_process():
    """The CLI path: transformers' CLIP classes import torchvision before anything imported ComfyUI."""
    import subprocess
    import sys

    code = ("from tests.fixtures import generate as g; import sys; "
            "assert 'comfy' not in sys.modules and 'torchvision' not in sys.modules; "
            "print(len(g._clip_vision_spec('vit_l')), len(g._clip_text_l_spec()))")
    done = subprocess.run([sys.executable, "-c", code], cwd=gen.REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["392", "196"]


def test_writes_are_atomic_and_cached(tmp_path, monkeypatch):
    name = "ipadapter/sd15_tiny_base.safetensors"
    path = gen._ensure_in(tmp_path, [name])[name]
    stamp = path.stat().st_mtime_ns
    assert gen._ensure_in(tmp_path, [name])[name].stat().st_mtime_ns == stamp  # reused, not rewritten

    def interrupted(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise KeyboardInterrupt

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    other = "ipadapter/sd15_tiny_plus.safetensors"
    with pytest.raises(KeyboardInterrupt):
        gen._ensure_in(tmp_path, [other])
    assert not (tmp_path / other).exists()
    assert [p.name for p in (tmp_path / "ipadapter").iterdir()] == [path.name]
    with pytest.raises(KeyError, match="unknown fixture"):
        gen._ensure_in(tmp_path, ["checkpoints/nope.safetensors"])


# ---- checkpoints ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,config,hidden", [
    (SD15, "SD15", gen.SD15_TINY_HIDDEN), (SD15_B, "SD15", gen.SD15_TINY_HIDDEN), (SDXL, "SDXL", gen.SDXL_TINY_HIDDEN)])
def test_checkpoint_detection(name, config, hidden, files, comfy, sd15):
    import comfy.supported_models
    import comfy.taesd.taesd

    shapes = shapes_of(files[name])
    assert gen.attn2_hidden_sizes(shapes) == hidden
    text = {k: s for k, s in shapes.items() if k.startswith(("cond_stage_model.", "conditioner."))}
    expected_text = 123.06e6 if config == "SD15" else 123.06e6 + 694.66e6  # CLIP-L (+ CLIP-G): full size
    assert abs(sum(math.prod(s) for s in text.values()) - expected_text) < 0.01e6

    model, clip, vae, warnings = sd15 if name == SD15 else load_checkpoint(files[name])
    assert type(model.model.model_config) is getattr(comfy.supported_models, config)
    assert isinstance(vae.first_stage_model, comfy.taesd.taesd.TAESD)
    assert not [w for w in warnings if "missing" in w.lower() or "not initalized" in w], warnings

    cond = encode(clip, "a photo of a cat")
    width = {"SD15": 768, "SDXL": 2048}[config]
    assert cond[0][0].shape == (1, 77, width) and torch.isfinite(cond[0][0]).all()
    if config == "SDXL":  # the adm path too: a short sample through the whole UNet
        assert cond[0][1]["pooled_output"].shape == (1, 1280)
        out = sample(model, cond, encode(clip, ""))
        assert out.shape == LATENT and torch.isfinite(out).all()


def test_sd15_tiny_b_is_a_fine_tune_of_sd15_tiny(files):
    a, b = load_file(str(files[SD15])), load_file(str(files[SD15_B]))
    assert a.keys() == b.keys()
    unet = [k for k in a if k.startswith("model.diffusion_model.") and a[k].ndim >= 2]
    diffs = [relative(b[k].float(), a[k].float()) for k in unet]
    assert 0.1 < sum(diffs) / len(diffs) < 1.0  # moved, not replaced
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("model.diffusion_model."))


def test_sd15_tiny_samples_finite(sd15, sd15_base):
    model, clip, vae, _ = sd15
    positive, negative, out = sd15_base
    assert out.shape == LATENT and torch.isfinite(out).all()
    other = sample(model, encode(clip, "a red car"), negative)
    assert relative(other, out) > 1e-3  # the prompt matters
    with torch.inference_mode():
        image = vae.decode(out)
    assert image.shape == (1, 128, 128, 3) and torch.isfinite(image).all()


def test_decoded_stand_in_images_have_a_real_spread(sd15, sd15_base):
    """A sampled latent decodes to a picture with values across the range, not a flat black one,
    and another latent to another picture (the end-to-end tests compare saved PNGs)."""
    model, clip, vae, _ = sd15
    positive, negative, out = sd15_base
    other = sample(model, positive, negative, seed=1)
    with torch.inference_mode():
        images = vae.decode(torch.cat([out, other]))
    assert images.shape == (2, 128, 128, 3)
    for image in images:
        clipped = float(((image <= 0.0) | (image >= 1.0)).float().mean())
        assert float(image.std()) > 0.05, f"std {float(image.std()):.4f}: decoded picture is flat"
        assert clipped < 0.10, f"{clipped:.1%} of the values are clipped to 0 or 1 (saturated)"
        assert 0.2 < float(image.mean()) < 0.8, float(image.mean())
        assert all(float(image[..., c].std()) > 0.02 for c in range(3)), "a colour channel is flat"
    # 8-bit pictures of two latents differ clearly (a difference in the latent reaches the PNG).
    as_bytes = (images * 255).round()
    assert float((as_bytes[0] - as_bytes[1]).abs().mean()) > 5.0


# ---- LoRA and ControlNet --------------------------------------------------------------------


def test_lora_keys_all_load_and_change_the_output(sd15, sd15_base, files, caplog):
    import comfy.sd

    model, clip, _, _ = sd15
    lora = load_file(str(files[LORA]))
    targets = {k.rsplit(".lora_down", 1)[0] for k in lora if ".lora_down." in k}
    assert len(targets) == 16 * 12 + 12 * 6  # 16 transformers x (attn1 4, attn2 4, ff 2, proj_in/out 2); CLIP-L 12 x 6
    assert any(k.startswith("lora_unet_") for k in targets) and any(k.startswith("lora_te_") for k in targets)
    with caplog.at_level(logging.WARNING):
        model_l, clip_l = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    assert not [w for w in warnings_in(caplog) if "lora key not loaded" in w], warnings_in(caplog)
    assert len(model_l.patches) + len(clip_l.patcher.patches) == len(targets)

    base = sd15_base[2]
    with_lora = sample(model_l, encode(clip_l, "a photo of a cat"), encode(clip_l, ""))
    assert torch.isfinite(with_lora).all() and relative(with_lora, base) > 0.05


def test_controlnet_loads_and_steers_sd15_tiny(sd15, sd15_base, files, comfy, caplog):
    import comfy.cldm.cldm
    import comfy.controlnet

    with caplog.at_level(logging.WARNING):
        cnet = comfy.controlnet.load_controlnet(str(files[CONTROLNET]))
    assert isinstance(cnet, comfy.controlnet.ControlNet)
    assert isinstance(cnet.control_model, comfy.cldm.cldm.ControlNet)
    assert not [w for w in warnings_in(caplog) if "missing" in w or "could not detect" in w], warnings_in(caplog)

    model = sd15[0]
    positive, negative, base = sd15_base
    hint = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(0))
    c = cnet.copy().set_cond_hint(hint.movedim(-1, 1), 1.0, (0.0, 1.0))
    controlled = [[t, dict(d, control=c, control_apply_to_uncond=False)] for t, d in positive]
    steered = sample(model, controlled, negative)
    assert torch.isfinite(steered).all() and relative(steered, base) > 1e-3


# ---- CLIP vision ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,embeds,hidden,layers", [
    ("clip_vision/vit_h.safetensors", 1024, 1280, 32), ("clip_vision/vit_l.safetensors", 768, 1024, 24)])
def test_clip_vision_loads_full_size(name, embeds, hidden, layers, files, comfy, caplog):
    import comfy.clip_vision

    shapes = shapes_of(files[name])
    assert f"vision_model.encoder.layers.{layers - 1}.layer_norm1.weight" in shapes
    assert f"vision_model.encoder.layers.{layers}.layer_norm1.weight" not in shapes
    assert shapes["visual_projection.weight"] == (embeds, hidden)
    with caplog.at_level(logging.WARNING):
        vision = comfy.clip_vision.load(str(files[name]))
    assert vision is not None
    assert not [w for w in warnings_in(caplog) if "missing" in w], warnings_in(caplog)
    noise = torch.rand(224, 224, 3, generator=torch.Generator().manual_seed(1))
    red = torch.zeros(224, 224, 3)
    red[..., 0] = 1.0
    images = torch.stack([noise, red])
    with torch.inference_mode():
        out = vision.encode_image(images)
    assert out["image_embeds"].shape == (2, embeds)
    assert out["penultimate_hidden_states"].shape == (2, 257, hidden)
    assert torch.isfinite(out["image_embeds"]).all() and torch.isfinite(out["penultimate_hidden_states"]).all()
    # Different images give clearly different embeddings (an adapter test needs that).
    a, b = out["image_embeds"]
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) < 0.9


# ---- IP-Adapter files -----------------------------------------------------------------------

PROJ_SHAPES = {  # REFERENCE.md section 2, per kind and context width
    ("base", 768): {"proj.weight": (3072, 1024), "proj.bias": (3072,), "norm.weight": (768,), "norm.bias": (768,)},
    ("vitg", 768): {"proj.weight": (3072, 1280), "norm.weight": (768,)},
    ("plus", 768): {"latents": (1, 16, 768), "proj_in.weight": (768, 1280), "proj_out.weight": (768, 768),
                    "norm_out.weight": (768,), "layers.3.0.to_q.weight": (768, 768),
                    "layers.3.0.to_kv.weight": (1536, 768), "layers.3.0.to_out.weight": (768, 768),
                    "layers.3.0.norm1.weight": (768,), "layers.3.0.norm2.weight": (768,),
                    "layers.3.1.0.weight": (768,), "layers.3.1.1.weight": (3072, 768),
                    "layers.3.1.3.weight": (768, 3072)},
    ("fullface", 768): {"proj.0.weight": (1280, 1280), "proj.2.weight": (768, 1280), "proj.3.weight": (768,)},
    ("base", 2048): {"proj.weight": (8192, 1280), "norm.weight": (2048,)},
    ("vith", 2048): {"proj.weight": (8192, 1024), "norm.weight": (2048,)},
    ("plus_vith", 2048): {"latents": (1, 16, 1280), "proj_in.weight": (1280, 1280), "proj_out.weight": (2048, 1280),
                          "layers.3.0.to_kv.weight": (2560, 1280), "layers.3.1.1.weight": (5120, 1280),
                          "layers.3.1.3.weight": (1280, 5120)},
}


@pytest.mark.parametrize("stem", list(gen.ADAPTERS))
def test_adapter_files(stem, files):
    kind, hidden, ctx = gen.ADAPTERS[stem]
    flat = load_file(str(files[stem + ".safetensors"]))
    nested = torch.load(files[stem + ".bin"], weights_only=True)
    assert set(nested) == {"image_proj", "ip_adapter"}
    from_bin = {f"{head}.{k}": v for head, part in nested.items() for k, v in part.items()}
    assert from_bin.keys() == flat.keys()
    assert all(type(v) is torch.Tensor and torch.equal(v, flat[k]) for k, v in from_bin.items())
    assert all(v.dtype == torch.float16 and torch.isfinite(v).all() for v in flat.values())

    proj = nested["image_proj"]
    for key, shape in PROJ_SHAPES[(kind, ctx)].items():
        assert tuple(proj[key].shape) == shape, key
    ip = nested["ip_adapter"]
    assert sorted(ip) == sorted(f"{2 * n + 1}.{p}.weight" for n in range(len(hidden)) for p in ("to_k_ip", "to_v_ip"))
    assert [ip[f"{2 * n + 1}.to_k_ip.weight"].shape[0] for n in range(len(hidden))] == hidden
    assert all(v.shape[1] == ctx for v in ip.values())
    for key, value in proj.items():  # every LayerNorm moved well off 1 / 0
        norm = ("norm.weight", "norm_out.weight", "norm1.weight", "norm2.weight", ".1.0.weight", "proj.3.weight")
        if key.endswith(norm):
            assert 0.05 < float((value.float() - 1).std()) < 0.2, key


def test_adapter_sizes_match_published_files(files):
    def count(stem):
        return sum(math.prod(s) for s in shapes_of(files[stem + ".safetensors"]).values()) / 1e6

    assert abs(count("ipadapter/sd15_base") - 22.3) < 0.1
    assert abs(count("ipadapter/sd15_plus") - 49.1) < 0.1
    # ip-adapter_sdxl (bigG) is 351M; the ViT-H projection is 256 columns narrower.
    assert abs(count("ipadapter/sdxl_vith") - (351.3 - 8192 * 256 / 1e6)) < 0.2


@pytest.mark.parametrize("checkpoint,adapters", [
    (SD15, ["ipadapter/sd15_tiny_base", "ipadapter/sd15_tiny_plus", "ipadapter/sd15_tiny_fullface",
            "ipadapter/sd15_tiny_vitg"]),
    (SDXL, ["ipadapter/sdxl_tiny_vith", "ipadapter/sdxl_tiny_base", "ipadapter/sdxl_tiny_plus_vith"])])
def test_tiny_adapters_fit_their_unet(checkpoint, adapters, files):
    shapes = shapes_of(files[checkpoint])
    widths = gen.attn2_hidden_sizes(shapes)
    ctx = shapes[next(k for k in shapes if k.endswith("attn2.to_k.weight"))][1]
    for stem in adapters:
        kind, hidden, context = gen.ADAPTERS[stem]
        assert hidden == widths and context == ctx, stem


def test_adapter_state_dict_is_seeded_and_fp32():
    a = gen.adapter_state_dict("base", gen.SD15_REAL_HIDDEN, 768, seed=1)
    b = gen.adapter_state_dict("base", gen.SD15_REAL_HIDDEN, 768, seed=1)
    c = gen.adapter_state_dict("base", gen.SD15_REAL_HIDDEN, 768, seed=2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["image_proj.proj.weight"], c["image_proj.proj.weight"])
    assert all(v.dtype == torch.float32 for v in a.values())
    assert abs(float(a["ip_adapter.1.to_k_ip.weight"].std()) - 0.02) < 0.001
    plus = gen.adapter_state_dict("plus", gen.SD15_TINY_HIDDEN, 768, seed=1)
    assert abs(float(plus["image_proj.latents"].std()) - 1 / math.sqrt(768)) < 0.005
    faceid = gen.adapter_state_dict("faceid", gen.SD15_TINY_HIDDEN, 768, seed=0)
    assert faceid["image_proj.proj.0.weight"].shape == (1024, 512)
    assert faceid["image_proj.proj.2.weight"].shape == (3072, 1024)
    assert faceid["ip_adapter.1.to_k_lora.down.weight"].shape == (128, 768)
    assert faceid["ip_adapter.0.to_k_lora.down.weight"].shape == (128, 320)
    with pytest.raises(ValueError, match="unknown adapter kind"):
        gen.adapter_state_dict("nope", gen.SD15_TINY_HIDDEN, 768, seed=0)
