"""Picture operations for IPAdapter plus's helper nodes: PIL's resampling filters, contrast-adaptive
sharpening, Gaussian blur, an elastic warp and the noise negatives.

Images are ComfyUI IMAGE tensors, [B, H, W, C] floats in [0, 1]. Everything is plain torch, in
float: no 8-bit round trip. Each function's docstring gives the formula it implements, and where
the ComfyUI_IPAdapter_plus node it serves differs, how.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

CLIP_SIZE = 224


# --- PIL's resampling filters ----------------------------------------------------------------


def _box(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


def _triangle(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _hamming(x: float) -> float:
    x = abs(x)
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x *= math.pi
    return math.sin(x) / x * (0.54 + 0.46 * math.cos(x))


def _cubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x *= math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3.0) if -3.0 <= x < 3.0 else 0.0


# name -> (support at scale 1, kernel); PIL's definitions (Resample.c)
FILTERS: dict[str, tuple[float, Callable[[float], float]]] = {
    "LANCZOS": (3.0, _lanczos), "BICUBIC": (2.0, _cubic), "HAMMING": (1.0, _hamming),
    "BILINEAR": (1.0, _triangle), "BOX": (0.5, _box),
}
INTERPOLATIONS = ("LANCZOS", "BICUBIC", "HAMMING", "BILINEAR", "BOX", "NEAREST")


def resample_matrix(in_size: int, out_size: int, interpolation: str) -> torch.Tensor:
    """[out_size, in_size] float64 weights: output pixel i = sum_j M[i, j] * input pixel j.

    PIL's convolution resampling: output pixel i is centred at c = (i + 0.5) * s in input pixels
    (s = in/out); the kernel is stretched by max(s, 1) when shrinking (antialiasing), taps run over
    input pixels int(c - r + 0.5) .. int(c + r + 0.5) - 1 (r = support * max(s, 1), clipped to the
    image) at kernel((j - c + 0.5) / max(s, 1)), normalised to sum 1. NEAREST takes input pixel
    floor((i + 0.5) * s).
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; expected one of {', '.join(INTERPOLATIONS)}")
    scale = in_size / out_size
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    if interpolation == "NEAREST":
        for i in range(out_size):
            matrix[i, min(int((i + 0.5) * scale), in_size - 1)] = 1.0
        return matrix
    support, kernel = FILTERS[interpolation]
    stretch = max(scale, 1.0)
    reach = support * stretch
    for i in range(out_size):
        centre = (i + 0.5) * scale
        first = max(int(centre - reach + 0.5), 0)
        last = min(int(centre + reach + 0.5), in_size)
        taps = [kernel((j - centre + 0.5) * (1.0 / stretch)) for j in range(first, last)]
        total = sum(taps)
        for j, tap in zip(range(first, last), taps, strict=True):
            matrix[i, j] = tap / total if total != 0.0 else tap
    return matrix


def resize(image: torch.Tensor, height: int, width: int, interpolation: str) -> torch.Tensor:
    """[B, H, W, C] -> [B, height, width, C] with a PIL filter, separably, in float64; a side that
    keeps its size is left as it is (PIL skips that pass)."""
    _, h, w, _ = image.shape
    out = image.double()
    if w != width:
        out = torch.einsum("pw,bhwc->bhpc", resample_matrix(w, width, interpolation), out)
    if h != height:
        out = torch.einsum("oh,bhwc->bowc", resample_matrix(h, height, interpolation), out)
    return out.to(image.dtype)


# --- crop positions (PrepImageForClipVision) ---------------------------------------------------

CROP_POSITIONS = ("top", "bottom", "left", "right", "center", "pad")


def crop_or_pad(image: torch.Tensor, position: str) -> torch.Tensor:
    """A square crop of side min(H, W) anchored at `position`, centred on the other axis
    ((H - side) // 2, (W - side) // 2); "pad" adds (long - short) // 2 black pixels to both ends of
    the short side instead (an odd difference leaves it one pixel short, as IPAdapter plus does:
    the resize to a square then absorbs it)."""
    _, h, w, _ = image.shape
    if position == "pad":
        d = abs(h - w) // 2
        pad = (0, 0, d, d, 0, 0) if h > w else (0, 0, 0, 0, d, d)  # [B, H, W, C]: C, then W, then H
        return F.pad(image, pad, value=0.0) if d else image
    if position not in CROP_POSITIONS:
        raise ValueError(f"unknown crop position {position!r}; expected one of {', '.join(CROP_POSITIONS)}")
    side = min(h, w)
    y, x = (h - side) // 2, (w - side) // 2
    if position == "top":
        y = 0
    elif position == "bottom":
        y = h - side
    elif position == "left":
        x = 0
    elif position == "right":
        x = w - side
    return image[:, y : y + side, x : x + side, :]


# --- contrast-adaptive sharpening -------------------------------------------------------------


def contrast_adaptive_sharpening(image: torch.Tensor, amount: float) -> torch.Tensor:
    """AMD FidelityFX CAS, per channel, as IPAdapter plus applies it (amount in [0, 1]).

    Over each pixel's 3x3 neighbourhood (a b c / d e f / g h i): mn = min(b,d,e,f,h) + min(a,c,g,i),
    mx = max(b,d,e,f,h) + max(a,c,g,i), amp = sqrt(min(mn, 2 - mx) / mx) (0 where mx = 0),
    w = -amp * (1/8 + amount * (1/5 - 1/8)), out = ((b + d + f + h) * w + e) / (1 + 4w), clamped to [0, 1].
    The outermost ring of pixels is kept as it is: IPAdapter plus pads with black, which makes mn = 0
    and so w = 0 there. (AMD lerps the peak's denominator 8 -> 5 and clamps to the edge; the peak here
    lerps 1/8 -> 1/5 as IPAdapter plus does: equal at amounts 0 and 1.)
    """
    x = image.double().movedim(-1, 1)  # [B, C, H, W]
    _, _, h, w = x.shape
    if h < 3 or w < 3:
        return image  # no interior pixel: every pixel is on the kept ring

    def at(dy: int, dx: int) -> torch.Tensor:
        return x[:, :, 1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx]

    a, b, c = at(-1, -1), at(-1, 0), at(-1, 1)
    d, e, f = at(0, -1), at(0, 0), at(0, 1)
    g, hh, i = at(1, -1), at(1, 0), at(1, 1)
    cross, diagonal = torch.stack([b, d, e, f, hh]), torch.stack([a, c, g, i])
    mn = cross.amin(0) + diagonal.amin(0)
    mx = cross.amax(0) + diagonal.amax(0)
    # clamp = AMD's saturate: a no-op for pictures in [0, 1], where min(mn, 2 - mx) <= mn <= mx
    ratio = torch.where(mx > 0, torch.minimum(mn, 2 - mx) / mx.clamp_min(1e-300), torch.zeros_like(mx))
    amp = ratio.clamp(0.0, 1.0).sqrt()
    weight = -amp * (amount * (1 / 5 - 1 / 8) + 1 / 8)
    sharpened = ((b + d + f + hh) * weight + e) / (1 + 4 * weight)
    out = x.clone()
    out[:, :, 1 : h - 1, 1 : w - 1] = sharpened.clamp(0.0, 1.0)
    return out.movedim(1, -1).to(image.dtype)


def prep_for_clip_vision(image: torch.Tensor, interpolation: str = "LANCZOS", position: str = "center",
                         sharpening: float = 0.0, size: int = CLIP_SIZE) -> torch.Tensor:
    """PrepImageForClipVision: crop (or pad) at `position`, resize to size x size with the PIL
    filter, clamp to [0, 1] (PIL clips its 8-bit result: LANCZOS/BICUBIC overshoot at edges), then
    sharpen with CAS when sharpening > 0."""
    out = resize(crop_or_pad(image, position), size, size, interpolation).clamp(0.0, 1.0)
    return contrast_adaptive_sharpening(out, sharpening) if sharpening > 0 else out


# --- blur, elastic warp, noise negatives ------------------------------------------------------


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """exp(-x^2 / (2 sigma^2)) at x = -(size-1)/2 .. (size-1)/2, normalised to sum 1 (float64)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return pdf / pdf.sum()


def gaussian_blur(image: torch.Tensor, size: int, sigma: float | None = None) -> torch.Tensor:
    """Separable Gaussian blur of [B, H, W, C] with an odd `size` kernel, reflected borders (the
    border pixel is not repeated). sigma defaults to 0.15 * size + 0.35 (OpenCV's and torchvision's
    0.3 * ((size - 1) / 2 - 1) + 0.8)."""
    if size % 2 == 0 or size < 1:
        raise ValueError(f"blur kernel size {size} must be odd and positive")
    _, h, w, _ = image.shape
    half = size // 2
    if half >= min(h, w):
        raise ValueError(f"a {size} px blur needs an image larger than {half} px on each side; it is {w}x{h}")
    sigma = 0.15 * size + 0.35 if sigma is None else sigma
    kernel = gaussian_kernel(size, sigma)
    x = image.double().movedim(-1, 1)  # [B, C, H, W]
    channels = x.shape[1]
    x = F.pad(x, (half, half, half, half), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
    x = F.conv2d(x, kernel.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)
    return x.movedim(1, -1).to(image.dtype)


def elastic_warp(image: torch.Tensor, alpha: float, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """torchvision's ElasticTransform: per-pixel displacements dx, dy ~ U(-1, 1), each blurred with a
    Gaussian of sigma (kernel int(8 sigma + 1), made odd; none at sigma 0) and scaled by alpha / H
    (dx) and alpha / W (dy) in grid_sample's [-1, 1] coordinates; bilinear sampling, zeros outside.
    One displacement field for the whole batch."""
    b, h, w, _ = image.shape
    fields = []
    for extent in (h, w):
        field = torch.rand(1, h, w, 1, generator=generator, dtype=torch.float64) * 2 - 1
        if sigma > 0:
            size = int(8 * sigma + 1)
            size += 1 - size % 2
            field = gaussian_blur(field, size, sigma)
        fields.append(field * alpha / extent)
    ys = (2 * torch.arange(h, dtype=torch.float64) + 1) / h - 1  # pixel centres, align_corners=False
    xs = (2 * torch.arange(w, dtype=torch.float64) + 1) / w - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).unsqueeze(0)  # [1, H, W, (x, y)]
    grid = grid + torch.cat(fields, dim=-1)
    warped = F.grid_sample(image.double().movedim(-1, 1), grid.expand(b, -1, -1, -1), mode="bilinear",
                           padding_mode="zeros", align_corners=False)
    return warped.movedim(1, -1).to(image.dtype)


NOISE_TYPES = ("grey blend", "fade", "dissolve", "gaussian", "shuffle")


def noise_base(image: torch.Tensor | None, size: int = CLIP_SIZE) -> torch.Tensor:
    """IPAdapter Noise's base: black size x size, or the image centre-cropped square and resized
    to size x size (bicubic, PIL's filter)."""
    if image is None:
        return torch.zeros(1, size, size, 3)
    return resize(crop_or_pad(image.float(), "center"), size, size, "BICUBIC")


def noise_image(kind: str, strength: float, seed: int, image: torch.Tensor | None = None,
                blur: int = 0) -> torch.Tensor:
    """A negative image, deterministic for a seed (draws in the order listed, one generator).

    grey blend: (grey 0.5 at 224 px, or the image at its own size) * (1 - s) + U * s.
    The others on `noise_base`: fade = base * (1 - s) + U * s; dissolve: m = (U1 < s),
    base * (1 - m) + U2 * m; gaussian: base + N * s; shuffle: the base elastically warped
    (alpha 75, sigma (1 - s) * 3.5), flipped top-bottom and left-right, then x * (1 - n) + n
    with n = N * 0.75 s. Clamped to [0, 1], then blurred (kernel blur, made odd) when blur > 0.
    (IPAdapter plus seeds from the base's pixel sum; here the seed is yours.)
    """
    generator = torch.Generator().manual_seed(seed)
    if kind == "grey blend":
        base = torch.full((1, CLIP_SIZE, CLIP_SIZE, 3), 0.5) if image is None else image.float()
        out = base * (1 - strength) + torch.rand(base.shape, generator=generator) * strength
    elif kind not in NOISE_TYPES:
        raise ValueError(f"unknown noise type {kind!r}; expected one of {', '.join(NOISE_TYPES)}")
    else:
        base = noise_base(image)
        if kind == "fade":
            out = base * (1 - strength) + torch.rand(base.shape, generator=generator) * strength
        elif kind == "dissolve":
            mask = (torch.rand(base.shape, generator=generator) < strength).float()
            out = base * (1 - mask) + torch.rand(base.shape, generator=generator) * mask
        elif kind == "gaussian":
            out = base + torch.randn(base.shape, generator=generator) * strength
        else:  # shuffle
            warped = elastic_warp(base, 75.0, (1 - strength) * 3.5, generator).flip(1).flip(2)
            n = torch.randn(warped.shape, generator=generator) * (strength * 0.75)
            out = warped * (1 - n) + n
    out = out.clamp(0.0, 1.0)
    if blur > 0:
        out = gaussian_blur(out, blur + 1 - blur % 2)
    return out
