"""Saving and loading encodings: .safetensors only, what they are recorded, mismatches refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file


def test_round_trip_and_refusals(comfy_inprocess, tmp_path):
    import folder_paths

    from ipadapter_pack.ip_adapter_core.embeds import ImageEmbeds
    from ipadapter_pack.ip_adapter_core.layout import AdapterFormatError
    from ipadapter_pack.nodes import NODE_CLASS_MAPPINGS
    from ipadapter_pack.nodes.apply import check_embeds
    from ipadapter_pack.nodes.comfy_seam import ADAPTERS

    embeds = ImageEmbeds(torch.randn(2, 257, 1280), torch.randn(1, 257, 1280), "penultimate")
    out = NODE_CLASS_MAPPINGS["IPAdapterExactSaveEmbeds"]().save(embeds, "roundtrip")
    name = out["ui"]["text"][0]
    assert name.endswith(".safetensors")
    assert name in folder_paths.get_filename_list("ipadapter_embeds")
    (loaded,) = NODE_CLASS_MAPPINGS["IPAdapterExactLoadEmbeds"]().load(name)
    assert torch.equal(loaded.cond, embeds.cond) and torch.equal(loaded.uncond, embeds.uncond)
    assert loaded.output == "penultimate"

    # Saved plus encodings do not fit a base adapter: refused with both sides named.
    base = ADAPTERS.get(str(comfy_inprocess.models["ipadapter/sd15_tiny_base.safetensors"]))
    with pytest.raises(ValueError, match="takes ViT-H image_embeds of 1024; these embeds are penultimate of 1280"):
        check_embeds(base, loaded)

    from ipadapter_pack.models.files import load_embeds

    foreign = tmp_path / "foreign.safetensors"
    save_file({"cond": torch.zeros(1, 1024), "uncond": torch.zeros(1, 1024)}, str(foreign))
    with pytest.raises(AdapterFormatError, match="not an embeddings file saved by this pack"):
        load_embeds(str(foreign))
    pickled = tmp_path / "embeds.pt"
    torch.save({"cond": torch.zeros(1)}, pickled)
    with pytest.raises(AdapterFormatError, match=".safetensors files only"):
        load_embeds(str(pickled))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(foreign.read_bytes()[:40])
    with pytest.raises(AdapterFormatError, match="truncated or corrupt"):
        load_embeds(str(broken))
