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


@dataclass(frozen=True)
class ImageEmbeds:
    """CLIP encodings of reference images and of the unconditional (negative) image.

    cond: [N, D] image_embeds or [N, 257, D] penultimate hidden states, one row per reference.
    uncond: the same shape with 1 row (one negative shared by all references) or N rows.
    """

    cond: torch.Tensor
    uncond: torch.Tensor
    output: str  # "image_embeds" or "penultimate"

    @property
    def width(self) -> int:
        return self.cond.shape[-1]

    @property
    def count(self) -> int:
        return self.cond.shape[0]

    @property
    def shared_negative(self) -> bool:
        return self.uncond.shape[0] == 1

    def uncond_per_reference(self) -> torch.Tensor:
        """The negatives as [N, ...], one per reference (a shared one repeated)."""
        return self.uncond.expand(self.count, *self.uncond.shape[1:])


def combine(embeds: torch.Tensor, mode: str) -> torch.Tensor:
    """Fold N references [N, ...] into one [1, ...] (all modes but concat, handled on tokens).

    subtract: the first minus the others; norm average: weighted by each embedding's norm
    (all-zero embeddings have no norm to weigh by: their plain average, zero, is returned).
    """
    if mode == "add":
        return embeds.sum(dim=0, keepdim=True)
    if mode == "subtract":
        return embeds[:1] - embeds[1:].sum(dim=0, keepdim=True)
    if mode == "average":
        return embeds.mean(dim=0, keepdim=True)
    if mode == "norm average":
        norms = embeds.flatten(1).norm(dim=1)
        total = norms.sum()
        if total == 0:
            return embeds.mean(dim=0, keepdim=True)
        weights = (norms / total).view(-1, *([1] * (embeds.ndim - 1)))
        return (embeds * weights).sum(dim=0, keepdim=True)
    raise ValueError(f"unknown combine mode {mode!r}; expected one of {', '.join(COMBINE_MODES)}")


def combine_embeds(embeds: ImageEmbeds, mode: str) -> ImageEmbeds:
    """Several references folded into one with `mode`, the negative by the module's rule."""
    if mode == "concat" or embeds.count == 1:
        if mode not in COMBINE_MODES:
            raise ValueError(f"unknown combine mode {mode!r}; expected one of {', '.join(COMBINE_MODES)}")
        return embeds
    uncond = embeds.uncond if embeds.shared_negative else combine(embeds.uncond, mode)
    return ImageEmbeds(combine(embeds.cond, mode), uncond, embeds.output)


def image_tokens(project: Callable[[torch.Tensor], torch.Tensor], embeds: ImageEmbeds, combine_mode: str,
                 one_per_latent: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Cond and uncond image tokens, [1 or N, T, C] each, from encodings and a projection.

    one_per_latent: reference i for latent i ([N, T, C], nothing combined). Otherwise the
    references are combined (`combine_mode`), or with concat attended all at once: [1, N*T, C],
    each reference's tokens next to its own negative's.
    """
    if not one_per_latent:
        embeds = combine_embeds(embeds, combine_mode)
    cond = project(embeds.cond)
    uncond = project(embeds.uncond)
    if one_per_latent:
        return cond, uncond
    uncond = uncond.expand(embeds.count, *uncond.shape[1:])
    return concat_tokens(cond), concat_tokens(uncond)


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
    items = (first, *others)
    cond = torch.cat([e.cond for e in items])
    if all(e.shared_negative and torch.equal(e.uncond, first.uncond) for e in items):
        return ImageEmbeds(cond, first.uncond, first.output)
    return ImageEmbeds(cond, torch.cat([e.uncond_per_reference() for e in items]), first.output)
