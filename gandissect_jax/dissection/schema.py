"""The versions of ``dissect.json`` and ``scores.npz``: field names of schema 2, and reading schema-1 files.

Schema 2 (``"schema": 2`` in every ``dissect.json``, a ``schema`` array in ``scores.npz``) gives
every thing one name across code, CLI and JSON:

- ``threshold`` is the threshold *rule* ('iqr', 'quantile', 'levels'; CLI ``--threshold``), and a
  unit's threshold *value* is its ``level`` (``LayerDissection.levels``, CLI ``--levels``);
  schema 1 called the unit's value ``threshold`` too.
- ``quantile`` is the quantile rule's top fraction (CLI ``--quantile``); a unit's fraction of
  upsampled pixels above its level is ``activation_fraction`` (schema 1: the unit's ``quantile``).
- ``topk`` is the number of top samples kept per unit and shown in its strip (CLI ``--topk``);
  schema 1's settings called it ``k`` (API ``k=`` and ``strip_length=`` are still accepted).

``scores.npz`` kept its array names; schema-1 files simply have no ``schema`` array.
"""

from __future__ import annotations

import copy
import json
from typing import Any

SCHEMA = 2
UNIT_RENAMED = {"threshold": "level", "quantile": "activation_fraction"}  # schema 1 -> 2
SETTINGS_RENAMED = {"k": "topk"}


def schema_of(document: dict) -> int:
    """The schema version of a dissect.json document (1 when absent). ValueError for a newer one."""
    version = document.get("schema", 1)
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"dissect.json has an invalid schema {version!r}")
    if version > SCHEMA:
        raise ValueError(f"dissect.json has schema {version}; this gandissect-jax reads schemas 1 to {SCHEMA}")
    return version


def _rename(record: dict, renames: dict) -> dict:
    return {renames.get(key, key): value for key, value in record.items()}


def upgrade(document: dict) -> dict:
    """A schema-2 copy of a schema-1 or schema-2 ``dissect.json`` document (top-level or per-layer)."""
    if not isinstance(document, dict) or not isinstance(document.get("layers"), list):
        raise ValueError('not a dissect.json document (no "layers" list)')
    if schema_of(document) == SCHEMA:
        return copy.deepcopy(document)
    upgraded = copy.deepcopy(document)
    upgraded["schema"] = SCHEMA
    if isinstance(upgraded.get("settings"), dict):
        upgraded["settings"] = _rename(upgraded["settings"], SETTINGS_RENAMED)
    for layer in upgraded["layers"]:
        layer["units"] = [_rename(unit, UNIT_RENAMED) for unit in layer.get("units", [])]
    return upgraded


def read_dissect_json(path: str) -> dict:
    """Read a ``dissect.json`` of any known schema as schema 2. ValueError naming the file when it is not one."""
    try:
        with open(path) as handle:
            document: Any = json.load(handle)
        return upgrade(document)
    except (json.JSONDecodeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


__all__ = ["SCHEMA", "UNIT_RENAMED", "SETTINGS_RENAMED", "schema_of", "upgrade", "read_dissect_json"]
