"""ComfyUI's cond/uncond codes and the start/end gate on the sigma the sampler really uses."""

from __future__ import annotations

import weakref

import torch

from ...ip_adapter_core.schedule import ScheduleWindow

COMFY_COND, COMFY_UNCOND = 0, 1  # ComfyUI's cond_or_uncond codes


def sigma_on_host(sigmas: torch.Tensor) -> float:
    """The one device-to-host read of the gate (counted in tests: at most one per model call)."""
    return float(sigmas.max())


class ScheduleGate:
    """Decides, once per model call, whether an application's schedule window is open.

    Fractions become sigmas with the sampling object the model actually runs with, read when
    the sampler calls the model, so a ModelSampling node placed after Apply is honoured. The
    sigmas tensor of one model call is shared by all its layers: its value is read once.
    """

    def __init__(self, window: ScheduleWindow, base_model: torch.nn.Module):
        self.window = window
        self._base_model = weakref.ref(base_model)
        self._bounds: tuple[object, tuple[float, float]] | None = None  # (sampling object, bounds)
        self._last: tuple[torch.Tensor, bool] | None = None  # (sigmas of the last call, open?)

    def __deepcopy__(self, memo: dict) -> ScheduleGate:
        return self  # shared by clones, like the application

    def is_open(self, extra_options: dict) -> bool:
        if self.window.always_on:
            return True
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            return True
        last = self._last
        if last is not None and last[0] is sigmas:
            return last[1]
        is_open = ScheduleWindow.contains(sigma_on_host(sigmas), self._sigma_bounds())
        self._last = (sigmas, is_open)
        return is_open

    def _sigma_bounds(self) -> tuple[float, float]:
        base_model = self._base_model()
        sampling = getattr(base_model, "model_sampling", None)
        if sampling is None:
            raise RuntimeError("the model's sampling settings are gone: cannot place start_at/end_at")
        if self._bounds is None or self._bounds[0] is not sampling:
            self._bounds = (sampling, self.window.sigma_bounds(sampling.percent_to_sigma))
        return self._bounds[1]
