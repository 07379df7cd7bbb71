"""Unit tests of the pure math in ip_adapter_core, each against an independent formula."""

from __future__ import annotations

import math

import pytest
import torch

from ipadapter_pack.ip_adapter_core import attention, embeds, images, masks, schedule
from ipadapter_pack.ip_adapter_core import layer_weights as blocks
from ipadapter_pack.ip_adapter_core.layout import SD15_LAYERS, SDXL_LAYERS


def naive_attention(q, k, v, heads):
    """Textbook multi-head attention, written out with explicit loops over heads."""
    b, n, inner = q.shape
    d = inner // heads
    out = torch.empty_like(q)
    for h in range(heads):
        s = slice(h * d, (h + 1) * d)
        weights = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d), dim=-1)
        out[..., s] = weights @ v[..., s]
    return out


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 64, 640, generator=g), torch.randn(2, 4, 640, generator=g),
            torch.randn(2, 4, 640, generator=g))


def test_v_only_scales_the_output(qkv):
    q, k, v = qkv
    got = attention.weighted_ip_attention(q, k, v, 10, 0.7, "V only")
    torch.testing.assert_close(got, 0.7 * naive_attention(q, k, v, 10), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty"])
def test_key_value_modes(qkv, mode):
    q, k, v = qkv
    w = 1.3
    if mode != "K+V":
        w = w * 640 / 1280  # channel penalty: C / 1280
    if mode.startswith("K+mean"):
        mean = v.mean(dim=1, keepdim=True)
        expected = naive_attention(q, k * w, (v - mean) + mean * w, 10)
    else:
        expected = naive_attention(q, k * w, v * w, 10)
    torch.testing.assert_close(attention.weighted_ip_attention(q, k, v, 10, 1.3, mode), expected, rtol=1e-5, atol=1e-5)


def test_unknown_weight_type_is_refused(qkv):
    with pytest.raises(ValueError, match="expected one of V only"):
        attention.weighted_ip_attention(*qkv, 10, 1.0, "Q only")


def test_schedule_window():
    w = schedule.ScheduleWindow(0.2, 0.6)
    assert not w.always_on and schedule.ScheduleWindow().always_on
    bounds = w.sigma_bounds(lambda p: 10.0 * (1 - p))  # a linear stand-in for percent_to_sigma
    assert bounds == (8.0, 4.0)
    assert w.contains(8.0, bounds) and w.contains(4.0, bounds) and w.contains(5.5, bounds)
    assert not w.contains(8.01, bounds) and not w.contains(3.9, bounds)
    with pytest.raises(ValueError, match="after end_at"):
        schedule.ScheduleWindow(0.8, 0.2)
    with pytest.raises(ValueError, match="between 0 and 1"):
        schedule.check_fractions(-0.1, 1.0)


@pytest.mark.parametrize("hw,levels", [((64, 64), [4096, 1024, 256, 64]), ((48, 80), [3840, 960, 240, 60]),
                                        ((33, 17), [561, 153, 45, 15])])
def test_token_grid_from_latent(hw, levels):
    for level, n in enumerate(levels):
        h, w = masks.token_grid(hw, n)
        assert (h, w) == (math.ceil(hw[0] / 2**level), math.ceil(hw[1] / 2**level))
    with pytest.raises(ValueError, match="do not tile"):
        masks.token_grid(hw, 7)


def test_mask_resizing_keeps_regions():
    mask = torch.zeros(1, 512, 768)
    mask[:, :, :384] = 1.0  # left half
    out = masks.mask_for_queries(mask, (64, 96), 16 * 24, batch=2)
    assert out.shape == (2, 16 * 24)
    grid = out[0].view(16, 24)
    assert grid[:, :11].min() > 0.99 and grid[:, 13:].abs().max() < 0.01
    two = torch.stack([torch.ones(8, 8), torch.zeros(8, 8)])
    padded = masks.mask_for_queries(two, (8, 8), 64, batch=3)  # the last mask fills the batch
    assert padded[0].min() > 0.99 and padded[1:].abs().max() < 1e-6
    with pytest.raises(ValueError, match="3 attention masks for a batch of 2 latents"):
        masks.mask_for_queries(torch.ones(3, 8, 8), (8, 8), 64, batch=2)
    with pytest.raises(ValueError, match="non-empty"):
        masks.check_mask(torch.zeros(1, 0, 8))


def test_presets_follow_the_block_map():
    style = blocks.preset_weights("style transfer", SDXL_LAYERS)
    assert {SDXL_LAYERS[i] for i, w in enumerate(style) if w} == {("output", 1, t) for t in range(10)}
    comp = blocks.preset_weights("composition", SDXL_LAYERS)
    assert {SDXL_LAYERS[i] for i, w in enumerate(comp) if w} == {("input", 8, t) for t in range(10)}
    # style transfer is InstantStyle's dictionary, composition its down-block counterpart
    assert style == blocks.dict_weights({"up": {"block_0": [0, 1, 0]}}, SDXL_LAYERS)
    assert comp == blocks.dict_weights({"down": {"block_2": [0, 1]}}, SDXL_LAYERS)
    sd15_style = blocks.preset_weights("style transfer", SD15_LAYERS)
    assert [SD15_LAYERS[i] for i, w in enumerate(sd15_style) if w] == [("output", 4, 0)]
    both = blocks.preset_weights("style and composition", SD15_LAYERS, style=0.5, composition=2.0)
    assert {SD15_LAYERS[i]: w for i, w in enumerate(both) if w} == {("output", 4, 0): 0.5, ("input", 8, 0): 2.0}
    weak = blocks.preset_weights("weak middle", SD15_LAYERS)
    assert [w for k, w in zip(SD15_LAYERS, weak, strict=True) if k[0] == "middle"] == [blocks.WEAK]
    ease = blocks.preset_weights("ease in", SD15_LAYERS)
    order = blocks.depth_order(SD15_LAYERS)
    assert [ease[i] for i in order] == sorted(ease) and ease[order[0]] == blocks.EASE_FLOOR and ease[order[-1]] == 1.0


def test_table_parsing_and_errors():
    table = blocks.parse_table("default=0, output 1 = 1\ninput 7.3: 0.25")
    weights = blocks.table_weights(table, SDXL_LAYERS)
    named = {SDXL_LAYERS[i]: w for i, w in enumerate(weights) if w}
    assert named == {**{("output", 1, t): 1.0 for t in range(10)}, ("input", 7, 3): 0.25}
    refined = blocks.LayerWeights.parse("weak input", "middle=0").for_layers(SD15_LAYERS)
    assert refined == [0.0 if k[0] == "middle" else blocks.WEAK if k[0] == "input" else 1.0 for k in SD15_LAYERS]
    assert blocks.table_weights(blocks.parse_table(",".join(["0.5"] * 16)), SD15_LAYERS) == [0.5] * 16
    with pytest.raises(ValueError, match="cannot read layer weight"):
        blocks.parse_table("output one = 1")
    with pytest.raises(ValueError, match="does not have"):
        blocks.table_weights(blocks.parse_table("input 3 = 1"), SD15_LAYERS)
    with pytest.raises(ValueError, match="16 layers"):
        blocks.table_weights([1.0, 2.0], SD15_LAYERS)
    with pytest.raises(ValueError, match="not valid JSON"):
        blocks.parse_block_dict("{up: 1}")
    with pytest.raises(ValueError, match="has no attention block block_3"):
        blocks.dict_weights({"up": {"block_3": 1}}, SDXL_LAYERS)
    with pytest.raises(ValueError, match="3 attentions"):
        blocks.dict_weights({"up": {"block_0": [1, 0]}}, SDXL_LAYERS)
    with pytest.raises(ValueError, match="not both"):
        blocks.LayerWeights.parse("linear", "default=1", '{"up": 1}')
    with pytest.raises(ValueError, match="unknown layer weights preset"):
        blocks.LayerWeights.parse("sideways")


def test_combine_modes():
    e = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert embeds.combine(e, "add").tolist() == [[4.0, 8.0]]
    assert embeds.combine(e, "subtract").tolist() == [[-2.0, -4.0]]
    assert embeds.combine(e, "average").tolist() == [[2.0, 4.0]]
    n1, n2 = math.sqrt(5), math.sqrt(45)
    expected = (e[0] * n1 + e[1] * n2) / (n1 + n2)
    torch.testing.assert_close(embeds.combine(e, "norm average")[0], expected)
    assert embeds.concat_tokens(torch.zeros(3, 4, 8)).shape == (1, 12, 8)
    a = embeds.ImageEmbeds(torch.zeros(2, 1024), torch.zeros(1, 1024), "image_embeds")
    b = embeds.ImageEmbeds(torch.zeros(1, 257, 1280), torch.zeros(1, 257, 1280), "penultimate")
    with pytest.raises(ValueError, match="same CLIP vision model"):
        embeds.merge(a, b)
    assert embeds.merge(a, a).cond.shape == (4, 1024) and embeds.merge(a, a).uncond.shape == (1, 1024)


def test_image_preparation():
    img = torch.arange(2 * 40 * 100 * 3, dtype=torch.float32).reshape(2, 40, 100, 3) / (2 * 40 * 100 * 3)
    assert torch.equal(images.square(img, "left"), img[:, :, :40])
    assert torch.equal(images.square(img, "right"), img[:, :, 60:])
    assert torch.equal(images.square(img, "center"), img[:, :, 30:70])
    padded = images.square(img, "pad")
    assert padded.shape == (2, 100, 100, 3) and torch.equal(padded[:, 30:70], img) and padded[0, 0, 0, 0] == 0.5
    tall = img.transpose(1, 2)
    assert torch.equal(images.square(tall, "top"), tall[:, :40])
    assert torch.equal(images.square(tall, "bottom"), tall[:, 60:])
    t = images.tiles(img)
    assert t.shape == (6, 40, 40, 3) and torch.equal(t[0], img[0, :, :40]) and torch.equal(t[2], img[0, :, 60:])
    with pytest.raises(ValueError, match="would make 100 tiles"):
        images.tiles(torch.zeros(1, 10, 1000, 3))
    gray = images.check_image(torch.rand(1, 8, 8, 1))
    assert gray.shape == (1, 8, 8, 3)
    assert images.check_image(torch.full((1, 4, 4, 4), 2.0)).max() == 1.0
    with pytest.raises(ValueError, match="non-empty"):
        images.check_image(torch.zeros(1, 0, 8, 3))
    with pytest.raises(ValueError, match="channels"):
        images.check_image(torch.zeros(1, 8, 8, 2))


class _FakeAdapter:
    """Key/value weights that count how often they are read: the cache must read each layer once."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.kv = torch.nn.ModuleList(torch.nn.Module() for _ in range(2))
        for m in self.kv:
            m.to_k_ip = torch.nn.Linear(8, 16, bias=False)
            m.to_v_ip = torch.nn.Linear(8, 16, bias=False)
            torch.nn.init.normal_(m.to_k_ip.weight, generator=g)
            torch.nn.init.normal_(m.to_v_ip.weight, generator=g)
        self.reads = 0

    def key_value(self, i):
        self.reads += 1
        return self.kv[i]


def test_image_term_uses_cond_and_uncond_tokens_per_chunk_and_caches_kv():
    adapter = _FakeAdapter()
    cond, uncond = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    app = attention.IPApplication(adapter, cond, uncond, weight=0.5)
    q = torch.randn(4, 5, 16)  # [uncond x2, cond x2]
    out = app.image_term(1, q, heads=2, chunk_is_cond=[False, True])
    kv = adapter.kv[1]
    k_u, v_u = uncond @ kv.to_k_ip.weight.T, uncond @ kv.to_v_ip.weight.T
    k_c, v_c = cond @ kv.to_k_ip.weight.T, cond @ kv.to_v_ip.weight.T
    torch.testing.assert_close(out[:2], 0.5 * naive_attention(q[:2], k_u.expand(2, -1, -1), v_u.expand(2, -1, -1), 2))
    torch.testing.assert_close(out[2:], 0.5 * naive_attention(q[2:], k_c.expand(2, -1, -1), v_c.expand(2, -1, -1), 2))
    for _ in range(3):
        app.image_term(1, q, heads=2, chunk_is_cond=[True, False])
    assert adapter.reads == 1
    assert attention.IPApplication(adapter, cond, uncond, layer_weights=[1.0, 0.0]).image_term(
        1, q, heads=2, chunk_is_cond=[True, False]) is None


def test_one_reference_per_latent_pads_with_the_last():
    from ipadapter_pack.ip_adapter_core.batching import pad_batch

    refs = torch.arange(2.0).view(2, 1, 1)
    assert pad_batch(refs, 4, "refs").flatten().tolist() == [0.0, 1.0, 1.0, 1.0]
    assert pad_batch(refs[:1], 3, "refs").flatten().tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="2 refs for a batch of 1 latents"):
        pad_batch(refs, 1, "refs")
