"""Layer-level probes of a ComfyUI UNet's cross-attention, for tests of where an adapter acts.

A UNet mixes information across the whole latent (convolutions, self-attention), so "the
adapter changes this and nothing else" is exactly true only at the layer where the image term
is added. These helpers look there:

* ``record_inputs`` runs one real UNet forward of the *unpatched* model and keeps, for every
  cross-attention layer, the projected queries, keys and values and the ``extra_options`` that
  ComfyUI hands to an attn2 replacement -- and what ComfyUI's own kernel made of them;
* ``patched_outputs`` feeds those same inputs to the attn2 replacements of a patched model,
  so several patched models are compared on identical inputs, layer by layer, bit for bit;
* ``changed_rows`` / ``changed_positions`` say where two layer outputs differ at all.

Needs ComfyUI importable in-process (conftest's ``comfy_inprocess``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

BlockKey = tuple[str, int, int]


@dataclass
class LayerInputs:
    q: torch.Tensor  # [chunks * batch, N, C]
    k: torch.Tensor
    v: torch.Tensor
    options: dict  # the extra_options ComfyUI passed (cond_or_uncond, original_shape, n_heads, ...)
    plain: torch.Tensor  # ComfyUI's own attention of q, k, v: the unpatched layer's output

    @property
    def chunks(self) -> list[int]:
        return list(self.options["cond_or_uncond"])

    @property
    def batch(self) -> int:
        return self.q.shape[0] // len(self.chunks)

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of this layer's token grid, from the latent size (each level halves it)."""
        height, width = self.options["original_shape"][-2:]
        for level in range(8):
            h, w = -(-height // 2**level), -(-width // 2**level)
            if h * w == self.q.shape[1]:
                return h, w
        raise AssertionError(f"{self.q.shape[1]} tokens do not tile a {height}x{width} latent")


def comfy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict) -> torch.Tensor:
    """ComfyUI's attention kernel, called as an unpatched CrossAttention calls it."""
    import comfy.ldm.modules.attention as attention

    return attention.optimized_attention(q, k, v, options["n_heads"], attn_precision=options.get("attn_precision"),
                                         transformer_options=options)


class _Recorder:
    """An attn2 replacement that records its inputs and computes plain attention."""

    def __init__(self, key: BlockKey, store: dict):
        self.key = key
        self.store = store

    def __deepcopy__(self, memo: dict) -> _Recorder:
        return self  # ComfyUI deep-copies model options on clone: keep writing into one store

    def __call__(self, q, k, v, extra_options):
        options = {name: value for name, value in extra_options.items()
                   if name not in ("patches", "patches_replace")}
        out = comfy_attention(q, k, v, extra_options)
        self.store[self.key] = LayerInputs(q.clone(), k.clone(), v.clone(), options, out.clone())
        return out


def record_inputs(model, keys: Iterable[BlockKey], x: torch.Tensor, context: torch.Tensor,
                  cond_or_uncond: Sequence[int], timestep: float = 500.0, sigma: float = 5.0,
                  y: torch.Tensor | None = None) -> dict[BlockKey, LayerInputs]:
    """One forward of `model` (a ModelPatcher, unpatched) with every layer in `keys` recorded.

    x: [chunks * batch, 4, H, W]; context: [chunks * batch, T, C]; cond_or_uncond: ComfyUI's
    chunk codes (0 cond, 1 uncond), one per chunk of `batch` rows.
    """
    keys = list(keys)
    store: dict[BlockKey, LayerInputs] = {}
    probed = model.clone()
    for key in keys:
        probed.set_model_attn2_replace(_Recorder(key, store), *key)
    options = dict(probed.model_options["transformer_options"])
    options.update(cond_or_uncond=list(cond_or_uncond), sigmas=torch.tensor([sigma]))
    timesteps = torch.full((x.shape[0],), timestep)
    with torch.inference_mode():
        probed.model.diffusion_model(x, timesteps=timesteps, context=context, y=y, transformer_options=options)
    missing = [key for key in keys if key not in store]
    assert not missing, f"layers never called in the forward: {missing}"
    return store


def attn2_table(model) -> dict:
    return model.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})


def patched_outputs(model, recorded: dict[BlockKey, LayerInputs]) -> dict[BlockKey, torch.Tensor]:
    """Each layer's output in the patched `model`, on the recorded inputs (plain where unpatched)."""
    table = attn2_table(model)
    out = {}
    with torch.inference_mode():
        for key, inputs in recorded.items():
            patch = table.get(key) or table.get(key[:2])
            out[key] = inputs.plain if patch is None else patch(inputs.q, inputs.k, inputs.v, dict(inputs.options))
    return out


def changed_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[rows, N] booleans: where any channel of a query's output differs (bit for bit)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a != b).any(dim=-1)


def changed_positions(a: torch.Tensor, b: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
    """[chunks, batch, h, w] booleans: which query positions of which latent changed."""
    h, w = inputs.grid
    return changed_rows(a, b).reshape(len(inputs.chunks), inputs.batch, h, w)


def changed_layers(a: dict[BlockKey, torch.Tensor], b: dict[BlockKey, torch.Tensor]) -> set[BlockKey]:
    """The layers whose outputs differ anywhere."""
    assert a.keys() == b.keys()
    return {key for key in a if not torch.equal(a[key], b[key])}
