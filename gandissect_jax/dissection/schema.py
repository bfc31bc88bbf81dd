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

Label rules (added within schema 2, no meaning changed): each layer records the ``label_rule``
that chose its units' concepts and interpretability ('significant' or 'reference') and its
``fdr``; each unit its concept's ``chance_iou``, ``p_value``, ``q_value``, ``significant`` and its
``second`` concept; the settings record ``label_rule``. Documents written before have none of
these; :func:`upgrade` adds them as the reference rule with null statistics (those documents were
labelled by the reference's rule).

Max IoU (added within schema 2, no meaning changed): in every unit of a run with the IQR search
(the units that carry ``max_iqr``), the reference's ``--maxiou`` fields under the project's names:
``max_iou``, ``max_iou_label``, ``max_iou_labelnum``, ``max_iou_category``, ``max_iou_level``,
``max_iou_quantile`` and ``max_iou_fraction`` (the exact share of pixels above ``max_iou_level``)
-- the largest IoU of the unit with any concept over the IQR search's candidate levels,
unguarded, reported beside the unit's label and never used to label it (``scores.npz``:
``max_iou``, ``max_iou_level``, ``max_iou_quantile``, ``max_iou_fraction`` (L, U)). Units of
documents written before get the missing ones as null (:data:`UNIT_MAX_IOU`); ``scores.npz``
files written before read them as None. Documents and ``scores.npz`` files written with the
label rule 'maxiou' (briefly offered, then withdrawn) keep that rule's name and labels.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from .. import untrusted_json

SCHEMA = 2
UNIT_RENAMED = {"threshold": "level", "quantile": "activation_fraction"}  # schema 1 -> 2
SETTINGS_RENAMED = {"k": "topk"}
LAYER_ADDED = {"label_rule": "reference", "fdr": None}  # value for documents written before label rules
UNIT_ADDED = {"chance_iou": None, "p_value": None, "q_value": None, "significant": None, "second": None}
UNIT_MAX_IOU = {"max_iou": None, "max_iou_label": None, "max_iou_labelnum": None, "max_iou_category": None,
                "max_iou_level": None, "max_iou_quantile": None, "max_iou_fraction": None}  # IQR runs written before


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
    """A schema-2 copy of a schema-1 or schema-2 ``dissect.json`` document (top-level or per-layer),
    with the label-rule fields (:data:`LAYER_ADDED`, :data:`UNIT_ADDED`) and, in units of IQR runs,
    the max IoU fields (:data:`UNIT_MAX_IOU`) filled in where absent."""
    if not isinstance(document, dict) or not isinstance(document.get("layers"), list):
        raise ValueError('not a dissect.json document (no "layers" list)')
    upgraded = copy.deepcopy(document)
    if schema_of(document) < SCHEMA:
        upgraded["schema"] = SCHEMA
        if isinstance(upgraded.get("settings"), dict):
            upgraded["settings"] = _rename(upgraded["settings"], SETTINGS_RENAMED)
        for layer in upgraded["layers"]:
            layer["units"] = [_rename(unit, UNIT_RENAMED) for unit in layer.get("units", [])]
    if isinstance(upgraded.get("settings"), dict) and upgraded["settings"]:
        upgraded["settings"].setdefault("label_rule", LAYER_ADDED["label_rule"])
    for layer in upgraded["layers"]:
        if isinstance(layer, dict) and "label_rule" not in layer:  # written before label rules
            layer.update(LAYER_ADDED)
            for unit in layer.get("units", []):
                for key, value in UNIT_ADDED.items():
                    unit.setdefault(key, value)
        for unit in layer.get("units", []) if isinstance(layer, dict) else []:
            if isinstance(unit, dict) and "max_iqr" in unit:  # an IQR run: its max IoU fields, null if written before
                for key, value in UNIT_MAX_IOU.items():
                    unit.setdefault(key, value)
    return upgraded


def read_dissect_json(path: str) -> dict:
    """Read a ``dissect.json`` of any known schema as schema 2. ValueError naming the file when it is not one."""
    try:
        with open(path) as handle:
            document: Any = untrusted_json.load(handle)
        return upgrade(document)
    except (json.JSONDecodeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


__all__ = ["SCHEMA", "UNIT_RENAMED", "SETTINGS_RENAMED", "LAYER_ADDED", "UNIT_ADDED", "UNIT_MAX_IOU", "schema_of",
           "upgrade", "read_dissect_json"]
