"""Test-host stand-in for torchaudio, for ComfyUI trees that import it at start-up (0.33.0: comfy/sd.py
reaches the LTX audio VAE). No torchaudio wheel loads beside the CPU torch 2.13 of this host, and the
pack never touches audio: importing works, using anything raises, naming what was used.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+ipadapter-exact-test-host-standin"


class StandinUsed(RuntimeError):
    pass


def _refuse(module: str, name: str):
    raise StandinUsed(f"{module}.{name} was used, but this test host's torchaudio is a stand-in with no "
                      "audio (tests/harness/host_standins/torchaudio): install a torchaudio that matches torch")


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    _refuse(__name__, name)


class _SubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Any `torchaudio.x.y` imports as an empty module whose attributes refuse the same way."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def refuse(name: str, _module=spec.name):
            if name.startswith("__"):
                raise AttributeError(name)
            _refuse(_module, name)

        module.__getattr__ = refuse
        return module

    def exec_module(self, module):
        pass


sys.meta_path.append(_SubmoduleFinder())
