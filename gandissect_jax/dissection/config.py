"""``DissectConfig``: every setting of a dissection in one frozen dataclass, checked when it is made."""

from __future__ import annotations

import dataclasses
import math
import numbers

from .memory import parse_memory

THRESHOLD_RULES = ("iqr", "quantile", "levels")
LABEL_RULES = ("significant", "reference")  # how a unit gets its concept (analysis.label_units)
# Ranges shared with the command line (gandissect_jax/commands/arguments.py; a test holds them equal).
MAX_BATCH = 65536  # samples per step
MAX_TOPK = 10000  # top samples per unit
DEFAULT_TOPK = 10
MAX_CHECKPOINT_SECONDS = 86400.0  # a day
MAX_SAMPLES = 2**31 - 1  # sample numbers are int32 on device
MAX_SEED = 2**32 - 1  # numpy RandomState seeds
MIN_THUMBSIZE, MAX_THUMBSIZE = 16, 1024  # pixels per side of a strip thumbnail
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
    topk: top samples kept per unit (by the maximum of the unit's map) and shown in its image
      strip, in [1, 10000] and at most the number of samples (None: 10, or every sample when
      there are fewer; :meth:`resolved_topk`).
    batch_size: samples per step over all devices.
    iou_threshold: a unit is interpretable when its concept's IoU is >= this (> under label rule
      'reference', with the reference's IQR > 0.01: LayerDissection.interpretable).
    label_rule: how a unit gets its concept (analysis.label_units): 'significant' (default; the
      concept must beat the chance IoU at false-discovery rate 0.05, large concepts are never
      hidden) or 'reference' (the reference's rule, to reproduce the paper's numbers).
    checkpoint_every: seconds between checkpoints of a running pass, in [0, 86400] (0: after
      every batch; Ctrl-C also saves the running pass, whatever the interval).
    unit_chunk: units per scatter step (default: 1 on CPU, 64 on accelerators).
    max_memory: memory budget of the passes, bytes or a size such as "4G" (default: half of the
      available host memory, 70% of an accelerator's free memory); units are measured in groups
      that fit it (:mod:`.memory`), with identical results.
    make_images / make_report: write the top-k image strips / dissect.json and the HTML report.
    make_labels: label the units (default). False (``--no-labels``, the reference's
      ``make_labels=False``): the segmentations are neither computed (a generator's segmenter never
      runs) nor read; each unit gets its levels, quantiles, top-k samples and strips, and its
      label is none (0). Needs the 'quantile' or 'levels' threshold rule (the default then), as
      the IQR rule chooses levels by agreement with the labels.
    thumbsize: side in pixels of each thumbnail of the image strips, in [16, 1024] (default None:
      the image size clamped to [96, 160]).
    title: title of the HTML report. progress: show progress bars.
    keep_progress: keep the pass checkpoints in ``<outdir>/.progress`` once the run is complete
      (by default they are removed; the run's identity and manifest stay).
    ValueError naming the setting and its allowed values for anything out of range (the same
    ranges as the command line's flags).
    """

    threshold: str | None = None
    quantile: float = 0.005
    search_iqr: bool | None = None
    topk: int | None = None
    batch_size: int = 32
    iou_threshold: float = 0.05
    label_rule: str = "significant"
    checkpoint_every: float = 60.0
    unit_chunk: int | None = None
    max_memory: int | float | str | None = None
    make_images: bool = True
    make_report: bool = True
    make_labels: bool = True
    thumbsize: int | None = None
    title: str | None = None
    progress: bool = True
    keep_progress: bool = False

    def __post_init__(self):
        def fail(name, allowed):
            raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        def integer(value, low, high):
            return isinstance(value, numbers.Integral) and not isinstance(value, bool) and low <= value <= high

        def real(value, low, high, low_open=False, high_open=False):
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(float(value)):
                return False
            value = float(value)
            return (value > low if low_open else value >= low) and (value < high if high_open else value <= high)

        if self.threshold is not None and self.threshold not in THRESHOLD_RULES:
            fail("threshold", "'iqr', 'quantile' or 'levels'")
        if not real(self.quantile, 0.0, 1.0, low_open=True, high_open=True):
            fail("quantile", "a number in (0, 1)")
        if self.topk is not None and not integer(self.topk, 1, MAX_TOPK):
            fail("topk", f"None or an integer in [1, {MAX_TOPK}]")
        if not integer(self.batch_size, 1, MAX_BATCH):
            fail("batch_size", f"an integer in [1, {MAX_BATCH}]")
        if self.unit_chunk is not None and not integer(self.unit_chunk, 1, MAX_BATCH):
            fail("unit_chunk", f"None or an integer in [1, {MAX_BATCH}]")
        if self.max_memory is not None:
            parse_memory(self.max_memory)  # ValueError naming max_memory
        if not real(self.iou_threshold, 0.0, 1.0):
            fail("iou_threshold", "a number in [0, 1]")
        if not real(self.checkpoint_every, 0.0, MAX_CHECKPOINT_SECONDS):
            fail("checkpoint_every", f"a number of seconds in [0, {MAX_CHECKPOINT_SECONDS:g}]")
        if self.thumbsize is not None and not integer(self.thumbsize, MIN_THUMBSIZE, MAX_THUMBSIZE):
            fail("thumbsize", f"None or an integer in [{MIN_THUMBSIZE}, {MAX_THUMBSIZE}]")
        for name in ("make_images", "make_report", "make_labels", "progress", "keep_progress"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "True or False")
        if self.label_rule not in LABEL_RULES:
            fail("label_rule", "'significant' or 'reference'")
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

    def resolved_topk(self, num_samples: int) -> int:
        """The number of top samples per unit for ``num_samples`` samples: ``topk``, or by default
        10 (fewer when there are fewer samples). ValueError when ``topk`` exceeds the samples."""
        if self.topk is None:
            return min(DEFAULT_TOPK, int(num_samples))
        if self.topk > num_samples:
            raise ValueError(f"topk ({self.topk}) must be at most the number of samples ({num_samples}): "
                             f"--topk in [1, {num_samples}]")
        return int(self.topk)

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


__all__ = ["DissectConfig", "THRESHOLD_RULES", "LABEL_RULES", "MAX_BATCH", "MAX_TOPK", "MAX_CHECKPOINT_SECONDS",
           "MAX_SAMPLES", "MAX_SEED"]
