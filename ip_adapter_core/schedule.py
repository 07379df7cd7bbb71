"""When in the sampling schedule an adapter acts.

The window is given as fractions of the schedule (0 = first step, 1 = last). Which noise level
(sigma) a fraction stands for depends on the model's sampling settings, which can change after
the adapter is applied (a ModelSampling node placed later), so fractions are turned into
sigmas only when the sampler runs, by the host, with the sampling object it actually uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def check_fractions(start: float, end: float) -> None:
    """Start and end are fractions of the schedule, 0 <= start <= end <= 1."""
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
        raise ValueError(f"start_at ({start}) and end_at ({end}) must lie between 0 and 1")
    if start > end:
        raise ValueError(f"start_at ({start}) is after end_at ({end}): the adapter would never act; "
                         "set start_at <= end_at")


@dataclass(frozen=True)
class ScheduleWindow:
    """Active from fraction `start` to fraction `end` of the schedule (both included)."""

    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        check_fractions(self.start, self.end)

    @property
    def always_on(self) -> bool:
        return self.start <= 0.0 and self.end >= 1.0

    def sigma_bounds(self, percent_to_sigma: Callable[[float], float]) -> tuple[float, float]:
        """(sigma at start, sigma at end) under a sampling's fraction-to-sigma map; sigma falls."""
        return float(percent_to_sigma(self.start)), float(percent_to_sigma(self.end))

    @staticmethod
    def contains(sigma: float, bounds: tuple[float, float]) -> bool:
        sigma_start, sigma_end = bounds
        return sigma_end <= sigma <= sigma_start
