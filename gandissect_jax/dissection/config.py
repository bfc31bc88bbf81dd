"""``DissectConfig``: every setting of a dissection in one frozen dataclass, checked when it is made."""

from __future__ import annotations

import dataclasses
import math
import numbers

from .memory import parse_memory

THRESHOLD_RULES = ("iqr", "quantile", "levels")
# Earlier keyword names, still accepted by dissect_features / dissect_generator.
ALIASES = {"k": "topk", "strip_length": "topk"}


@dataclasses.dataclass(frozen=True)
class DissectConfig:
    """Settings of a dissection (the data, the model and the output directory are arguments, not settings).

    threshold: per-unit threshold rule, 'iqr' (the paper's information-quality-ratio search),
      'quantile' (the exact 1 - ``quantile`` quantile of each unit's raw activations, the
      reference's default for precomputed data) or 'levels' (given levels); None: the entry
      point's default ('iqr' for generators, 'quantile' for precomputed features).
    quantile: the top fraction of activations that is active under the 'quantile' rule, in (0, 1).
    search_iqr: run the IQR threshold search (default: when the rule is 'iqr'; it can also run
      beside another rule, for its ``max_iqr*`` arrays).
    topk: top samples kept per unit (by the maximum of the unit's map) and shown in its image strip.
    batch_size: samples per step over all devices.
    iou_threshold: a unit is interpretable when its concept's IoU is >= this.
    checkpoint_every: seconds between checkpoints of a running pass (0: after every batch).
    unit_chunk: units per scatter step (default: 1 on CPU, 64 on accelerators).
    max_memory: memory budget of the passes, bytes or a size such as "4G" (default: half of the
      available host memory, 70% of an accelerator's free memory); units are measured in groups
      that fit it (:mod:`.memory`), with identical results.
    make_images / make_report: write the top-k image strips / dissect.json and the HTML report.
    title: title of the HTML report. progress: show progress bars.
    ValueError naming the setting and its allowed values for anything out of range.
    """

    threshold: str | None = None
    quantile: float = 0.005
    search_iqr: bool | None = None
    topk: int = 10
    batch_size: int = 32
    iou_threshold: float = 0.05
    checkpoint_every: float = 600.0
    unit_chunk: int | None = None
    max_memory: int | float | str | None = None
    make_images: bool = True
    make_report: bool = True
    title: str | None = None
    progress: bool = True

    def __post_init__(self):
        def fail(name, allowed):
            raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        if self.threshold is not None and self.threshold not in THRESHOLD_RULES:
            fail("threshold", "'iqr', 'quantile' or 'levels'")
        if not (isinstance(self.quantile, numbers.Real) and 0.0 < float(self.quantile) < 1.0):
            fail("quantile", "a number in (0, 1)")
        def positive_int(value):
            return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1

        for name in ("topk", "batch_size"):
            if not positive_int(getattr(self, name)):
                fail(name, "an integer >= 1")
        if self.unit_chunk is not None and not positive_int(self.unit_chunk):
            fail("unit_chunk", "None or an integer >= 1")
        if self.max_memory is not None:
            parse_memory(self.max_memory)  # ValueError naming max_memory
        if not (isinstance(self.iou_threshold, numbers.Real) and 0.0 <= float(self.iou_threshold) <= 1.0):
            fail("iou_threshold", "a number in [0, 1]")
        if not (isinstance(self.checkpoint_every, numbers.Real) and float(self.checkpoint_every) >= 0
                and not math.isnan(float(self.checkpoint_every))):
            fail("checkpoint_every", "a number of seconds >= 0")
        if self.search_iqr is not None and not isinstance(self.search_iqr, bool):
            fail("search_iqr", "None, True or False")

    def replace(self, **overrides) -> "DissectConfig":
        """A copy with some settings changed; the earlier names ``k`` and ``strip_length`` mean ``topk``.

        TypeError for an unknown setting; ValueError for conflicting aliases or bad values.
        """
        fields = {field.name for field in dataclasses.fields(self)}
        changes: dict = {}
        for name, value in overrides.items():
            target = ALIASES.get(name, name)
            if target not in fields:
                raise TypeError(f"unknown dissection setting {name!r}; settings are {sorted(fields)}")
            if target in changes and changes[target] != value:
                raise ValueError(f"conflicting values for {target}: {changes[target]!r} and {value!r} ({name})")
            changes[target] = value
        return dataclasses.replace(self, **changes)

    def resolved_threshold(self, default: str, has_levels: bool) -> tuple[str, bool]:
        """(threshold rule, whether the IQR search runs), given the entry point's default rule and
        whether fixed levels were given (they make the rule 'levels'). ValueError for contradictions."""
        threshold = "levels" if has_levels else (self.threshold or default)
        if threshold == "levels" and not has_levels:
            raise ValueError("threshold='levels' needs levels")
        search_iqr = threshold == "iqr" if self.search_iqr is None else self.search_iqr
        if threshold == "iqr" and not search_iqr:
            raise ValueError("threshold='iqr' needs the IQR search (search_iqr=True)")
        return threshold, search_iqr


__all__ = ["DissectConfig", "THRESHOLD_RULES"]
