"""The adapter's weights under ComfyUI's model management, on whichever ComfyUI runs the suite (the release
matrix runs this module on 0.33.0, where Dynamic VRAM is on by default).

* A sampler run loads the adapter's weights together with the patched model (they are listed by the
  patch's ``models()``), and unloading the model unloads them too: no copy stays behind.
* The adapter's patcher is of the class ComfyUI builds its own models with (``CoreModelPatcher``, which
  is ``ModelPatcherDynamic`` under Dynamic VRAM): a plain ModelPatcher among dynamic ones makes
  ComfyUI free memory for the whole prompt the old, estimate-based way.
"""

from __future__ import annotations

import shutil

import torch


def sample_once(model) -> torch.Tensor:
    """One euler step through ComfyUI's sampler (which loads the models the way a prompt does)."""
    import comfy.sample

    gen = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 77, 768, generator=gen), {}]]
    negative = [[torch.randn(1, 77, 768, generator=gen), {}]]
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(1, 4, 8, 8, generator=gen)
    return comfy.sample.sample(model, noise, 1, 2.0, "euler", "normal", positive, negative, latent,
                               disable_pbar=True, seed=0)


def embeds(width: int = 1024):
    from ipadapter_pack.ip_adapter_core.embeds import ImageEmbeds

    return ImageEmbeds(torch.randn(1, width, generator=torch.Generator().manual_seed(3)), torch.zeros(1, width),
                       "image_embeds")


def dynamic(patcher) -> bool:
    """Whether ComfyUI loads this patcher the Dynamic VRAM way (no such thing before 0.16)."""
    return bool(getattr(patcher, "is_dynamic", lambda: False)())


def loaded_patchers() -> list:
    import comfy.model_management

    return [loaded.model for loaded in comfy.model_management.current_loaded_models]


@torch.inference_mode()
def test_adapter_weights_load_and_unload_with_the_model(pack, sd15, models):
    import comfy.model_management

    from ipadapter_pack.nodes.apply import apply_adapter
    from ipadapter_pack.nodes.comfy_seam import load_adapter_file

    models.ensure("ipadapter/sd15_tiny_base.safetensors")
    adapter = load_adapter_file("sd15_tiny_base.safetensors")
    comfy.model_management.unload_all_models()
    assert not any(p is adapter.patcher for p in loaded_patchers())

    patched = apply_adapter(sd15, adapter, embeds())
    sample_once(patched)
    loaded = loaded_patchers()
    assert any(p is adapter.patcher for p in loaded), f"the adapter's weights were not loaded: {loaded}"
    assert any(p is not None and p.model is sd15.model for p in loaded), "the model itself was not loaded"
    assert dynamic(adapter.patcher) == dynamic(patched), (
        f"adapter patcher {type(adapter.patcher).__name__} vs model patcher {type(patched).__name__}")

    comfy.model_management.unload_all_models()
    left = loaded_patchers()
    assert not any(p is adapter.patcher for p in left), "unloading the model left the adapter's weights loaded"
    assert not any(p is not None and p.model is sd15.model for p in left)


def test_adapter_patcher_is_the_hosts_class(pack, models, tmp_path, monkeypatch):
    import comfy.model_patcher

    from ipadapter_pack.nodes.comfy_seam import ADAPTERS

    host_class = getattr(comfy.model_patcher, "CoreModelPatcher", None)
    if host_class is None:  # before ComfyUI 0.16 there is only ModelPatcher
        assert type(ADAPTERS.get(str(models["ipadapter/sd15_tiny_base.safetensors"])).patcher) is (
            comfy.model_patcher.ModelPatcher)
        return

    class HostPatcher(comfy.model_patcher.ModelPatcher):
        """Stands for the class the host picked at start-up (ModelPatcherDynamic on a GPU)."""

        def is_dynamic(self) -> bool:
            return True

    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", HostPatcher)
    copy = tmp_path / "fresh.safetensors"  # a file the cache has not seen
    shutil.copy(models["ipadapter/sd15_tiny_base.safetensors"], copy)
    loaded = ADAPTERS.get(str(copy))
    assert type(loaded.patcher) is HostPatcher and loaded.patcher.is_dynamic()
