"""FaceID through the pack's nodes, in-process: Load InsightFace on generated stand-in packs, Encode
Face (face found, crops shown, CLIP crop states for Plus), Apply FaceID (tokens, the file's LoRA
through ComfyUI's patching, the input model untouched), and clear refusals."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def faceid(pack, comfy_inprocess):
    """The pack's nodes with the stand-in insightface packs and FaceID files registered."""
    from tests.fixtures import face_models, faceid_files

    face_models.ensure_pack("buffalo_l")
    faceid_files.ensure_faceid(*(f"ipadapter/{n}.safetensors" for n in
                                 ("sd15_tiny_faceid", "sd15_tiny_faceid_plus", "sd15_tiny_faceid_portrait")))
    folder_paths = comfy_inprocess.folder_paths
    folder_paths.add_model_folder_path("insightface", str(face_models.INSIGHTFACE_ROOT))
    folder_paths.add_model_folder_path("ipadapter", str(faceid_files.FACEID_ROOT / "ipadapter"))
    return pack.NODE_CLASS_MAPPINGS


def node(nodes, name):
    return nodes[name]()


@pytest.fixture(scope="module")
def face_analysis(faceid):
    return node(faceid, "IPAdapterExactLoadInsightFace").load("buffalo_l", "CPU")[0]


def one_face_picture() -> torch.Tensor:
    from tests.fixtures.face_models import one_face

    return one_face()[0][None]


def load(nodes, stem):
    return node(nodes, "IPAdapterExactLoader").load(f"{stem}.safetensors")[0]


def test_insightface_loader_lists_and_loads_packs(faceid, face_analysis):
    choices = faceid["IPAdapterExactLoadInsightFace"].INPUT_TYPES()["required"]["model_pack"][0]
    assert "buffalo_l" in choices and face_analysis.name == "buffalo_l"
    with pytest.raises(FileNotFoundError, match="no insightface model pack 'nope'.*models/insightface|nope"):
        node(faceid, "IPAdapterExactLoadInsightFace").load("nope", "CPU")


@torch.inference_mode()
def test_encode_face_finds_the_face_and_shows_the_crop(faceid, face_analysis):
    picture = one_face_picture()
    adapter = load(faceid, "sd15_tiny_faceid")
    embeds, crops = node(faceid, "IPAdapterExactEncodeFace").encode(adapter, face_analysis, picture, 0)
    assert embeds.output == "arcface" and embeds.cond.shape == (1, 512)
    torch.testing.assert_close(embeds.cond.norm(dim=-1), torch.ones(1))
    assert torch.equal(embeds.uncond, torch.zeros(1, 512))  # the reference negative
    assert crops.shape == (1, 224, 224, 3)
    # the crop is the drawn face (norm_crop maps the drawn square onto the crop): skin, not background
    skin = torch.tensor([230.0, 180.0, 150.0]) / 255
    torch.testing.assert_close(crops[0, 4:24, 4:24].mean((0, 1)), skin, atol=0.08, rtol=0)


@torch.inference_mode()
def test_no_face_names_the_picture(faceid, face_analysis):
    from tests.fixtures.face_models import no_face

    adapter = load(faceid, "sd15_tiny_faceid")
    pictures = torch.cat([one_face_picture(), no_face()[None]])
    with pytest.raises(ValueError, match="No face found in image 2 of 2"):
        node(faceid, "IPAdapterExactEncodeFace").encode(adapter, face_analysis, pictures, 0)


@torch.inference_mode()
def test_apply_faceid_adds_the_lora_on_a_clone(faceid, face_analysis, sd15):
    adapter = load(faceid, "sd15_tiny_faceid")
    embeds, _ = node(faceid, "IPAdapterExactEncodeFace").encode(adapter, face_analysis, one_face_picture(), 0)
    before = dict(sd15.patches)
    apply = node(faceid, "IPAdapterExactApplyFaceID")
    (patched,) = apply.apply(sd15, adapter, embeds, 1.0, "v2", 1.0, 0.8, "V only", 0.0, 1.0, "concat")
    lora = adapter.model.lora_patches()
    assert len(lora) == 16 * 2 * 4  # q, k, v, out of attn1 and attn2 in all 16 transformer blocks
    assert set(lora) <= set(patched.patches) and sd15.patches == before
    strengths = {patched.patches[k][-1][0] for k in lora}  # (strength_patch, patch, strength_model, ...)
    assert strengths == {0.8}
    # the LoRA is the adapter's own tensors, not copies
    key = next(iter(lora))
    patch = patched.patches[key][-1][1]
    up = patch.weights[0] if hasattr(patch, "weights") else patch[1][0]
    assert up.data_ptr() == lora[key][0].data_ptr()
    (no_lora,) = apply.apply(sd15, adapter, embeds, 1.0, "v2", 1.0, 0.0, "V only", 0.0, 1.0, "concat")
    assert not set(lora) & set(no_lora.patches)


@torch.inference_mode()
def test_plus_needs_and_uses_the_clip_crop(faceid, face_analysis, vit_h, sd15):
    adapter = load(faceid, "sd15_tiny_faceid_plus")
    encode = node(faceid, "IPAdapterExactEncodeFace")
    with pytest.raises(ValueError, match="connect the ViT-H CLIP vision model"):
        encode.encode(adapter, face_analysis, one_face_picture(), 0)
    embeds, _ = encode.encode(adapter, face_analysis, one_face_picture(), 0, clip_vision=vit_h)
    assert embeds.crop_cond.shape == (1, 257, 1280) and embeds.crop_uncond.shape == (1, 257, 1280)
    apply = node(faceid, "IPAdapterExactApplyFaceID")
    tokens = {}
    for version, structure in (("v2", 1.0), ("v2", 2.0), ("v1", 1.0)):
        (patched,) = apply.apply(sd15, adapter, embeds, 1.0, version, structure, 1.0, "V only", 0.0, 1.0, "concat")
        table = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
        tokens[(version, structure)] = next(iter(table.values())).application.cond_tokens
    assert not torch.allclose(tokens[("v2", 1.0)], tokens[("v2", 2.0)])  # s_scale acts with the shortcut
    assert not torch.allclose(tokens[("v2", 1.0)], tokens[("v1", 1.0)])  # v1 has no shortcut


@torch.inference_mode()
def test_portrait_takes_every_face_and_refuses_plain_encode(faceid, face_analysis, vit_h):
    from tests.fixtures.face_models import two_faces

    adapter = load(faceid, "sd15_tiny_faceid_portrait")
    picture, _, _ = two_faces()
    embeds, crops = node(faceid, "IPAdapterExactEncodeFace").encode(adapter, face_analysis, picture[None], -1)
    assert embeds.cond.shape == (2, 512) and crops.shape[0] == 2
    with pytest.raises(ValueError, match="use IP-Adapter Encode Face"):
        node(faceid, "IPAdapterExactEncode").encode(adapter, vit_h, picture[None], "center", "reference (zero)")
