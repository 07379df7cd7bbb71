"""IPAdapter plus's controls on this pack (weight types, "index:value" weights, the precise swap),
each against tables written out here from LEADING_PACK.md sections 2.1, 2.2 and 2.7, never from
the code under test."""

from __future__ import annotations

import math

import pytest
import torch

from ipadapter_pack.ip_adapter_core import attention
from ipadapter_pack.ip_adapter_core import layer_weights as blocks
from ipadapter_pack.ip_adapter_core import plus_weights as plus
from ipadapter_pack.ip_adapter_core.layout import SD15_LAYERS, SDXL_LAYERS

# ComfyUI's transformer_index per (block, id), LEADING_PACK.md 2.1.
SD15_INDEX = {("input", 1): 0, ("input", 2): 1, ("input", 4): 2, ("input", 5): 3, ("input", 7): 4, ("input", 8): 5,
              ("middle", 0): 6, **{("output", b): 4 + b for b in range(3, 12)}}
SDXL_INDEX = {("input", 4): 0, ("input", 5): 1, ("input", 7): 2, ("input", 8): 3, ("middle", 0): 4,
              **{("output", b): 5 + b for b in range(6)}}
SD15_BLOCK = ["input"] * 6 + ["middle"] + ["output"] * 9
SDXL_BLOCK = ["input"] * 4 + ["middle"] + ["output"] * 6
W, S, B = 0.8, 1.3, 0.4  # weight, style_boost, composition_boost


def expected_table(weight_type: str, xl: bool) -> dict[int, float]:
    """LEADING_PACK.md 2.2, written out: index -> absolute weight (absent = no image term)."""
    n = 11 if xl else 16
    block = SDXL_BLOCK if xl else SD15_BLOCK
    everything = range(n)
    if weight_type == "linear":
        return dict.fromkeys(everything, W)
    curves = {"ease in": lambda i: 1 - i / n, "ease out": lambda i: i / n,
              "ease in-out": lambda i: 1 - abs(i - n / 2) / (n / 2),
              "reverse in-out": lambda i: abs(i - n / 2) / (n / 2)}
    if weight_type in curves:
        return {i: W * (0.05 + 0.95 * curves[weight_type](i)) for i in everything}
    weak = {"weak input": {"input"}, "weak middle": {"middle"}, "weak output": {"output"},
            "strong middle": {"input", "output"}}
    if weight_type in weak:
        return {i: W * 0.2 if block[i] in weak[weight_type] else W for i in everything}
    sd15_style = [0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15]
    tables_xl = {
        "style transfer": {6: W},
        "composition": {3: W},
        "strong style transfer": {i: W for i in (0, 1, 2, 4, 5, 6, 7, 8, 9, 10)},
        "style and composition": {3: 1.0, 6: W},
        "style transfer precise": {3: S, 6: W},
        "composition precise": {0: B * .1, 1: B * .1, 2: B * .1, 3: W, 4: B * .1, 5: B * .1, 6: B, 7: B * .1,
                                8: B * .1, 9: B * .1, 10: B * .1},
    }
    tables_sd15 = {
        "style transfer": dict.fromkeys(sd15_style, W),
        "composition": {4: W * 0.25, 5: W},
        "strong style transfer": {i: W for i in (0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)},
        "style and composition": {**dict.fromkeys(sd15_style, W), 4: 1.0 * 0.25, 5: 1.0},
        "style transfer precise": {**dict.fromkeys(sd15_style, W), 4: S * 0.25, 5: S},
        "composition precise": {0: B, 1: B, 2: B, 3: B, 4: W * 0.25, 5: W, 6: B * .1, 7: B * .1, 8: B * .1,
                                **dict.fromkeys(range(9, 16), B)},
    }
    return (tables_xl if xl else tables_sd15)[weight_type]


EXPECTED_SWAPS = {  # LEADING_PACK.md 2.2: where the reference moves to the unconditional side
    ("style transfer precise", True): {3}, ("style transfer precise", False): {4, 5},
    ("composition precise", True): set(range(11)) - {3}, ("composition precise", False): set(range(16)) - {4, 5},
}


def test_transformer_indices_are_comfyuis():
    assert plus.plus_indices(SD15_LAYERS) == [SD15_INDEX[k[:2]] for k in SD15_LAYERS]
    assert plus.plus_indices(SDXL_LAYERS) == [SDXL_INDEX[k[:2]] for k in SDXL_LAYERS]
    # all ten depth sub-blocks of SDXL input 8 are index 3 (the composition layer), output 1 is 6 (style)
    assert [k for k in SDXL_LAYERS if SDXL_INDEX[k[:2]] == 3] == [("input", 8, t) for t in range(10)]
    assert [k for k in SDXL_LAYERS if SDXL_INDEX[k[:2]] == 6] == [("output", 1, t) for t in range(10)]
    with pytest.raises(ValueError, match="no UNet layers"):
        plus.plus_indices((("double_block", 0, 0),))


@pytest.mark.parametrize("xl", [False, True], ids=["sd15", "sdxl"])
@pytest.mark.parametrize("weight_type", plus.PLUS_WEIGHT_TYPES)
def test_weight_types_match_the_written_tables(weight_type, xl):
    layers, index = (SDXL_LAYERS, SDXL_INDEX) if xl else (SD15_LAYERS, SD15_INDEX)
    table = expected_table(weight_type, xl)
    resolved = plus.PlusWeightType.parse(weight_type, S, B).resolve(layers, W)
    assert resolved.weight == 1.0  # the per-layer values are absolute
    expected = [table.get(index[k[:2]], 0.0) for k in layers]
    assert resolved.per_layer == pytest.approx(expected, rel=1e-12, abs=0)
    swaps = EXPECTED_SWAPS.get((weight_type, xl))
    if swaps is None:
        assert resolved.swap_to_uncond is None
    else:
        assert list(resolved.swap_to_uncond) == [index[k[:2]] in swaps for k in layers]


def test_a_few_values_by_hand():
    """Spot values computed on paper (w = 0.8): SD1.5 L = 16, SDXL L = 11."""
    sd15 = dict(zip(plus.plus_indices(SD15_LAYERS),
                    plus.PlusWeightType("ease in").resolve(SD15_LAYERS, 0.8).per_layer, strict=True))
    assert sd15[0] == pytest.approx(0.8) and sd15[8] == pytest.approx(0.42)  # 0.8 * (0.05 + 0.95 * 0.5)
    xl = dict(zip(plus.plus_indices(SDXL_LAYERS),
                  plus.PlusWeightType("reverse in-out").resolve(SDXL_LAYERS, 0.8).per_layer, strict=True))
    assert xl[0] == pytest.approx(0.8) and xl[5] == pytest.approx(0.8 * (0.05 + 0.95 / 11))  # |5 - 5.5| / 5.5
    precise = plus.PlusWeightType("composition precise", composition_boost=0.0).resolve(SDXL_LAYERS, 0.8)
    assert {k for k, v in zip(SDXL_LAYERS, precise.per_layer, strict=True) if v} == {("input", 8, t) for t in range(10)}


def test_plus_index_form_in_the_layer_weights_table():
    """'index:value' in the Layer Weights table: unlisted indices 0, values multiply Apply's weight."""
    sdxl = blocks.LayerWeights.parse("linear", "3:1.0, 6: 0.5\n 10 : -0.25").for_layers(SDXL_LAYERS)
    assert {k: v for k, v in zip(SDXL_LAYERS, sdxl, strict=True) if v} == {
        **{("input", 8, t): 1.0 for t in range(10)}, **{("output", 1, t): 0.5 for t in range(10)},
        ("output", 5, 0): -0.25, ("output", 5, 1): -0.25}
    sd15 = blocks.LayerWeights.parse("linear", "0:2,6:0.5,15:1").for_layers(SD15_LAYERS)
    assert {k: v for k, v in zip(SD15_LAYERS, sd15, strict=True) if v} == {
        ("input", 1, 0): 2.0, ("middle", 0, 0): 0.5, ("output", 11, 0): 1.0}
    resolved = blocks.resolve_layer_weights(blocks.LayerWeights.parse("linear", "0:2"), SD15_LAYERS, 0.7)
    assert resolved.weight == 0.7 and resolved.swap_to_uncond is None
    # the other forms are untouched by the new one
    assert blocks.LayerWeights.parse("linear", "#0=2").for_layers(SD15_LAYERS)[0] == 2.0


@pytest.mark.parametrize(("preset", "table", "layers", "message"), [
    ("linear", "12:1", SDXL_LAYERS, r"index 12 is out of range for SDXL: its transformer indices are 0-10 "
                                    r"\(0-3 input 4, 5, 7, 8; 4 middle; 5-10 output 0, 1, 2, 3, 4, 5\)"),
    ("linear", "-1:1", SD15_LAYERS, r"index -1 is out of range for SD1.5: its transformer indices are 0-15 "
                                    r"\(0-5 input 1, 2, 4, 5, 7, 8; 6 middle; 7-15 output 3, "),
    ("linear", "3:x", SD15_LAYERS, r"layer weight '3:x': 'x' is not a number"),
    ("linear", "3:inf", SD15_LAYERS, r"must be a finite number"),
    ("linear", "3:1, output 1 = 1", SD15_LAYERS, r"cannot read layer weight 'output 1 = 1': in the 'index:value' form"),
    ("linear", "3:1, 3:2", SD15_LAYERS, r"index 3 twice \(1 and 2\)"),
    ("style transfer", "3:1", SD15_LAYERS, r"replace the preset: set preset to linear \(it is 'style transfer'\)"),
])
def test_plus_index_form_errors_say_what_is_wrong(preset, table, layers, message):
    with pytest.raises(ValueError, match=message):
        blocks.LayerWeights.parse(preset, table).for_layers(layers)


def test_mad_scientist_weights_keep_only_the_precise_swap():
    """weight_type + 'index:value' (IPAdapter Mad Scientist): the values x w; only precise types swap."""
    pw = plus.PlusWeightType.parse("style transfer precise", 9.0, 9.0, "3: 0.5, 6:1")
    resolved = pw.resolve(SDXL_LAYERS, 0.8)
    assert {k: v for k, v in zip(SDXL_LAYERS, resolved.per_layer, strict=True) if v} == {
        **{("input", 8, t): 0.5 * 0.8 for t in range(10)}, **{("output", 1, t): 0.8 for t in range(10)}}
    assert [k for k, s in zip(SDXL_LAYERS, resolved.swap_to_uncond, strict=True) if s] == [
        ("input", 8, t) for t in range(10)]
    linear = plus.PlusWeightType.parse("ease in", layer_weights="3:0.5").resolve(SDXL_LAYERS, 0.8)
    assert linear.swap_to_uncond is None and sorted(set(linear.per_layer)) == [0.0, 0.5 * 0.8]
    with pytest.raises(ValueError, match="unknown weight type 'style'"):
        plus.PlusWeightType.parse("style")


# --- the precise swap in the attention core --------------------------------------------------


class _Projection:
    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.bias = None


class _Layer:
    def __init__(self, gen: torch.Generator, width: int, context: int):
        self.to_k_ip = _Projection(torch.randn(width, context, generator=gen))
        self.to_v_ip = _Projection(torch.randn(width, context, generator=gen))


class _Adapter:
    def __init__(self, layers: int, width: int = 8, context: int = 6):
        gen = torch.Generator().manual_seed(5)
        self.layers = [_Layer(gen, width, context) for _ in range(layers)]

    def key_value(self, i: int) -> _Layer:
        return self.layers[i]


def textbook_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, one head at a time, one row of the batch at a time."""
    out = torch.empty_like(q)
    d = q.shape[-1] // heads
    for b in range(q.shape[0]):
        for h in range(heads):
            s = slice(h * d, (h + 1) * d)
            out[b, :, s] = torch.softmax(q[b, :, s] @ k[b, :, s].T / math.sqrt(d), dim=-1) @ v[b, :, s]
    return out


@pytest.mark.parametrize("weight_type", ["V only", "K+V"])
def test_precise_swap_moves_the_reference_to_the_negative_on_the_flagged_layer_only(weight_type):
    """Layer 1 flagged: its cond rows attend to zero tokens (K = V = 0 gives exactly 0), its uncond
    rows to the reference's K/V; layers 0 and 2 are bit-identical to an application without flags."""
    gen = torch.Generator().manual_seed(6)
    adapter = _Adapter(3)
    cond, uncond = torch.randn(1, 4, 6, generator=gen), torch.randn(1, 4, 6, generator=gen)
    q = torch.randn(2, 5, 8, generator=gen)  # [cond chunk; uncond chunk], one latent each
    plain = attention.IPApplication(adapter, cond, uncond, 0.7, weight_type, (1.0, 0.5, 2.0))
    swapped = attention.IPApplication(adapter, cond, uncond, 0.7, weight_type, (1.0, 0.5, 2.0),
                                      swap_to_uncond=(False, True, False))
    for layer in (0, 2):
        assert torch.equal(swapped.image_term(layer, q, 2, [True, False]), plain.image_term(layer, q, 2, [True, False]))
    got = swapped.image_term(1, q, 2, [True, False])
    layer = adapter.key_value(1)
    k_ref, v_ref = cond @ layer.to_k_ip.weight.T, cond @ layer.to_v_ip.weight.T
    w = 0.7 * 0.5
    if weight_type == "V only":
        expected_uncond = w * textbook_attention(q[1:], k_ref, v_ref, 2)
    else:
        expected_uncond = textbook_attention(q[1:], k_ref * w, v_ref * w, 2)
    torch.testing.assert_close(got[1:], expected_uncond, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[:1], torch.zeros_like(got[:1]))  # uniform attention over zero values
    # the order of the chunks in the batch does not matter: uncond first
    flipped = swapped.image_term(1, q.flip(0), 2, [False, True])
    torch.testing.assert_close(flipped[0:1], expected_uncond, rtol=1e-5, atol=1e-6)
    assert torch.equal(flipped[1:], torch.zeros_like(flipped[1:]))


def test_swap_flags_must_match_the_layer_weights():
    with pytest.raises(ValueError, match="2 swap flags for 3 layer weights"):
        attention.IPApplication(_Adapter(3), torch.zeros(1, 4, 6), torch.zeros(1, 4, 6), 1.0, "V only",
                                (1.0, 1.0, 1.0), swap_to_uncond=(True, False))


# --- Combine Embeds: max / min ----------------------------------------------------------------


def test_combine_max_min_by_hand():
    from ipadapter_pack.ip_adapter_core.embeds import ImageEmbeds, combine_embeds

    cond = torch.tensor([[1.0, 5.0, -2.0], [3.0, 0.0, -1.0], [2.0, 4.0, -3.0]])
    shared = ImageEmbeds(cond, torch.zeros(1, 3), "image_embeds")
    assert combine_embeds(shared, "max").cond.tolist() == [[3.0, 5.0, -1.0]]
    assert combine_embeds(shared, "min").cond.tolist() == [[1.0, 0.0, -3.0]]
    assert torch.equal(combine_embeds(shared, "max").uncond, torch.zeros(1, 3))  # a shared negative stays
    own = ImageEmbeds(cond, torch.tensor([[0.0, 1.0, 2.0], [1.0, -1.0, 0.0], [0.5, 0.5, 3.0]]), "image_embeds")
    assert combine_embeds(own, "max").uncond.tolist() == [[1.0, 1.0, 3.0]]
    assert combine_embeds(own, "min").uncond.tolist() == [[0.0, -1.0, 0.0]]
    hidden = torch.tensor([[[1.0, -1.0], [0.0, 2.0]], [[-1.0, 3.0], [4.0, 0.0]]])  # [N, tokens, width]
    states = ImageEmbeds(hidden, torch.zeros(1, 2, 2), "penultimate")
    assert combine_embeds(states, "max").cond.tolist() == [[[1.0, 3.0], [4.0, 2.0]]]
    with pytest.raises(ValueError, match="expected one of concat, add, subtract, average, norm average, max, min"):
        combine_embeds(shared, "median")


def test_encoder_weight_scales_the_references_only():
    from ipadapter_pack.ip_adapter_core.embeds import ImageEmbeds, scale_references

    embeds = ImageEmbeds(torch.tensor([[1.0, -2.0], [0.5, 4.0]]), torch.tensor([[3.0, 3.0]]), "image_embeds")
    scaled = scale_references(embeds, 0.5)
    assert scaled.cond.tolist() == [[0.5, -1.0], [0.25, 2.0]] and scaled.uncond.tolist() == [[3.0, 3.0]]
    assert scale_references(embeds, 1.0) is embeds
    assert scale_references(embeds, -1.0).cond.tolist() == [[-1.0, 2.0], [-0.5, -4.0]]
