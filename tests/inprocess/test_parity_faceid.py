"""FaceID parity with diffusers, full UNet, through ComfyUI's sampler path (fp32).

Every FaceID variant is loaded into diffusers by diffusers' own `IPAdapterMixin.load_ip_adapter`
(projection and to_k_ip/to_v_ip through `_load_ip_adapter_weights`, the file's LoRA through
`_load_ip_adapter_loras` + `load_lora_weights` into PEFT: tests/harness/faceid_parity.py) and
into the pack from the same .safetensors by `ADAPTERS.get` + `apply_adapter(..., faceid=...)`
(LoRA through ComfyUI's add_patches). One CFG step of ComfyUI's KSampler path on the patched
MODEL (tests/harness/parity.py: step 12 of a 20-step normal schedule, CFG 5, Euler, cond and
uncond in one batch) is compared with diffusers' UNet doing the same CFG step on the same inputs,
negative half first. Faces are random unit vectors (raw: norms 20-28) for ArcFace, random
[1, 257, 1280] states for the face crops of Plus; the negative is a zero face embedding (and a
given uncond crop state), diffusers getting `torch.cat([negative, positive])`.

UNets: SD1.5's and SDXL's real topologies (16 / 70 cross-attention layers, heads, context
768 / 2048) with every level 320 wide (parity.build_pair narrow): the FaceID LoRA covers every
attn1/attn2 projection either way, and the narrow pairs keep the module under 5 GB and a few CPU
minutes. LoRA rank 128 (the published one) on SD1.5, 4 on SDXL. Variants: SD1.5 FaceID, FaceID
Plus v1 (no shortcut), Plus v2 (shortcut; s_scale 1 and 0.6), Portrait (3 faces); SDXL FaceID,
Plus v2, Portrait (2 faces), unnorm Portrait (2 raw faces). Each base model starts with the bare
pair through the sampler, so a mismatch is FaceID's. Tolerance: max |ours - diffusers| /
max |diffusers| of the CFG noise prediction <= 1e-4.

Mutants, each of which must fail the same comparison: the LoRA dropped (lora_strength 0 on our
side against diffusers with the LoRA; SD1.5 and SDXL, whose LoRA maps differ), the shortcut
dropped on Plus v2 (v1 on our side, SD1.5 s_scale 0.6), and Portrait's faces averaged into one
(combine "average" instead of every face's tokens, SD1.5). Faces in another order is no mutant at
this level: attention over concatenated tokens does not depend on their order (measured: 5e-6,
at the parity floor); the projection-level test checks the order of the tokens themselves.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file

from tests.fixtures.faceid_files import FACEID_KINDS, faceid_state_dict
from tests.harness import faceid_parity as fp
from tests.harness import parity
from tests.harness.parity import TOLERANCE, record, relative_difference

log = logging.getLogger(__name__)

LATENT = (16, 16)  # 128 px: SD1.5 down to 2x2, SDXL to 4x4
WEIGHT = 0.8


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # tests/fixtures/faceid_files.py kind
    faces: int = 1
    plus_v2: bool = True  # FaceID Plus: shortcut on (v2) or off (v1)
    s_scale: float = 1.0
    raw: bool = False  # unnorm portrait: raw ArcFace embeddings
    mutants: tuple[str, ...] = ()

    @property
    def plus(self) -> bool:
        return self.kind == "faceid_plus"


BARE = Case("bare", "")  # no adapter: the two UNets agree, so a mismatch below belongs to FaceID
CASES = {
    "SD1.5": [
        BARE,
        Case("faceid", "faceid", mutants=("lora dropped",)),
        Case("plus v1", "faceid_plus", plus_v2=False),
        Case("plus v2", "faceid_plus"),
        Case("plus v2 s_scale 0.6", "faceid_plus", s_scale=0.6, mutants=("shortcut dropped",)),
        Case("portrait", "faceid_portrait", faces=3, mutants=("faces averaged",)),
    ],
    "SDXL": [
        BARE,
        Case("faceid", "faceid", mutants=("lora dropped",)),
        Case("plus v2", "faceid_plus"),
        Case("portrait", "faceid_portrait", faces=2),
        Case("portrait unnorm", "faceid_portrait_unnorm", faces=2, raw=True),
    ],
}
# In this order: each pair is built once, SD1.5's freed before SDXL's is built (see Pairs).
PARAMS = [(base, case) for base, cases in CASES.items() for case in cases]


@contextlib.contextmanager
def timed(what: str):
    """Logs wall and CPU seconds of a phase (the log is captured, nothing is printed)."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    log.info("%s: %.1f s wall, %.1f s CPU", what, time.perf_counter() - wall, time.process_time() - cpu)


class Pairs:
    """One UNet pair per base model, built on first use; the previous base's pair is freed first,
    so SD1.5's and SDXL's pairs are never alive together."""

    def __init__(self, folder):
        self.folder = folder
        self.current = None

    def get(self, base_model: str):
        if self.current is not None and self.current.base_model == base_model:
            return self.current
        self.clear()
        with timed(f"{base_model} pair"):
            # Separate weights (not share_weights): ComfyUI writes the FaceID LoRA into its own.
            built = parity.build_pair(base_model, seed=4, narrow=True)
        built.step = parity.make_step(built, LATENT, batch=1, seed=5)
        built.folder = self.folder / base_model
        built.folder.mkdir()
        with torch.inference_mode(), timed(f"{base_model} bare diffusers step"):
            built.bare = parity.reference(built, built.step)
        self.current = built
        return built

    def clear(self) -> None:
        self.current = None
        gc.collect()


@pytest.fixture(scope="module")
def pairs(comfy_inprocess, tmp_path_factory):
    built = Pairs(tmp_path_factory.mktemp("faceid_parity"))
    yield built
    built.clear()


def _inputs(case: Case, seed: int) -> fp.FaceInputs:
    face = fp.faces(case.faces, seed, raw=case.raw)
    if not case.plus:
        return fp.FaceInputs(face)
    return fp.FaceInputs(face, fp.crop_states(1, seed + 1), fp.crop_states(1, seed + 2))


@pytest.mark.slow
@pytest.mark.parametrize("base,case", PARAMS, ids=[f"{base}-{case.name}" for base, case in PARAMS])
@torch.inference_mode()
def test_faceid_through_sampler(pairs, base, case):
    from ipadapter_pack.nodes.apply import FaceIDOptions, apply_adapter
    from ipadapter_pack.nodes.comfy_seam import ADAPTERS

    pair = pairs.get(base)
    if case is BARE:
        with timed(f"{base} bare sampler step"):
            diff, _ = parity.sampler_parity(pair.comfy, pair.bare)
        record(f"sampler {base} fp32 faceid bare", diff)
        assert diff <= TOLERANCE, f"the bare UNets differ by {diff:.2e}: the comparison itself is off"
        return
    path = pair.folder / f"{case.kind}.safetensors"
    if not path.exists():  # Plus v1 and v2 are one file
        seed = 100 + FACEID_KINDS.index(case.kind)
        small = base == "SDXL" and case.kind in ("faceid", "faceid_plus")  # LoRA rank 4 (else 128)
        with timed(f"{base} {case.kind} file"):
            hidden = parity.hidden_sizes(pair.diffusers)
            flat = faceid_state_dict(case.kind, hidden, pair.context_dim, seed, small=small)
        save_file(flat, str(path))
        del flat
    inputs = _inputs(case, 200 + 10 * [c.name for c in CASES[base]].index(case.name))

    # diffusers: its own FaceID load of the file, LoRA included.
    with timed(f"{base} {case.name} diffusers load"):
        host = fp.load_faceid(pair.diffusers, base, path, WEIGHT, expect_lora=case.kind in ("faceid", "faceid_plus"))
    try:
        if case.plus:
            fp.set_plus_inputs(pair.diffusers, inputs, case.plus_v2, case.s_scale)
        with timed(f"{base} {case.name} diffusers step"):
            images = inputs.diffusers_image_embeds(sequence=case.kind == "faceid_portrait_unnorm")
            ref = parity.reference(pair, pair.step, image_embeds=images)
    finally:
        with timed(f"{base} {case.name} diffusers unload"):
            fp.unload_faceid(host)

    # The pack: the same file through its cache, the same faces, crops and negative.
    with timed(f"{base} {case.name} pack load + apply"):
        adapter = ADAPTERS.get(str(path))
        assert adapter.spec.is_faceid and adapter.spec.has_lora == (case.kind in ("faceid", "faceid_plus"))
        embeds = inputs.pack_embeds(adapter.spec.encoder_output)
        options = FaceIDOptions(plus_v2=case.plus_v2, s_scale=case.s_scale, lora_strength=1.0)
        patched = apply_adapter(pair.comfy, adapter, embeds, WEIGHT, faceid=options)
    with timed(f"{base} {case.name} sampler step"):
        diff, _ = parity.sampler_parity(patched, ref)
    effect = relative_difference(ref.eps, pair.bare.eps)
    record(f"sampler {base} fp32 faceid {case.name}", diff)
    record(f"sampler {base} fp32 faceid {case.name} adapter effect", effect)
    assert effect > 0.01, f"{case.name}: FaceID barely changes the CFG step ({effect:.2e}); the test has no teeth"
    assert diff <= TOLERANCE, f"{base} {case.name}: ours vs diffusers differ by {diff:.2e}"

    # Mutants: the same comparison must fail.
    for mutant in case.mutants:
        if mutant == "lora dropped":
            wrong = apply_adapter(pair.comfy, adapter, embeds, WEIGHT, faceid=FaceIDOptions(
                case.plus_v2, case.s_scale, lora_strength=0.0))
        elif mutant == "shortcut dropped":
            wrong = apply_adapter(pair.comfy, adapter, embeds, WEIGHT, faceid=FaceIDOptions(
                plus_v2=False, s_scale=case.s_scale))
        elif mutant == "faces averaged":  # one averaged face instead of every face's tokens (diffusers: concat)
            wrong = apply_adapter(pair.comfy, adapter, embeds, WEIGHT, combine_embeds="average", faceid=options)
        else:
            raise ValueError(mutant)
        with timed(f"{base} {case.name} mutant {mutant}"):
            mutant_diff, _ = parity.sampler_parity(wrong, ref)
        record(f"mutant: sampler {base} faceid {case.name} {mutant}", mutant_diff)
        assert mutant_diff > TOLERANCE, f"{base} {case.name}: '{mutant}' went unseen ({mutant_diff:.2e})"
        del wrong
    del patched, adapter
    gc.collect()
