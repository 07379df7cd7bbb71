"""When in the sampling schedule an adapter acts, as a range of noise levels (sigmas)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SigmaRange:
    """Active while sigma_end <= sigma <= sigma_start (sigma falls as sampling proceeds).

    The host converts start/end fractions of the schedule to sigmas; the defaults are
    always on.
    """

    sigma_start: float = float("inf")
    sigma_end: float = 0.0

    def contains(self, sigmas: torch.Tensor | float | None) -> bool:
        if sigmas is None or (self.sigma_start == float("inf") and self.sigma_end <= 0.0):
            return True
        sigma = float(sigmas.max()) if isinstance(sigmas, torch.Tensor) else float(sigmas)
        return self.sigma_end <= sigma <= self.sigma_start


def check_fractions(start: float, end: float) -> None:
    """Start and end are fractions of the schedule, 0 <= start <= end <= 1."""
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
        raise ValueError(f"start_at ({start}) and end_at ({end}) must lie between 0 and 1")
    if start > end:
        raise ValueError(f"start_at ({start}) is after end_at ({end}): the adapter would never act; "
                         "set start_at <= end_at")
