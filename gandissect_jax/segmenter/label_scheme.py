"""The unified-parsing segmenter's label numbering (objects, quad divisions, materials, parts) and its probabilities.

The reference's ``UnifiedParsingSegmenter`` (``netdissect/segmenter.py``) numbers one shared class
list from ``labels.json``: 0 ``-``, objects, for ``segdiv="quad"`` four blocks of divided objects,
materials, then the parts of sky, building and person; a part whose name is also an object takes
that object's number. :class:`LabelScheme` holds that numbering as static, hashable tables;
:class:`Probabilities` the per-group soft-maxed maps the network gives.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax

from .upernet import HeadSizes

__all__ = ["BGR_MEAN", "PART_OWNERS", "CATEGORIES", "SEGDIVS", "LabelScheme", "build_label_scheme",
           "Probabilities"]

BGR_MEAN = (102.9801, 115.9465, 122.7717)
PART_OWNERS = ("sky", "building", "person")  # hard-coded in the reference
CATEGORIES = ("object", "part", "material")
SEGDIVS = ("undivided", "quad")


class LabelScheme(NamedTuple):
    """Shared class numbering and the tables that combine the heads (all hashable, static)."""

    labels: tuple[tuple[str, str], ...]
    divmult: int
    num_object_classes: int          # N, without "-"
    num_object_labels: int           # N + 1
    num_material_labels: int         # including "-"
    material_offset: int             # N * divmult
    owner_objects: tuple[int, ...]   # object number of sky, building, person
    part_index: tuple[tuple[int, ...], ...]  # per owner: local part -> shared number
    part_slices: tuple[tuple[int, int], ...]  # per owner: channel range in the part logits
    part_names: tuple[str, ...]
    heads: HeadSizes

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def build_label_scheme(labeldata: Mapping[str, Any], segdiv: str = "undivided") -> LabelScheme:
    """Derive the reference's label numbering from labels.json for ``segdiv``."""
    if segdiv not in SEGDIVS:
        raise ValueError(f"segdiv must be one of {SEGDIVS}, got {segdiv!r}")
    objects = list(labeldata["object"])
    materials = list(labeldata["material"])
    object_part = labeldata["object_part"]
    mult = 5 if segdiv == "quad" else 1
    num_obj = len(objects) - 1
    first_part = num_obj * mult + 1 + (len(materials) - 1)
    object_numbers = {name: i for i, name in enumerate(objects)}
    for owner in PART_OWNERS:
        if owner not in object_numbers or owner not in object_part:
            raise ValueError(
                f"labels.json must list {owner!r} as an object with parts (object_part); the "
                f"unified-parsing segmenter uses the parts of {list(PART_OWNERS)}")
    # The decoder groups part channels by owner in ascending object number.
    slices, start = {}, 0
    for owner in sorted(object_part, key=lambda name: object_numbers[name]):
        slices[owner] = (start, start + len(object_part[owner]))
        start += len(object_part[owner])
    part_numbers: dict[str, int] = {}
    part_names: list[str] = []
    part_index = []
    for owner in PART_OWNERS:
        numbers = []
        for part in object_part[owner]:
            if part in object_numbers:
                numbers.append(object_numbers[part])
            else:
                if part not in part_numbers:
                    part_numbers[part] = first_part + len(part_names)
                    part_names.append(part)
                numbers.append(part_numbers[part])
        part_index.append(tuple(numbers))
    divided = [(f"{name}-{suffix}", "part") for suffix in ("t", "l", "b", "r")
               for name in objects[1:]] if segdiv == "quad" else []
    labels = ([(name, "object") for name in objects] + divided
              + [(name, "material") for name in materials[1:]]
              + [(name, "part") for name in part_names])
    return LabelScheme(
        labels=tuple(labels), divmult=mult, num_object_classes=num_obj,
        num_object_labels=len(objects), num_material_labels=len(materials),
        material_offset=num_obj * mult,
        owner_objects=tuple(object_numbers[o] for o in PART_OWNERS),
        part_index=tuple(part_index), part_slices=tuple(slices[o] for o in PART_OWNERS),
        part_names=tuple(part_names),
        heads=HeadSizes(object=len(objects), part=start, material=len(materials),
                        scene=len(labeldata["scene"])))


class Probabilities(NamedTuple):
    """Summed per-size softmax maps, NHWC at the output size; ``scene`` is ``(N, K)``."""

    object: jax.Array
    material: jax.Array
    parts: tuple[jax.Array, ...]  # one per owner (sky, building, person)
    scene: jax.Array


# ----------------------------------------------------------------------------------------------
# pure functions (jitted with static label/shape information)
