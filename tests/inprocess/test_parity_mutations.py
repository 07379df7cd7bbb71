"""The parity comparison has teeth: wrong adapters fail it, in the suite, every run.

One comparison (tests/harness/parity.py `sampler_parity`: ComfyUI's sampler vs diffusers' CFG
step, max |ours - diffusers| / max |diffusers| <= 1e-4) judges the real application first, which
must pass, and then mutants of it, each of which must fail:

* a layer's patch dropped from the patched model's attn2 table: the middle block
  ("middle", 0, 0) on SD1.5 and SDXL, and SDXL output layers (the InstantStyle style layer
  ("output", 1, 0), and the last cross-attention layer of the UNet, ("output", 5, 1));
* the adapter's key numbering shifted by one layer (`ip_adapter.N.*` -> `N+2`, the last wrapping
  to the first) in the state dict before the pack loads it. The UNets here have equal attn2
  widths on every adapter layer (see below), so the shifted file passes every shape check and
  only the numbers can tell;
* cond and uncond image tokens swapped on the application (`cond_tokens` <-> `uncond_tokens`).

UNets: SD1.5's and SDXL's topologies (16 and 70 cross-attention layers, real depths and head
layouts) with every level 320 wide (parity.build_pair(narrow=True): 111M and 283M parameters
instead of 860M/870M, which keeps this module to seconds per comparison and out of the memory
two full SDXL copies need), 16x16 latents.
"""

from __future__ import annotations

import gc

import pytest
import torch
from safetensors.torch import save_file

from tests.fixtures.generate import adapter_state_dict
from tests.harness import parity
from tests.harness.parity import TOLERANCE, record

WEIGHT = 0.8
LATENT = (16, 16)
DROPPED = {"SD1.5": [("middle", 0, 0)], "SDXL": [("middle", 0, 0), ("output", 1, 0), ("output", 5, 1)]}
KIND = {"SD1.5": ("base", "base"), "SDXL": ("sdxl_base", "base")}  # (encodings, adapter kind)


def shifted(flat: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """`ip_adapter.N.*` renumbered N -> N+2 (one layer on), the last layer's weights to the first."""
    out = {}
    for key, value in flat.items():
        head, rest = key.split(".", 1)
        if head == "ip_adapter":
            number, tail = rest.split(".", 1)
            key = f"ip_adapter.{(int(number) + 1) % (2 * layers) + 1}.{tail}"
        out[key] = value
    return out


class Setup:
    def __init__(self, pair, folder):
        apply_adapter, self.cache, image_embeds = parity.pack_api()
        self.pair = pair
        enc_kind, kind = KIND[pair.base_model]
        sizes = parity.hidden_sizes(pair.diffusers)
        assert len(set(sizes)) == 1, f"attn2 widths {sorted(set(sizes))}: a shifted file would not load"
        self.flat = adapter_state_dict(kind, sizes, pair.context_dim, seed=51)
        self.layers = len(sizes)
        self.folder = folder
        gen = torch.Generator().manual_seed(52)
        cond, uncond = parity.encodings(enc_kind, 1, gen)
        self.step = parity.make_step(pair, LATENT, batch=1, seed=53)
        with torch.inference_mode():
            parity.load_diffusers_adapter(pair.diffusers, self.flat, WEIGHT)
            self.ref = parity.reference(pair, self.step, image_embeds=torch.cat([uncond, cond])[:, None])
        self.apply = lambda flat, name: apply_adapter(
            pair.comfy, self.load(flat, name), image_embeds(cond, uncond, self.load(flat, name).spec.encoder_output),
            WEIGHT)
        self.patched = self.apply(self.flat, "adapter")

    def load(self, flat, name):
        path = self.folder / f"{name}.safetensors"
        if not path.exists():
            save_file(flat, str(path))
        return self.cache.get(str(path))

    def compare(self, model, what: str) -> float:
        diff, _ = parity.sampler_parity(model, self.ref)
        record(f"{'mutant: ' if what else ''}sampler {self.pair.base_model}-narrow {what or 'real'}", diff)
        return diff


@pytest.fixture(scope="module", params=["SD1.5", "SDXL"])
def setup(request, comfy_inprocess, tmp_path_factory):
    pair = parity.build_pair(request.param, seed=17, narrow=True, share_weights=True)
    built = Setup(pair, tmp_path_factory.mktemp(f"mutations_{request.param}"))
    yield built
    del built, pair
    gc.collect()


@pytest.mark.slow
@torch.inference_mode()
def test_real_application_passes(setup):
    diff = setup.compare(setup.patched, "")
    assert diff <= TOLERANCE, f"{setup.pair.base_model}: the unmutated adapter differs by {diff:.2e}"


@pytest.mark.slow
@torch.inference_mode()
def test_dropped_layer_fails(setup):
    for key in DROPPED[setup.pair.base_model]:
        mutant = setup.patched.clone()
        table = parity.attn2_table(mutant)
        assert key in table, f"{key} is not patched"
        del table[key]
        assert key in parity.attn2_table(setup.patched), "dropping from a clone changed the original"
        diff = setup.compare(mutant, f"patch {key} dropped")
        assert diff > TOLERANCE, f"{setup.pair.base_model}: dropping {key} went unseen ({diff:.2e})"


@pytest.mark.slow
@torch.inference_mode()
def test_shifted_key_numbering_fails(setup):
    mutant = setup.apply(shifted(setup.flat, setup.layers), "shifted")
    diff = setup.compare(mutant, "key numbering shifted by one layer")
    assert diff > TOLERANCE, f"{setup.pair.base_model}: shifted adapter keys went unseen ({diff:.2e})"


@pytest.mark.slow
@torch.inference_mode()
def test_swapped_cond_uncond_tokens_fail(setup):
    mutant = setup.apply(setup.flat, "adapter")  # a fresh application: the real one stays as it is
    (application,) = parity.applications(mutant)
    assert application is not parity.applications(setup.patched)[0]
    application.cond_tokens, application.uncond_tokens = application.uncond_tokens, application.cond_tokens
    diff = setup.compare(mutant, "cond and uncond image tokens swapped")
    assert diff > TOLERANCE, f"{setup.pair.base_model}: swapped cond/uncond tokens went unseen ({diff:.2e})"
