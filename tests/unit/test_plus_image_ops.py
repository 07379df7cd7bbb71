"""Prep Image and Noise Image math (ip_adapter_core/image_ops.py) against values computed by hand
from the documented formulas, and PIL itself for its resampling filters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter_pack.ip_adapter_core import image_ops as ops


def grid(h: int, w: int, c: int = 1) -> torch.Tensor:
    """[1, h, w, c] with pixel (y, x, k) = 100 y + 10 x + k: every crop names its source."""
    y, x, k = torch.meshgrid(torch.arange(h), torch.arange(w), torch.arange(c), indexing="ij")
    return (100 * y + 10 * x + k).float().unsqueeze(0)


# --- resampling ---------------------------------------------------------------------------


def test_resample_weights_by_hand():
    # BILINEAR 4 -> 2: scale 2, triangle stretched x2; output 0 centred at 1.0 taps inputs 0, 1, 2 at
    # tri(-0.25), tri(0.25), tri(0.75) = 0.75, 0.75, 0.25 (sum 1.75)
    bilinear = ops.resample_matrix(4, 2, "BILINEAR")
    torch.testing.assert_close(bilinear, torch.tensor([[3 / 7, 3 / 7, 1 / 7, 0], [0, 1 / 7, 3 / 7, 3 / 7]],
                                                      dtype=torch.float64))
    # BOX 4 -> 2: the mean of each pair
    torch.testing.assert_close(ops.resample_matrix(4, 2, "BOX"),
                               torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]], dtype=torch.float64))
    # NEAREST 5 -> 2: input floor(1.25) = 1 and floor(3.75) = 3
    assert ops.resample_matrix(5, 2, "NEAREST").argmax(1).tolist() == [1, 3]
    # BICUBIC (a = -0.5) 2 -> 4: output 0 centred at 0.25 taps input 0 at cubic(0.25) = 111/128 and
    # input 1 at cubic(1.25) = -9/128 (sum 102/128): 37/34 and -3/34
    bicubic = ops.resample_matrix(2, 4, "BICUBIC")
    torch.testing.assert_close(bicubic[0], torch.tensor([37 / 34, -3 / 34], dtype=torch.float64))
    torch.testing.assert_close(bicubic[3], torch.tensor([-3 / 34, 37 / 34], dtype=torch.float64))
    # LANCZOS at scale 1 taps sinc(n) sinc(n / 3) at whole n: the identity
    torch.testing.assert_close(ops.resample_matrix(5, 5, "LANCZOS"), torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected one of LANCZOS"):
        ops.resample_matrix(4, 2, "CUBIC")


def test_resize_applies_the_weights_on_both_axes():
    image = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]).view(1, 2, 4, 1)
    # width 4 -> 2 with BOX: pairs averaged; height 2 -> 1: rows averaged
    assert ops.resize(image, 1, 2, "BOX").flatten().tolist() == [(1 + 2 + 5 + 6) / 4, (3 + 4 + 7 + 8) / 4]


@pytest.mark.parametrize("interpolation", ops.INTERPOLATIONS)
@pytest.mark.parametrize(("h", "w", "out_h", "out_w"), [(37, 53, 224, 224), (300, 500, 224, 224), (7, 5, 3, 4)])
def test_resize_matches_pil(interpolation, h, w, out_h, out_w):
    """PIL is the reference for its filters: Image.resize on 32-bit float images (mode F), per channel."""
    image = torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(h * w))
    ours = ops.resize(image, out_h, out_w, interpolation)[0]
    resample = getattr(Image.Resampling, interpolation)
    pil = np.stack([np.asarray(Image.fromarray(image[0, :, :, c].numpy(), mode="F").resize((out_w, out_h), resample))
                    for c in range(3)], axis=-1)
    torch.testing.assert_close(ours, torch.from_numpy(pil), rtol=0, atol=5e-7)


# --- crop positions ---------------------------------------------------------------------------


def test_crop_positions_by_hand():
    wide = grid(3, 7)  # side 3; centred x = (7 - 3) // 2 = 2
    first_col = {name: int(ops.crop_or_pad(wide, name)[0, 0, 0, 0]) for name in ("top", "bottom", "left", "right",
                                                                                  "center")}
    assert first_col == {"top": 20, "bottom": 20, "left": 0, "right": 40, "center": 20}
    tall = grid(6, 2)  # side 2; centred y = (6 - 2) // 2 = 2
    first_row = {name: int(ops.crop_or_pad(tall, name)[0, 0, 0, 0]) for name in ("top", "bottom", "left", "right",
                                                                                  "center")}
    assert first_row == {"top": 0, "bottom": 400, "left": 200, "right": 200, "center": 200}
    assert ops.crop_or_pad(tall, "bottom").shape == (1, 2, 2, 1)
    # pad: (6 - 2) // 2 = 2 black columns on each side; 3 x 6 gets 1 black row at top and bottom (5 x 6)
    padded = ops.crop_or_pad(tall, "pad")
    assert padded.shape == (1, 6, 6, 1) and padded[0, :, :2].abs().sum() == 0 and padded[0, :, 4:].abs().sum() == 0
    assert torch.equal(padded[0, :, 2:4], tall[0])
    short = ops.crop_or_pad(grid(3, 6), "pad")
    assert short.shape == (1, 5, 6, 1) and torch.equal(short[0, 1:4], grid(3, 6)[0])
    with pytest.raises(ValueError, match="expected one of top"):
        ops.crop_or_pad(wide, "middle")


# --- contrast-adaptive sharpening ----------------------------------------------------------------


def cas_by_hand(n: list[list[float]], amount: float) -> float:
    """The documented CAS formula for the centre of one 3x3 neighbourhood."""
    (a, b, c), (d, e, f), (g, h, i) = n
    mn = min(b, d, e, f, h) + min(a, c, g, i)
    mx = max(b, d, e, f, h) + max(a, c, g, i)
    amp = math.sqrt(min(mn, 2 - mx) / mx)
    w = -amp * (1 / 8 + amount * (1 / 5 - 1 / 8))
    return min(max(((b + d + f + h) * w + e) / (1 + 4 * w), 0.0), 1.0)


def test_cas_by_hand():
    n = [[0.2, 0.4, 0.2], [0.4, 0.5, 0.4], [0.2, 0.4, 0.2]]
    # mn = 0.4 + 0.2, mx = 0.5 + 0.2, amp = sqrt(6/7), w = -0.92582 * 0.1625 = -0.150446:
    # (0.5 + 1.6 w) / (1 + 4 w) = 0.259287 / 0.398217
    assert cas_by_hand(n, 0.5) == pytest.approx(0.6511194, abs=1e-7)
    image = torch.tensor(n, dtype=torch.float64).view(1, 3, 3, 1)
    out = ops.contrast_adaptive_sharpening(image, 0.5)
    assert float(out[0, 1, 1, 0]) == pytest.approx(cas_by_hand(n, 0.5), abs=1e-12)
    ring = torch.ones(3, 3, dtype=torch.bool)
    ring[1, 1] = False
    assert torch.equal(out[0, :, :, 0][ring], image[0, :, :, 0][ring])  # the outer ring is kept
    # a 5 x 5 picture: every interior pixel by hand, per channel
    big = torch.rand(1, 5, 5, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = ops.contrast_adaptive_sharpening(big, 1.0)
    for y in range(1, 4):
        for x in range(1, 4):
            for k in range(2):
                hood = big[0, y - 1 : y + 2, x - 1 : x + 2, k].tolist()
                assert float(out[0, y, x, k]) == pytest.approx(cas_by_hand(hood, 1.0), abs=1e-12)
    flat = torch.full((1, 4, 4, 3), 0.3, dtype=torch.float64)
    torch.testing.assert_close(ops.contrast_adaptive_sharpening(flat, 1.0), flat)  # (4w v + v) / (1 + 4w) = v
    black = torch.zeros(1, 4, 4, 3)
    assert torch.equal(ops.contrast_adaptive_sharpening(black, 1.0), black)  # mx = 0: no NaN


def test_prep_image_chains_crop_resize_sharpen():
    image = torch.rand(1, 30, 40, 3, generator=torch.Generator().manual_seed(4))
    got = ops.prep_for_clip_vision(image, "BILINEAR", "right", 0.0, size=8)
    torch.testing.assert_close(got, ops.resize(image[:, :, 10:], 8, 8, "BILINEAR").clamp(0, 1))
    # LANCZOS overshoots at a hard edge when enlarging; the prepared picture is clipped to [0, 1] as PIL's 8 bits
    edge = torch.zeros(1, 4, 4, 3)
    edge[:, :, 2:] = 1.0
    assert ops.resize(edge, 16, 16, "LANCZOS").max() > 1.0
    clipped = ops.prep_for_clip_vision(edge, "LANCZOS", "center", 0.5, size=16)
    assert clipped.min() == 0.0 and clipped.max() == 1.0 and not clipped.isnan().any()
    sharpened = ops.prep_for_clip_vision(image, "BILINEAR", "right", 0.6, size=8)
    torch.testing.assert_close(sharpened, ops.contrast_adaptive_sharpening(got, 0.6))
    assert not torch.equal(sharpened, got)


# --- blur, warp, noise ----------------------------------------------------------------------------


def test_gaussian_blur_by_hand():
    # size 3: sigma 0.15 * 3 + 0.35 = 0.8; taps exp(-0.5 / 0.64) = 0.457833 around 1, normalised
    side = math.exp(-0.5 * (1 / 0.8) ** 2)
    k = [side / (1 + 2 * side), 1 / (1 + 2 * side), side / (1 + 2 * side)]
    assert k[1] == pytest.approx(0.522011, abs=1e-6)
    delta = torch.zeros(1, 5, 5, 1, dtype=torch.float64)
    delta[0, 2, 2, 0] = 1.0
    blurred = ops.gaussian_blur(delta, 3)[0, :, :, 0]
    torch.testing.assert_close(blurred[1:4, 1:4], torch.tensor(k, dtype=torch.float64).outer(
        torch.tensor(k, dtype=torch.float64)))
    # reflected border: a 1 at the corner sees itself once (no repeated edge): k1 * k1 at the corner
    corner = torch.zeros(1, 5, 5, 1, dtype=torch.float64)
    corner[0, 0, 0, 0] = 1.0
    assert float(ops.gaussian_blur(corner, 3)[0, 0, 0, 0]) == pytest.approx(k[1] ** 2, abs=1e-12)
    assert float(ops.gaussian_blur(corner, 3)[0, 1, 1, 0]) == pytest.approx(k[0] ** 2, abs=1e-12)
    with pytest.raises(ValueError, match="must be odd"):
        ops.gaussian_blur(delta, 4)
    with pytest.raises(ValueError, match="larger than 5 px on each side; it is 5x5"):
        ops.gaussian_blur(delta, 11)


def bilinear_at(image: torch.Tensor, x: float, y: float) -> float:
    """Bilinear sample of [H, W] at pixel coordinates (x, y), zeros outside."""
    h, w = image.shape
    x0, y0 = math.floor(x), math.floor(y)
    total = 0.0
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                total += wy * wx * float(image[yy, xx])
    return total


def test_elastic_warp_by_hand():
    """sigma 0: displacement U(-1, 1) * alpha / size in [-1, 1] units = U * alpha / 2 pixels."""
    image = torch.rand(1, 6, 6, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    alpha = 3.0
    got = ops.elastic_warp(image, alpha, 0.0, torch.Generator().manual_seed(9))[0, :, :, 0]
    draws = torch.Generator().manual_seed(9)
    dx = (torch.rand(1, 6, 6, 1, generator=draws, dtype=torch.float64) * 2 - 1)[0, :, :, 0]
    dy = (torch.rand(1, 6, 6, 1, generator=draws, dtype=torch.float64) * 2 - 1)[0, :, :, 0]
    for y in range(6):
        for x in range(6):
            sx = x + float(dx[y, x]) * alpha / 6 * 6 / 2  # [-1, 1] units -> pixels: x W / 2
            sy = y + float(dy[y, x]) * alpha / 6 * 6 / 2
            assert float(got[y, x]) == pytest.approx(bilinear_at(image[0, :, :, 0], sx, sy), abs=1e-12)
    torch.testing.assert_close(ops.elastic_warp(image, 0.0, 1.0, torch.Generator().manual_seed(1)), image,
                               rtol=0, atol=1e-12)  # alpha 0: sampling at the pixel centres


def test_noise_types_by_hand():
    base = torch.rand(1, 20, 30, 3, generator=torch.Generator().manual_seed(6))
    image224 = ops.noise_base(base)
    # the base: centre square (20 x 20 from x = 5) to 224 bicubic
    torch.testing.assert_close(image224, ops.resize(base[:, :, 5:25], 224, 224, "BICUBIC"))
    shape = (1, 224, 224, 3)

    def draws(seed):
        return torch.Generator().manual_seed(seed)

    g = draws(3)
    fade = (image224 * 0.75 + torch.rand(shape, generator=g) * 0.25).clamp(0, 1)
    torch.testing.assert_close(ops.noise_image("fade", 0.25, 3, base), fade, rtol=0, atol=0)
    g = draws(3)
    mask = (torch.rand(shape, generator=g) < 0.25).float()
    dissolve = (image224 * (1 - mask) + torch.rand(shape, generator=g) * mask).clamp(0, 1)
    torch.testing.assert_close(ops.noise_image("dissolve", 0.25, 3, base), dissolve, rtol=0, atol=0)
    gaussian = (image224 + torch.randn(shape, generator=draws(3)) * 0.25).clamp(0, 1)
    torch.testing.assert_close(ops.noise_image("gaussian", 0.25, 3, base), gaussian, rtol=0, atol=0)
    # shuffle on black: the warp of black is black, so only n = N * 0.75 s remains (after the two fields)
    g = draws(4)
    torch.rand(1, 224, 224, 1, generator=g, dtype=torch.float64)
    torch.rand(1, 224, 224, 1, generator=g, dtype=torch.float64)
    shuffle = (torch.randn(shape, generator=g) * (0.5 * 0.75)).clamp(0, 1)
    torch.testing.assert_close(ops.noise_image("shuffle", 0.5, 4), shuffle, rtol=0, atol=0)
    # strength 0 leaves the base (shuffle: warped and flipped both ways)
    assert torch.equal(ops.noise_image("fade", 0.0, 1, base), image224.clamp(0, 1))
    assert torch.equal(ops.noise_image("dissolve", 0.0, 1, base), image224.clamp(0, 1))
    flipped = ops.elastic_warp(image224, 75.0, 3.5, draws(2)).flip(1).flip(2).clamp(0, 1)
    torch.testing.assert_close(ops.noise_image("shuffle", 0.0, 2, base), flipped, rtol=0, atol=0)
    # the original grey blend, unchanged: grey 0.5 (or the image as it is) mixed with U
    grey = (torch.full(shape, 0.5) * 0.4 + torch.rand(shape, generator=draws(7)) * 0.6).clamp(0, 1)
    torch.testing.assert_close(ops.noise_image("grey blend", 0.6, 7), grey, rtol=0, atol=0)
    own = (base * 0.4 + torch.rand(base.shape, generator=draws(7)) * 0.6).clamp(0, 1)
    torch.testing.assert_close(ops.noise_image("grey blend", 0.6, 7, base), own, rtol=0, atol=0)
    # blur: an even size is made odd
    torch.testing.assert_close(ops.noise_image("fade", 0.25, 3, base, blur=4), ops.gaussian_blur(fade, 5))
    assert torch.equal(ops.noise_image("gaussian", 0.7, 11), ops.noise_image("gaussian", 0.7, 11))
    assert not torch.equal(ops.noise_image("gaussian", 0.7, 11), ops.noise_image("gaussian", 0.7, 12))
    with pytest.raises(ValueError, match="expected one of grey blend"):
        ops.noise_image("salt", 0.5, 1)
