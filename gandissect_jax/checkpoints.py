"""Orbax checkpoints of a model: a params pytree plus a small JSON of its architecture.

Layout of a checkpoint directory::

    DIR/config.json   architecture and metadata (what is needed to rebuild the model)
    DIR/params/       the params pytree, written by orbax

Both are written into a temporary sibling directory that is renamed into place only when complete,
so a crash never leaves a half-written checkpoint under ``DIR``. Loading needs neither PyTorch nor
the original file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import jax
import numpy as np

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "is_checkpoint"]

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


class CheckpointError(ValueError):
    """Raised when a directory is not a readable gandissect-jax checkpoint."""


def is_checkpoint(directory: str | os.PathLike) -> bool:
    """True if ``directory`` looks like a checkpoint written by :func:`save_checkpoint`."""
    directory = os.fspath(directory)
    return os.path.isfile(os.path.join(directory, CONFIG_FILE)) and os.path.isdir(
        os.path.join(directory, PARAMS_DIR)
    )


def _checkpointer():
    import orbax.checkpoint as ocp  # imported lazily: orbax is slow to import

    return ocp.PyTreeCheckpointer()


def save_checkpoint(directory: str | os.PathLike, params: Any, config: Mapping[str, Any]) -> str:
    """Write ``params`` and ``config`` to ``directory`` atomically, replacing what was there.

    Args:
      directory: destination directory (created; an existing checkpoint there is replaced only
        after the new one is complete).
      params: pytree (nested dicts) of arrays, any dtype.
      config: JSON-serialisable mapping describing the architecture.

    Returns:
      The absolute path of the checkpoint directory.
    """
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    config_text = json.dumps(dict(config), indent=1, sort_keys=True)  # fail before writing anything
    host_params = jax.tree_util.tree_map(np.asarray, params)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        _checkpointer().save(os.path.join(tmp, PARAMS_DIR), host_params)
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            f.write(config_text + "\n")
        if os.path.exists(directory):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load_checkpoint(directory: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Returns:
      ``(params, config)``: params as a pytree of ``numpy.ndarray`` (nested dicts), config as a dict.

    Raises:
      FileNotFoundError: ``directory`` does not exist.
      CheckpointError: the directory is not a complete or readable checkpoint.
    """
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory at {directory}")
    if not is_checkpoint(directory):
        raise CheckpointError(
            f"{directory} is not a gandissect-jax checkpoint: expected {CONFIG_FILE} and {PARAMS_DIR}/"
        )
    try:
        with open(os.path.join(directory, CONFIG_FILE)) as f:
            config = json.load(f)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{directory}/{CONFIG_FILE} is corrupt: {err}") from err
    try:
        params = _checkpointer().restore(os.path.join(directory, PARAMS_DIR))
    except Exception as err:  # noqa: BLE001 - orbax raises many types; all mean "unreadable"
        raise CheckpointError(f"{directory}/{PARAMS_DIR} could not be restored: {err}") from err
    params = jax.tree_util.tree_map(np.asarray, params)
    return params, config
