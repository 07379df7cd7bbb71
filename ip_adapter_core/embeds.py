"""Image encodings as the adapter consumes them, and ways to combine several references."""

from __future__ import annotations

from dataclasses import dataclass

import torch

COMBINE_MODES = ("concat", "add", "subtract", "average", "norm average")


@dataclass(frozen=True)
class ImageEmbeds:
    """CLIP encodings of reference images and of the unconditional (negative) image.

    cond: [N, D] image_embeds or [N, 257, D] penultimate hidden states, one row per reference.
    uncond: the same shape with 1 or N rows.
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


def combine(embeds: torch.Tensor, mode: str) -> torch.Tensor:
    """Fold N references [N, ...] into one [1, ...] (all modes but concat, handled on tokens).

    subtract: the first minus the others; norm average: weighted by each embedding's norm.
    """
    if mode == "add":
        return embeds.sum(dim=0, keepdim=True)
    if mode == "subtract":
        return embeds[:1] - embeds[1:].sum(dim=0, keepdim=True)
    if mode == "average":
        return embeds.mean(dim=0, keepdim=True)
    if mode == "norm average":
        norms = embeds.flatten(1).norm(dim=1)
        weights = (norms / norms.sum()).view(-1, *([1] * (embeds.ndim - 1)))
        return (embeds * weights).sum(dim=0, keepdim=True)
    raise ValueError(f"unknown combine mode {mode!r}; expected one of {', '.join(COMBINE_MODES)}")


def concat_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """[N, T, C] tokens of N references -> [1, N*T, C]: attend to all of them at once."""
    return tokens.reshape(1, -1, tokens.shape[-1])


def merge(first: ImageEmbeds, *others: ImageEmbeds) -> ImageEmbeds:
    """Several encodings as one batch of references (for the combine node)."""
    for other in others:
        if other.output != first.output or other.cond.shape[1:] != first.cond.shape[1:]:
            raise ValueError(
                f"cannot merge {other.output} {list(other.cond.shape[1:])} with {first.output} "
                f"{list(first.cond.shape[1:])}: encode every image with the same CLIP vision model and adapter"
            )
    items = (first, *others)
    uncond = [e.uncond.expand(e.count, *e.uncond.shape[1:]) for e in items]
    return ImageEmbeds(torch.cat([e.cond for e in items]), torch.cat(uncond), first.output)
