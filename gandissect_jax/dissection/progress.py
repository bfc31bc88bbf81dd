"""Progress of a dissection: one overall bar with the run's ETA, and a named bar per pass ("pass 2/4: ...").

A dissection reads the data several times: the quantile passes, then the count pass (see
:mod:`.passes`). :class:`RunProgress` shows them as tqdm bars, ``pass k/n: <what it does>`` for
the running pass and, above it, one bar over the whole run whose ETA is the run's. Each pass
counts ``cost x samples``, where a pass's cost is its time per sample relative to the first
pass: a prior at the start (the count pass runs the segmenter too, so it costs several
quantile passes on a generator; :data:`COUNT_PASS_COST`), replaced by the measured ratio once a
twentieth of the pass has run. The first batch of each pass, which includes compiling it, is
not counted in any rate. A resumed run starts the overall bar where the saved progress is.
Give it to :func:`~.engine.tally` as ``progress=``.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

# Prior cost of a count-pass sample relative to a first-pass sample, measured on this project's
# 2-core CPU machine: the README's demo (generator source: the quantile passes run h only, the
# count pass also f and the segmenter) 5-7x; precomputed 7x7x16 features at 28x28 about 1.5x.
COUNT_PASS_COST = {"generator": 6.0, "arrays": 1.5}

# tally names of the passes -> what they do
PASS_NAMES = {
    "quantiles-0": "unit quantiles and top samples",
    "quantiles-1": "quantile refinement",
    "quantiles-2": "exact quantiles",
    "counts": "concept counts",
}


class _PassBar:
    """The running pass's tqdm bar; its updates also advance the overall bar by the pass's cost."""

    def __init__(self, run: "RunProgress", index: int | None, inner, initial: int):
        self.run, self.index, self.inner = run, index, inner
        self.done = initial  # samples of this pass done, resumed ones included
        self.timed_samples, self.started = 0, None  # after the first batch

    def update(self, count: int) -> None:
        self.inner.update(count)
        self.done += count
        if self.index is None or not self.run.enabled:
            return
        if self.started is None:  # the first batch includes compiling the pass: not part of any rate
            self.started = time.monotonic()
            self.run.jump(self)
            return
        self.timed_samples += count
        self.run.outer.update(count * self.run.costs[self.index])
        self.run.calibrate(self)

    def rate(self) -> float | None:
        """Samples per second since the first batch (None before there is a measure)."""
        elapsed = time.monotonic() - self.started if self.started is not None else 0.0
        return self.timed_samples / elapsed if self.timed_samples and elapsed > 0 else None

    def close(self) -> None:
        self.inner.close()
        if self.index == 0 and self.rate() is not None:
            self.run.reference_rate = self.rate()


class RunProgress:
    """Bars of a run over ``num_samples`` samples through the passes named ``passes`` (tally names, in order).

    costs: prior cost per sample of each pass relative to the first (default 1; see
    :data:`COUNT_PASS_COST`). enabled: False shows nothing. :meth:`bar` is called by ``tally``
    at the start of each pass (``initial`` = samples already done by a resumed pass); passes a
    resumed run had finished count as done.
    """

    def __init__(self, num_samples: int, passes: Sequence[str], *, costs: dict[str, float] | None = None,
                 enabled: bool = True, desc: str = "dissection"):
        from tqdm.auto import tqdm

        self.num_samples = int(num_samples)
        self.passes = list(passes)
        self.enabled = bool(enabled)
        self.costs = [float((costs or {}).get(name, 1.0)) for name in self.passes]
        self.calibrated = [index == 0 for index in range(len(self.passes))]
        self.reference_rate: float | None = None
        self.outer = tqdm(total=self.num_samples * sum(self.costs), desc=desc, disable=not self.enabled, unit="",
                          position=0, leave=False, smoothing=0.1,
                          bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")

    def stage_name(self, desc: str) -> str:
        """``pass k/n: what it does`` for a tally name (the name itself when it is not one of the passes)."""
        if desc not in self.passes:
            return desc
        return f"pass {self.passes.index(desc) + 1}/{len(self.passes)}: {PASS_NAMES.get(desc, desc)}"

    def bar(self, desc: str, total: int, initial: int) -> Any:
        from tqdm.auto import tqdm

        inner = tqdm(total=total, initial=initial, desc=self.stage_name(desc), unit="sample",
                     disable=not self.enabled, leave=False, position=1)
        index = self.passes.index(desc) if desc in self.passes else None
        bar = _PassBar(self, index, inner, initial)
        if index is not None and self.enabled:
            self.jump(bar)
        return bar

    def _work_done(self, bar: _PassBar) -> float:
        return self.num_samples * sum(self.costs[:bar.index]) + bar.done * self.costs[bar.index]

    def jump(self, bar: _PassBar) -> None:
        """Set the overall bar to the work done, without counting the jump in its rate."""
        self.outer.total = self.num_samples * sum(self.costs)
        self.outer.n = self.outer.last_print_n = self._work_done(bar)
        self.outer.last_print_t = self.outer._time()
        self.outer.refresh()

    def calibrate(self, bar: _PassBar) -> None:
        """Replace a pass's prior cost by its measured one, once a twentieth of it ran."""
        if self.calibrated[bar.index] or self.reference_rate is None:
            return
        rate = bar.rate()
        if rate is None or bar.timed_samples < max(1, self.num_samples // 20):
            return
        self.costs[bar.index] = self.reference_rate / rate
        self.calibrated[bar.index] = True
        self.jump(bar)

    def close(self) -> None:
        self.outer.close()


__all__ = ["RunProgress", "COUNT_PASS_COST", "PASS_NAMES"]
