"""Image encodings as the adapter consumes them, and ways to combine several references.

The negative of a combined prompt follows one rule:
* one negative shared by every reference (the reference convention: a zero embedding or the
  encoding of zero pixels; or one black/noise image) stays that negative: it stands for "no
  image", and folding copies of it (N times it for add, (2 - N) times it for subtract, 0/0 for
  a norm-weighted average of zeros) would make a different, wrong negative;
* one negative per reference (a batch of negative images) is combined the same way as the
  references, which is defined for every mode (a norm-weighted average of all-zero encodings
  is their plain average).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

COMBINE_MODES = ("concat", "add", "subtract", "average", "norm average")
# The Combine Embeds node also offers IPAdapter plus's element-wise max / min across references
# (that pack has them on its combine node only, not on its apply nodes).
COMBINE_NODE_MODES = (*COMBINE_MODES, "max", "min")


@dataclass(frozen=True)
class ImageEmbeds:
    """Encodings of reference images (or faces) and of the unconditional (negative) input.

    cond: [N, D] image_embeds or face embeddings, or [N, 257, D] penultimate hidden states, one
    row per reference. uncond: the same shape with 1 row (one negative shared by all references)
    or N rows. FaceID Plus adds crop_cond / crop_uncond: CLIP penultimate hidden states of each
    face's aligned crop, [N, 257, 1280] and [1 or N, 257, 1280].
    """

    cond: torch.Tensor
    uncond: torch.Tensor
    output: str  # "image_embeds", "penultimate"; faces: "arcface" (normed) or "arcface_raw"
    crop_cond: torch.Tensor | None = None
    crop_uncond: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.cond.shape[-1]

    @property
    def count(self) -> int:
        return self.cond.shape[0]

    @property
    def shared_negative(self) -> bool:
        return self.uncond.shape[0] == 1



def scale_references(embeds: ImageEmbeds, weight: float) -> ImageEmbeds:
    """The references' encodings times `weight`, the negative untouched (IPAdapter plus's Encoder
    weight: it scales the CLIP output before the adapter's projection, so for plus/resampler
    adapters it is not the same as the Apply weight). 1.0 returns the embeds as they are."""
    if weight == 1.0:
        return embeds
    return ImageEmbeds(embeds.cond * weight, embeds.uncond, embeds.output, embeds.crop_cond, embeds.crop_uncond)


def _repeat_rows(t: torch.Tensor, count: int) -> torch.Tensor:
    """[1 or count, ...] -> [count, ...]: a shared negative repeated for every reference."""
    return t.expand(count, *t.shape[1:])


def combine(embeds: torch.Tensor, mode: str) -> torch.Tensor:
    """Fold N references [N, ...] into one [1, ...] (all modes but concat, handled on tokens).

    subtract: the first minus the others; norm average: weighted by each embedding's norm
    (all-zero embeddings have no norm to weigh by: their plain average, zero, is returned);
    max / min: element-wise over the references.
    """
    if mode == "add":
        return embeds.sum(dim=0, keepdim=True)
    if mode == "subtract":
        return embeds[:1] - embeds[1:].sum(dim=0, keepdim=True)
    if mode == "average":
        return embeds.mean(dim=0, keepdim=True)
    if mode == "max":
        return embeds.amax(dim=0, keepdim=True)
    if mode == "min":
        return embeds.amin(dim=0, keepdim=True)
    if mode == "norm average":
        norms = embeds.flatten(1).norm(dim=1)
        total = norms.sum()
        if total == 0:
            return embeds.mean(dim=0, keepdim=True)
        weights = (norms / total).view(-1, *([1] * (embeds.ndim - 1)))
        return (embeds * weights).sum(dim=0, keepdim=True)
    raise ValueError(f"unknown combine mode {mode!r}; expected one of {', '.join(COMBINE_NODE_MODES)}")


def _fold(cond: torch.Tensor, uncond: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    return combine(cond, mode), uncond if uncond.shape[0] == 1 else combine(uncond, mode)


def combine_embeds(embeds: ImageEmbeds, mode: str) -> ImageEmbeds:
    """Several references folded into one with `mode`, the negative by the module's rule."""
    if mode not in COMBINE_NODE_MODES:
        raise ValueError(f"unknown combine mode {mode!r}; expected one of {', '.join(COMBINE_NODE_MODES)}")
    if mode == "concat" or embeds.count == 1:
        return embeds
    cond, uncond = _fold(embeds.cond, embeds.uncond, mode)
    crop_cond, crop_uncond = embeds.crop_cond, embeds.crop_uncond
    if crop_cond is not None:
        crop_cond, crop_uncond = _fold(crop_cond, crop_uncond, mode)
    return ImageEmbeds(cond, uncond, embeds.output, crop_cond, crop_uncond)


# project(encodings, crop states or None) -> tokens [N, T, C]
Projection = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def image_tokens(project: Projection, embeds: ImageEmbeds, combine_mode: str,
                 one_per_latent: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Cond and uncond image tokens, [1 or N, T, C] each, from encodings and a projection.

    one_per_latent: reference i for latent i ([N, T, C], nothing combined). Otherwise the
    references are combined (`combine_mode`), or with concat attended all at once: [1, N*T, C],
    each reference's tokens next to its own negative's.
    """
    if not one_per_latent:
        embeds = combine_embeds(embeds, combine_mode)
    cond = project(embeds.cond, embeds.crop_cond)
    uncond = project(embeds.uncond, embeds.crop_uncond)
    if one_per_latent:
        return cond, uncond
    return concat_tokens(cond), concat_tokens(_repeat_rows(uncond, embeds.count))


def concat_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """[N, T, C] tokens of N references -> [1, N*T, C]: attend to all of them at once."""
    return tokens.reshape(1, -1, tokens.shape[-1])


def merge(first: ImageEmbeds, *others: ImageEmbeds) -> ImageEmbeds:
    """Several encodings as one batch of references (for the combine node).

    One negative shared by all stays shared; otherwise each reference keeps its own.
    """
    for other in others:
        if other.output != first.output or other.cond.shape[1:] != first.cond.shape[1:]:
            raise ValueError(
                f"cannot merge {other.output} {list(other.cond.shape[1:])} with {first.output} "
                f"{list(first.cond.shape[1:])}: encode every image with the same CLIP vision model and adapter"
            )
        if (other.crop_cond is None) != (first.crop_cond is None):
            raise ValueError("cannot merge face encodings with and without face crops: encode every face for the "
                             "same adapter")
    items = (first, *others)
    crops = first.crop_cond is not None
    cond = torch.cat([e.cond for e in items])
    crop_cond = torch.cat([e.crop_cond for e in items]) if crops else None
    shared = all(e.shared_negative and torch.equal(e.uncond, first.uncond) for e in items)
    if crops:
        shared = shared and all(e.crop_uncond.shape[0] == 1 and torch.equal(e.crop_uncond, first.crop_uncond)
                                for e in items)
    if shared:
        return ImageEmbeds(cond, first.uncond, first.output, crop_cond, first.crop_uncond)
    uncond = torch.cat([_repeat_rows(e.uncond, e.count) for e in items])
    crop_uncond = torch.cat([_repeat_rows(e.crop_uncond, e.count) for e in items]) if crops else None
    return ImageEmbeds(cond, uncond, first.output, crop_cond, crop_uncond)
