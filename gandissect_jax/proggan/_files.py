"""Loading, saving and converting Progressive GAN generators: .pth files, orbax checkpoints and registry names."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import jax
import numpy as np
from ._config import CHECKPOINT_KIND, GeneratorConfig
from ._generator import ProgressiveGenerator, check_params
from ._state_dict import generator_from_state_dict



# --------------------------------------------------------------------------------------------
# Loading, saving, converting


def _single_pth_in(directory: Path) -> Path | None:
    files = sorted(directory.glob("*.pth"))
    if len(files) == 1:
        return files[0]
    return None


def _load_pth(path: Path) -> ProgressiveGenerator:
    from gandissect_jax.pth import read_pth

    return generator_from_state_dict(read_pth(path), source=str(path))


def load_generator(src: "str | os.PathLike | ProgressiveGenerator") -> ProgressiveGenerator:
    """Load a generator from a ``.pth`` file, an orbax checkpoint directory or a registry name.

    ``.pth`` files may be legacy (PyTorch 0.4) or zip format; they are read without torch.
    Registry names (see ``gandissect-jax weights list``) resolve to their converted checkpoint.

    Raises:
      FileNotFoundError: no such file, directory or registry name (or weights not fetched yet).
      ValueError: not a generator checkpoint, or a missing / mis-shaped tensor (named).
    """
    if isinstance(src, ProgressiveGenerator):
        return src
    from gandissect_jax import checkpoints, weights

    path = Path(weights.resolve(src, kind=CHECKPOINT_KIND))
    if path.is_dir():
        if checkpoints.is_checkpoint(path):
            params, config_dict = checkpoints.load_checkpoint(path)
            config = GeneratorConfig.from_dict(config_dict, source=str(path))
            if not isinstance(params, Mapping):
                raise ValueError(f"{path}: params are a {type(params).__name__}, not a mapping")
            return ProgressiveGenerator(check_params(params, config, source=str(path)), config)
        pth = _single_pth_in(path)
        if pth is None:
            raise ValueError(
                f"{path} is neither a gandissect-jax checkpoint (config.json + params/) nor a "
                "directory holding exactly one .pth file"
            )
        return _load_pth(pth)
    return _load_pth(path)


def save_generator(G: ProgressiveGenerator, directory: "str | os.PathLike", *, force: bool = False) -> str:
    """Write ``G`` as an orbax checkpoint directory (atomic); returns its absolute path.

    ``directory`` must not exist (or be empty); with ``force=True`` it may also be a checkpoint
    written by this library, which is replaced. Anything else there is refused and left untouched
    (see :mod:`gandissect_jax.checkpoints`).

    Raises:
      gandissect_jax.checkpoints.DestinationError: the destination may not be written.
    """
    from gandissect_jax.checkpoints import save_checkpoint

    params = jax.tree_util.tree_map(np.asarray, G.params)
    return save_checkpoint(directory, params, G.config.to_dict(), force=force)


def convert_reference(src: "str | os.PathLike", dest: "str | os.PathLike", *, force: bool = False) -> str:
    """Convert a reference ``.pth`` (or a directory holding exactly one) into a checkpoint at ``dest``.

    Needs no torch; ``dest`` is written atomically, and nothing is written if ``src`` is invalid.
    The destination is checked before ``src`` is read: it must not exist (or be empty), or --
    with ``force=True`` -- be a checkpoint written by this library; ``src`` and ``dest`` must not
    overlap. Returns the absolute path of ``dest``. This is the registry's converter for
    generators.

    Raises:
      gandissect_jax.checkpoints.DestinationError: ``dest`` may not be written, or overlaps ``src``.
      FileNotFoundError: ``src`` does not exist.
      ValueError (``PthError`` included): ``src`` is not a readable generator checkpoint (named).
    """
    from gandissect_jax.checkpoints import check_destination, check_distinct

    src = Path(src).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"no such file or directory: {src}")
    check_distinct(src, dest)
    check_destination(dest, force)
    if src.is_dir():
        pth = _single_pth_in(src)
        if pth is None:
            raise ValueError(f"{src}: expected exactly one .pth file in the directory")
        src = pth
    G = _load_pth(src)
    return save_generator(G, dest, force=force)


def images_to_uint8(images: jax.Array | np.ndarray) -> np.ndarray:
    """Kept for existing callers: :func:`gandissect_jax.images.to_uint8` (the one [-1, 1] -> uint8 rule)."""
    from gandissect_jax.images import to_uint8

    return to_uint8(images)
