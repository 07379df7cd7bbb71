"""Load IP-Adapter (auto) and its FaceID twin, in-process, on model folders of the test's own making: files
are found by their tensors whatever their names, missing pieces are all named in one error with their
published names and folders, a file for another base is never picked, a second prompt reads nothing, and
the outputs plug into Encode and Apply."""

from __future__ import annotations

import os
import shutil

import pytest
import torch


@pytest.fixture
def folders(pack, comfy_inprocess, tmp_path, monkeypatch):
    """Empty ipadapter / clip_vision / insightface folders, registered in place of the suite's own."""
    folder_paths = comfy_inprocess.folder_paths
    made = {}
    for name in ("ipadapter", "clip_vision", "insightface"):
        path = tmp_path / name
        path.mkdir()
        exts = folder_paths.folder_names_and_paths.get(name, ([], {".safetensors"}))[1]
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(path)], set(exts) | {".bin"}))
        made[name] = path
    return made


def put(models, folders, fixture: str, folder: str, as_name: str):
    """A generated fixture under another name (a link: the big encoders are not copied)."""
    target = folders[folder] / as_name
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(models[fixture], target)
    return target


def node(pack, name):
    return pack.NODE_CLASS_MAPPINGS[name]()


def test_finds_by_tensors_and_plugs_into_encode_and_apply(pack, models, folders, sd15):
    from ipadapter_pack.nodes.comfy_seam import ADAPTERS, FILE_INDEX

    put(models, folders, "ipadapter/sd15_tiny_plus.safetensors", "ipadapter", "my favourite.safetensors")
    put(models, folders, "ipadapter/sd15_tiny_base.safetensors", "ipadapter", "other.safetensors")
    put(models, folders, "clip_vision/vit_h.safetensors", "clip_vision", "encoder.safetensors")

    ipadapter, clip_vision, info = node(pack, "IPAdapterExactAutoLoader").load(sd15, "plus")
    assert ipadapter.spec.variant == "plus" and ipadapter.spec.base_model == "SD1.5"
    assert ipadapter is ADAPTERS.get(str(folders["ipadapter"] / "my favourite.safetensors"))  # one copy per file
    assert "my favourite.safetensors" in info and "encoder.safetensors (ViT-H)" in info

    reads = FILE_INDEX.reads
    node(pack, "IPAdapterExactAutoLoader").load(sd15, "plus")
    assert FILE_INDEX.reads == reads, "a second prompt on unchanged folders read file headers again"

    with torch.inference_mode():
        image = torch.rand(1, 224, 224, 3, generator=torch.Generator().manual_seed(0))
        embeds = node(pack, "IPAdapterExactEncode").encode(ipadapter, clip_vision, image, "center", "zeros")[0]
        patched = node(pack, "IPAdapterExactApply").apply(sd15, ipadapter, embeds, 1.0, "V only", 0.0, 1.0,
                                                          "concat")[0]
    table = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert len(table) == len(ipadapter.spec.layers)
    assert "patches_replace" not in sd15.model_options.get("transformer_options", {}), "the input MODEL changed"


def test_every_missing_piece_in_one_error(pack, folders, sd15):
    with pytest.raises(FileNotFoundError) as caught:
        node(pack, "IPAdapterExactAutoLoader").load(sd15, "full face")
    message = str(caught.value)
    assert f"ip-adapter-full-face_sd15.safetensors into {folders['ipadapter']}" in message
    assert f"CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors (ViT-H) into {folders['clip_vision']}" in message
    assert "huggingface.co/h94/IP-Adapter" in message


def test_a_file_for_another_base_is_named_never_picked(pack, models, folders, sd15):
    put(models, folders, "ipadapter/sdxl_tiny_plus_vith.safetensors", "ipadapter", "ip-adapter-plus_sd15.safetensors")
    put(models, folders, "clip_vision/vit_h.safetensors", "clip_vision", "vit-h.safetensors")
    with pytest.raises(FileNotFoundError) as caught:
        node(pack, "IPAdapterExactAutoLoader").load(sd15, "plus")
    message = str(caught.value)
    assert "needs: ip-adapter-plus_sd15.safetensors into" in message
    # Its name lied; its tensors did not.
    assert "ip-adapter-plus_sd15.safetensors is a plus adapter for SDXL" in message
    assert "CLIP" not in message.split("Found")[0], "the encoder was there and must not be reported missing"


def test_same_layout_trainings_ordered_by_name_and_said(pack, models, folders, sd15):
    light = put(models, folders, "ipadapter/sd15_tiny_base.safetensors", "ipadapter",
                "ip-adapter_sd15_light.safetensors")
    put(models, folders, "clip_vision/vit_h.safetensors", "clip_vision", "vit-h.safetensors")
    _, _, info = node(pack, "IPAdapterExactAutoLoader").load(sd15, "light")
    assert "ip-adapter_sd15_light.safetensors" in info and "suggests" not in info
    _, _, info = node(pack, "IPAdapterExactAutoLoader").load(sd15, "standard")
    assert "ip-adapter_sd15_light.safetensors" in info and "suggests another training" in info  # only one: said so
    shutil.copy(light, folders["ipadapter"] / "plain.safetensors")
    _, _, info = node(pack, "IPAdapterExactAutoLoader").load(sd15, "standard")
    assert "plain.safetensors" in info and "suggests" not in info


def test_preset_without_a_file_for_this_base(pack, folders, sd15):
    with pytest.raises(ValueError, match="exists for SDXL only; this model is SD1.5"):
        node(pack, "IPAdapterExactFaceIDAutoLoader").load(sd15, "faceid portrait unnorm", 0.6, "CPU")


def test_faceid_finds_adapter_pack_and_crop_encoder(pack, comfy_inprocess, models, folders, sd15):
    from tests.fixtures import face_models, faceid_files

    face_models.ensure_pack("buffalo_l")
    files = faceid_files.ensure_faceid("ipadapter/sd15_tiny_faceid_plus.safetensors")
    os.symlink(files["ipadapter/sd15_tiny_faceid_plus.safetensors"], folders["ipadapter"] / "face thing.safetensors")

    with pytest.raises(FileNotFoundError) as caught:  # neither the encoder nor the insightface pack yet
        node(pack, "IPAdapterExactFaceIDAutoLoader").load(sd15, "faceid plus v2", 0.6, "CPU")
    message = str(caught.value)
    assert "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors" in message and "buffalo_l" in message
    assert "ip-adapter-faceid" not in message  # the adapter itself was found

    put(models, folders, "clip_vision/vit_h.safetensors", "clip_vision", "h.safetensors")
    pack_dir = face_models.INSIGHTFACE_ROOT / "models" / "buffalo_l"
    (folders["insightface"] / "models").mkdir()
    os.symlink(pack_dir, folders["insightface"] / "models" / "buffalo_l")
    ipadapter, faces, clip_vision, strength, info = node(pack, "IPAdapterExactFaceIDAutoLoader").load(
        sd15, "faceid plus v2", 0.45, "CPU")
    assert ipadapter.spec.variant == "faceid-plus" and strength == 0.45 and clip_vision is not None
    assert "face thing.safetensors" in info and "insightface" in info
    with torch.inference_mode():
        from tests.fixtures.face_models import one_face

        encoded = node(pack, "IPAdapterExactEncodeFace").encode(ipadapter, faces, one_face()[0][None], 0, clip_vision)
    assert encoded[0].cond.shape[-1] == 512


def test_an_adapter_for_other_unet_widths_is_not_picked(pack, models, folders, sd15):
    """The suite's SD1.5 is 320 wide at every level; an adapter for SD1.5's real widths cannot serve it."""
    put(models, folders, "ipadapter/sd15_plus.safetensors", "ipadapter", "ip-adapter-plus_sd15.safetensors")
    put(models, folders, "clip_vision/vit_h.safetensors", "clip_vision", "vit-h.safetensors")
    with pytest.raises(FileNotFoundError, match="made for a UNet of other layer widths"):
        node(pack, "IPAdapterExactAutoLoader").load(sd15, "plus")
    put(models, folders, "ipadapter/sd15_tiny_plus.safetensors", "ipadapter", "fits.safetensors")
    ipadapter, _, info = node(pack, "IPAdapterExactAutoLoader").load(sd15, "plus")
    assert "fits.safetensors" in info and ipadapter.spec.variant == "plus"
