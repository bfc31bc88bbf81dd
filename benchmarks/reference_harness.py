"""Import the PyTorch reference (CSAILVision/gandissect, package ``netdissect``) for benchmarks.

The reference checkout is taken from ``$GANDISSECT_REFERENCE`` (the directory that contains
``netdissect/``); nothing of it is vendored here. Benchmarks call :func:`import_reference`, which
skips the test with a clear message when the variable is unset, the checkout is missing or torch
is not installed, and otherwise makes the 2018-era code run on a current CPU-only torch:

- ``torchvision`` (imported by ``netdissect/__init__.py``) has no CPU build here: when it is not
  importable, a stub package is put in ``sys.modules`` whose attributes are placeholder classes
  that refuse to be instantiated (nothing the benchmarks time uses torchvision);
- the code was written for PyTorch 0.4, whose ``grid_sample`` behaved like
  ``align_corners=True``: ``torch.nn.functional.grid_sample`` is wrapped to default to it;
- ``.cuda()`` calls are hard-coded: ``Tensor.cuda`` and ``Module.cuda`` become the identity;
- CUDA-only extension modules (e.g. the PrRoI pooling of the segmenter) can be replaced by passing
  ``extra_modules={"netdissect.upsegmodel.prroi_pool": cpu_module}``;
- ``scipy.misc.imresize`` (used by the reference's segmentation strips; removed in SciPy 1.3) is
  given back as what it was, a Pillow resize of a uint8 array (``interp="nearest"`` etc.);
- ``skimage`` (scikit-image) must be installed: ``netdissect.segmenter`` imports it.

Usage in a benchmark::

    from reference_harness import import_reference
    proggan = import_reference("netdissect.proggan")
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Mapping

ENV_VAR = "GANDISSECT_REFERENCE"
_SHIMS_INSTALLED = False


def reference_checkout() -> Path | None:
    """The reference checkout named by ``$GANDISSECT_REFERENCE``, or None if unset."""
    value = os.environ.get(ENV_VAR)
    return Path(value).expanduser().resolve() if value else None


def skip_reason() -> str | None:
    """Why the reference cannot run here (None when it can)."""
    root = reference_checkout()
    if root is None:
        return f"${ENV_VAR} is not set (point it at a checkout of CSAILVision/gandissect)"
    if not (root / "netdissect" / "__init__.py").is_file():
        return f"${ENV_VAR}={root} has no netdissect/ package"
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (pip install torch==2.13.0, or the [torch] extra)"
    return None


class _Placeholder:
    """Stands for any torchvision class or function; using it is an error."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision is stubbed by the benchmark harness and cannot be used")


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (_Placeholder,), {"__module__": self.__name__})
        setattr(self, name, value)
        return value


def _stub_torchvision() -> None:
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return
    names = (
        "torchvision",
        "torchvision.transforms",
        "torchvision.transforms.functional",
        "torchvision.datasets",
        "torchvision.datasets.folder",
        "torchvision.models",
        "torchvision.utils",
    )
    for name in names:
        module = _StubModule(name)
        module.__path__ = []  # a package, so submodule imports resolve through sys.modules
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)


def _patch_torch() -> None:
    import torch
    import torch.nn.functional as F

    original = F.grid_sample
    if not getattr(original, "_gandissect_align_corners", False):

        def grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=None):
            if align_corners is None:
                align_corners = True  # PyTorch 0.4 behaviour the reference was written for
            return original(input, grid, mode=mode, padding_mode=padding_mode,
                            align_corners=align_corners)

        grid_sample._gandissect_align_corners = True
        F.grid_sample = grid_sample
        torch.nn.functional.grid_sample = grid_sample

    def identity(self, *args, **kwargs):
        return self

    torch.Tensor.cuda = identity
    torch.nn.Module.cuda = identity


def _restore_imresize() -> None:
    import scipy
    import scipy.misc

    if hasattr(scipy.misc, "imresize"):
        return
    from PIL import Image
    import numpy as np

    resamples = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                 "lanczos": Image.LANCZOS}

    def imresize(arr, size, interp="bilinear", mode=None):
        """SciPy <= 1.2's ``imresize`` for uint8 arrays with a (height, width) size."""
        image = Image.fromarray(np.asarray(arr, dtype=np.uint8), mode=mode)
        return np.asarray(image.resize((int(size[1]), int(size[0])), resample=resamples[interp]))

    scipy.misc.imresize = imresize


def install_shims(extra_modules: Mapping[str, types.ModuleType] | None = None) -> None:
    """Install the torchvision stub, the torch patches and ``extra_modules`` (idempotent)."""
    global _SHIMS_INSTALLED
    if not _SHIMS_INSTALLED:
        _stub_torchvision()
        _patch_torch()
        _restore_imresize()
        _SHIMS_INSTALLED = True
    for name, module in (extra_modules or {}).items():
        sys.modules[name] = module


def import_reference(module: str, extra_modules: Mapping[str, types.ModuleType] | None = None):
    """Import ``module`` (e.g. ``"netdissect.proggan"``) from the reference, or skip the test."""
    import pytest

    reason = skip_reason()
    if reason is not None:
        pytest.skip(f"reference not available: {reason}")
    install_shims(extra_modules)
    root = str(reference_checkout())
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(module)
