"""Matching per-latent items (reference embeddings, masks) to the latents of a batch."""

from __future__ import annotations

import torch


def pad_batch(t: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """Item i of `t` for latent i; one item serves all, and with fewer items than latents the
    last one fills the rest. More items than latents is an error (which ones were meant?)."""
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    if t.shape[0] < batch:
        return torch.cat([t, t[-1:].expand(batch - t.shape[0], *t.shape[1:])])
    raise ValueError(f"{t.shape[0]} {what} for a batch of {batch} latents: give at most {batch} (one per latent)")
