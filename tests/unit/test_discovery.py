"""The auto loader's file classification (models/discovery.py) and preset order (ip_adapter_core/presets.py).

The classification from headers must equal the detection from the whole file (the loader's own), for every
published layout in .safetensors and in legacy .bin; it must read no tensor data; and a folder whose files did
not change must cost no reads.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

from ipadapter_pack.ip_adapter_core import presets
from ipadapter_pack.ip_adapter_core.layout import detect, split_state_dict
from ipadapter_pack.models import discovery
from ipadapter_pack.models.files import read_state_dict
from tests.fixtures import faceid_files, generate

SD15, SDXL = generate.SD15_TINY_HIDDEN, generate.SDXL_TINY_HIDDEN

# (file stem, state dict builder): every layout the presets name, on tiny layer widths. Only shapes matter
# to detection, so the tensors are zeros (drawing random SDXL-depth adapters costs seconds each).


def zeros(spec) -> dict[str, torch.Tensor]:
    return {key: torch.zeros(shape, dtype=torch.float16) for key, shape, _ in spec}


def plain(kind: str, hidden: list[int], ctx: int):
    return lambda: zeros(generate._adapter_spec(kind, hidden, ctx))


def face(kind: str, hidden: list[int], ctx: int):
    return lambda: {k: torch.zeros(v.shape, dtype=torch.float16)
                    for k, v in faceid_files.faceid_state_dict(kind, hidden, ctx, 0, small=True, meta=True).items()}


LAYOUTS = {
    "sd15_base": plain("base", SD15, 768),
    "sd15_vitg": plain("vitg", SD15, 768),
    "sd15_plus": plain("plus", SD15, 768),
    "sd15_fullface": plain("fullface", SD15, 768),
    "sdxl_vith": plain("vith", SDXL, 2048),
    "sdxl_base": plain("base", SDXL, 2048),
    "sdxl_plus_vith": plain("plus_vith", SDXL, 2048),
    **{f"faceid_{kind}_{base}": face(kind, hidden, ctx)
       for kind in faceid_files.FACEID_KINDS for base, hidden, ctx in (("sd15", SD15, 768), ("sdxl", SDXL, 2048))
       if not (kind == "faceid_portrait_unnorm" and base == "sd15")},
}


@functools.cache
def built(stem: str) -> dict[str, torch.Tensor]:
    return LAYOUTS[stem]()


def write(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    return faceid_files.write(tensors, path)


@pytest.mark.parametrize("ext", ["safetensors", "bin"])
@pytest.mark.parametrize("stem", sorted(LAYOUTS))
def test_header_classification_equals_full_detection(tmp_path, stem, ext):
    path = write(built(stem), tmp_path / f"{stem}.{ext}")
    found = discovery.classify(str(path))
    assert found.kind == "adapter", found.reason
    assert found.spec == detect(split_state_dict(read_state_dict(str(path))))


def test_safetensors_reads_only_the_header(tmp_path):
    """The header alone (tensor data cut off) classifies the same: nothing past it is read."""
    path = write(built("sdxl_plus_vith"), tmp_path / "full.safetensors")
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[:8 + length])
    assert len(raw) > 20 * (8 + length)
    assert discovery.classify(str(cut)).spec == discovery.classify(str(path)).spec


def read_bytes_of_this_process() -> int:
    with open("/proc/self/io", encoding="ascii") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io to count bytes read")
def test_bin_reads_a_small_part_of_the_file(tmp_path):
    # Real SDXL widths (about 100 MB in fp16); the values do not matter here, so zeros.
    path = write(plain("plus_vith", generate.SDXL_REAL_HIDDEN, 2048)(), tmp_path / "big.bin")
    size = path.stat().st_size
    before = read_bytes_of_this_process()
    found = discovery.classify(str(path))
    read = read_bytes_of_this_process() - before
    assert found.kind == "adapter" and found.spec.variant == "plus"
    assert read < 0.05 * size, f"read {read} of {size} bytes to classify a .bin"


def test_a_pickle_with_code_is_other_and_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.bin"
    torch.save({"image_proj": {"x": Payload()}}, path, pickle_module=pickle)
    found = discovery.classify(str(path))
    assert found.kind == "other" and "evil.bin" in found.reason
    assert not marker.exists()


def header_only(path: Path, shapes: dict[str, list[int]]) -> Path:
    header = json.dumps({k: {"dtype": "F16", "shape": s, "data_offsets": [0, 0]} for k, s in shapes.items()}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def tower_keys(layers: int, width: int, positions: int, prefix: str = "vision_model.") -> dict[str, list[int]]:
    keys = {f"{prefix}embeddings.position_embedding.weight": [positions, width]}
    for i in range(layers):
        keys[f"{prefix}encoder.layers.{i}.layer_norm1.weight"] = [width]
    return keys


@pytest.mark.parametrize("layers,width,positions,tower", [
    (32, 1280, 257, "ViT-H"), (48, 1664, 257, "ViT-bigG"), (24, 1024, 257, "ViT-L"), (24, 1024, 577, "ViT-L-336"),
    (27, 1152, 729, "SigLIP-384"), (12, 768, 197, ""),
])
def test_clip_vision_towers(tmp_path, layers, width, positions, tower):
    found = discovery.classify(str(header_only(tmp_path / "v.safetensors", tower_keys(layers, width, positions))))
    assert (found.kind, found.tower) == (("clip_vision", tower) if tower else ("other", ""))


def test_open_clip_layout_tower(tmp_path):
    keys = {f"visual.transformer.resblocks.{i}.ln_1.weight": [1280] for i in range(32)}
    assert discovery.classify(str(header_only(tmp_path / "oc.safetensors", keys))).tower == "ViT-H"


def test_generated_clip_vision_file(models_root_clip_h):
    assert discovery.classify(str(models_root_clip_h)).tower == "ViT-H"


@pytest.fixture(scope="module")
def models_root_clip_h() -> Path:
    return generate.ensure("clip_vision/vit_h.safetensors")["clip_vision/vit_h.safetensors"]


def test_index_reads_a_file_again_only_when_it_changes(tmp_path):
    a = write(built("sd15_base"), tmp_path / "a.safetensors")
    b = write(built("sd15_plus"), tmp_path / "b.safetensors")
    index = discovery.FileIndex()
    files = [("a.safetensors", str(a)), ("b.safetensors", str(b))]
    first = index.scan(files)
    assert index.reads == 2 and [k.spec.variant for *_, k in first] == ["base", "plus"]
    index.scan(files)
    assert index.reads == 2
    write(built("sd15_fullface"), a)  # same name, new content
    os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 10**9))
    third = index.scan(files)
    assert index.reads == 3 and third[0][3].spec.variant == "full-face"


# --- preset order ----------------------------------------------------------------------------------


def test_rank_prefers_the_published_name_then_the_preset_word_then_the_newest():
    light = presets.PRESETS["light"].for_base("SD1.5")
    standard = presets.PRESETS["standard"].for_base("SD1.5")
    names = [("my_adapter.safetensors", 3), ("ip-adapter_sd15_light.bin", 1), ("ip-adapter_sd15_light_v11.bin", 0)]
    assert sorted(names, key=lambda n: presets.rank_key(light, *n))[0][0] == "ip-adapter_sd15_light_v11.bin"
    assert sorted(names[:2], key=lambda n: presets.rank_key(light, *n))[0][0] == "ip-adapter_sd15_light.bin"
    assert sorted(names[:2], key=lambda n: presets.rank_key(standard, *n))[0][0] == "my_adapter.safetensors"
    newer = [("x/a.safetensors", 1), ("x/b.safetensors", 2)]
    assert sorted(newer, key=lambda n: presets.rank_key(standard, *n))[0][0] == "x/b.safetensors"


def test_presets_name_only_layouts_the_detector_knows():
    """Every preset's variant/encoder pair is one that detection produces for the files above."""
    produced = {(spec.variant, spec.encoder, spec.base_model) for spec in (
        detect(split_state_dict(built(stem))) for stem in LAYOUTS)}
    for preset in presets.PRESETS.values():
        for base, wanted in preset.files.items():
            assert (wanted.variant, wanted.encoder, base) in produced or wanted.encoder == "ViT-bigG" and (
                wanted.variant, "ViT-bigG", base) in produced, (preset.name, base, wanted)
