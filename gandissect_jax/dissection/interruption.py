"""Where a rerun of an interrupted dissection resumes: the one line Ctrl-C says at any point of a run.

A dissection checks its input, runs its passes (:mod:`.passes`: quantile passes, then the count
pass, per unit group), scores every layer, then writes each layer's ``scores.npz``, its strips
and the report. A :class:`ResumeTracker` follows the passes as they run (it is the passes'
progress display, :class:`~.engine.PassProgress`, wrapping the real one) and reads the run's done
markers (:class:`~.resume.RunDirectory`) when Ctrl-C comes, so that what it says is what a rerun
finds: :meth:`ResumeTracker.interrupted` turns any ``KeyboardInterrupt`` raised inside the run
into a :class:`RunInterrupted` whose ``str()`` says what is saved and where a rerun resumes.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from . import distributed
from .engine import Interrupted
from .progress import PASS_NAMES


class RunInterrupted(Interrupted):
    """A dissection stopped by Ctrl-C; ``str()`` is one line saying what is saved and where a rerun resumes.

    ``stage`` names where it stopped (``pass 3/4: exact quantiles``, ``scoring``, ``strips``,
    ``report``, ...); ``samples_done``, ``num_samples`` and ``checkpoint`` are those of the
    :class:`~.engine.Interrupted` of a pass (None elsewhere).
    """

    def __init__(self, message: str, stage: str, cause: Interrupted | None = None):
        super().__init__(stage, getattr(cause, "samples_done", None), getattr(cause, "num_samples", None),
                         getattr(cause, "checkpoint", None))
        self.message = message

    def __str__(self) -> str:
        return f"interrupted: {self.message}"


def _listing(names: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


class _Bar:
    """A pass's bar as ``tally`` sees it: the display's bar, and the samples counted for the tracker."""

    def __init__(self, tracker: "ResumeTracker", inner, total: int, initial: int):
        self.tracker, self.inner, self.total, self.done = tracker, inner, int(total), int(initial)
        self.on_disk = int(initial)  # samples a rerun of this pass finds saved (a resumed pass starts there)

    def saved(self, samples_done: int) -> None:
        """``tally`` saved the pass's state up to ``samples_done``."""
        self.on_disk = int(samples_done)

    @property
    def persisted(self) -> bool:
        """The finished pass's results are on disk (a rerun does not run it again)."""
        return self.on_disk >= self.total

    def update(self, count: int) -> None:
        self.done += int(count)
        self.inner.update(count)

    def close(self) -> None:
        self.tracker.finished = self.done >= self.total
        self.inner.close()


class ResumeTracker:
    """Follows one dissection run so that Ctrl-C at any point says, in one line, where a rerun resumes.

    outdir: the run's output directory (None: nothing is saved). :meth:`passes` wraps the passes'
    progress display; :meth:`opened` gives the run directory once it is open; :meth:`interrupted`
    turns a ``KeyboardInterrupt`` into a :class:`RunInterrupted`.
    """

    def __init__(self, outdir: str | None):
        self.outdir = outdir
        self.run = None
        self.pending: list[str] = []
        self.dirnames: dict[str, str] = {}
        self.saved_layers: Callable[[], list[str]] = lambda: []
        self.images = self.report = False
        self.names: list[str] = []  # the passes of a unit group, tally names in order
        self.groups = 0
        self.directory: str | None = None  # where the passes' checkpoints are
        self.group, self.index, self.finished = 0, -1, False  # the pass running (or last run)
        self.current: _Bar | None = None

    # ------------------------------------------------------------------ what the run tells

    def opened(self, run, pending: Sequence[str], dirnames: dict[str, str], saved_layers: Callable[[], list[str]],
               *, images: bool, report: bool) -> None:
        """The run directory is open: ``pending`` layers are to be measured; ``saved_layers()`` lists
        the layers whose scores a rerun would load (as the run decides it); images / report: whether
        the run writes strips / the report."""
        self.run, self.pending, self.dirnames, self.saved_layers = run, list(pending), dict(dirnames), saved_layers
        self.images, self.report = bool(images), bool(report)

    def passes(self, display: Any, names: Sequence[str], groups: int, directory: str | None) -> "ResumeTracker":
        """Follow the passes ``names`` (tally names, in order) of each of ``groups`` unit groups, whose
        checkpoints live in ``directory``; ``display`` is the progress to show them on (a
        :class:`~.engine.PassProgress`, or True / False for plain tqdm bars). Returns the object to
        give ``tally`` as ``progress=``."""
        self.display, self.names, self.groups, self.directory = display, list(names), int(groups), directory
        return self

    def result_saved(self, desc: str) -> None:
        """The pass ``desc`` finished and its results were saved outside its checkpoint (the
        quantile plan), so a rerun starts after it."""
        if self.current is not None and self.index >= 0 and self.names[self.index] == desc:
            self.current.on_disk = self.current.total

    def _unsaved_pass(self) -> bool:
        """The pass that ran last is finished but a rerun would not find its results saved."""
        if distributed.multiprocess() and not distributed.is_leader():
            return False  # only process 0 saves: the others cannot tell (the CLI prints a generic line there)
        return bool(self.outdir) and self.current is not None and not self.current.persisted

    def _redo(self, stage: str) -> str:
        """Where a rerun takes up the finished but unsaved pass ``stage`` (the current one)."""
        samples = self.current.on_disk if self.current is not None else 0
        return f"resume {stage} from sample {samples:,} (its last checkpoint)" if samples else f"run {stage} again"

    def bar(self, desc: str, total: int, initial: int) -> _Bar:
        """:class:`~.engine.PassProgress`: a pass starts (``initial`` samples already done by a resumed run)."""
        index = self.names.index(desc) if desc in self.names else self.index
        if self.index >= 0 and index <= self.index:  # passes run in order within a group: the next group
            self.group += 1
        self.index, self.finished = index, False
        if hasattr(self.display, "bar"):
            inner = self.display.bar(desc, total, initial)
        else:
            from tqdm.auto import tqdm

            inner = tqdm(total=total, initial=initial, desc=self._pass_name(index), unit="sample",
                         disable=not self.display, leave=False)
        self.current = _Bar(self, inner, total, initial)
        return self.current

    # ------------------------------------------------------------------ what Ctrl-C says

    def _pass_name(self, index: int) -> str:
        name = self.names[index] if 0 <= index < len(self.names) else "?"
        group = f"unit group {self.group + 1}/{self.groups}, " if self.groups > 1 else ""
        return f"{group}pass {index + 1}/{len(self.names)}: {PASS_NAMES.get(name, name)}"

    def _say(self, happened: str, saved: str | None, resume: str) -> str:
        """``happened; saved: rerun ... to resume`` (``happened; nothing was saved (no outdir)`` without one)."""
        if not self.outdir:
            return f"{happened}; nothing was saved (no outdir)"
        rerun = ("relaunch every process with the same command" if distributed.multiprocess()
                 else "rerun the same command")
        return f"{happened}; {saved}: {rerun} to {resume}" if saved else f"{happened}: {rerun} to {resume}"

    def interrupted(self, stop: KeyboardInterrupt) -> RunInterrupted:
        """The :class:`RunInterrupted` saying where a rerun resumes after ``stop`` (a KeyboardInterrupt,
        or the :class:`~.engine.Interrupted` of a pass) reached the run."""
        if isinstance(stop, RunInterrupted):
            return stop
        cause = stop if isinstance(stop, Interrupted) else None
        if self.run is None:
            return self._before()
        saved = [layer for layer in self.saved_layers() if layer in self.pending]
        unsaved = [layer for layer in self.pending if layer not in saved]
        if unsaved and not self._passes_done():
            return self._in_passes(cause)
        if unsaved and saved:
            return RunInterrupted(self._say(f"while saving the scores: those of {_listing(saved)} are saved, "
                                            f"those of {_listing(unsaved)} not", None,
                                            f"measure {_listing(unsaved)} again (from pass 1) and write the rest"),
                                  "saving the scores")
        if unsaved:
            every = " of every unit group" if self.groups > 1 else ""
            rest = ", ".join(["save the scores"] + (["write the strips"] if self.images else []))
            rest += " and write the report" if self.report else ""
            if self._unsaved_pass():
                # the last pass keeps its results in memory for the scores (no final checkpoint)
                stage = self._pass_name(self.index)
                return RunInterrupted(self._say(f"after the passes: all {len(self.names)} passes{every} done, "
                                                f"{stage} not saved (its results are saved with the scores)",
                                                f"progress saved in {self.directory}",
                                                f"{self._redo(stage)}, score {_listing(unsaved)}, then {rest}"),
                                      stage, cause)
            return RunInterrupted(self._say(f"after the passes: all {len(self.names)} passes{every} done",
                                            f"progress saved in {self.directory}",
                                            f"redo only the scoring of {_listing(unsaved)}, then {rest}"),
                                  "scoring", cause)
        return self._outputs()

    def _before(self) -> RunInterrupted:
        progress = os.path.join(self.outdir, ".progress") if self.outdir else None
        if progress and os.path.isdir(progress) and any(name.startswith("passes-") for name in os.listdir(progress)):
            message = self._say("before the passes (checking the input)",
                                f"the progress of an earlier run is kept in {progress}", "resume from it")
        else:
            message = self._say("before the passes (checking the input)", "nothing was measured yet", "start")
        return RunInterrupted(message, "checking the input")

    def _passes_done(self) -> bool:
        return (bool(self.names) and self.group >= self.groups - 1 and self.index == len(self.names) - 1
                and self.finished)

    def _in_passes(self, cause: Interrupted | None) -> RunInterrupted:
        saved = f"progress saved in {self.directory}"
        if self.index < 0:  # no pass started yet
            stage = self._pass_name(0)
            return RunInterrupted(self._say(f"before {stage}", saved, "start there"), stage, cause)
        stage = self._pass_name(self.index)
        if cause is not None and cause.samples_done < cause.num_samples:  # Ctrl-C inside a pass: saved there
            where = f"progress saved in {os.path.dirname(cause.checkpoint)}" if cause.checkpoint else None
            return RunInterrupted(self._say(f"{stage} stopped at sample {cause.samples_done:,} of "
                                            f"{cause.num_samples:,}", where, "resume from there"), stage, cause)
        if not self.finished and cause is None:  # a second Ctrl-C: the pass stopped before it could save
            bar = self.current
            return RunInterrupted(self._say(f"{stage} stopped at once near sample {bar.done:,} of {bar.total:,}",
                                            f"its last checkpoint is in {self.directory}",
                                            "resume this pass from there"), stage)
        if self._unsaved_pass():  # finished, its results not yet saved
            return RunInterrupted(self._say(f"{stage} finished but not yet saved", saved, self._redo(stage)),
                                  stage, cause)
        # between two passes: the last one is complete and saved
        n = len(self.names)
        group = ""
        if self.groups > 1:
            before = "" if self.group == 0 else "unit group 1 of {G} done, " if self.group == 1 else \
                "unit groups 1-{g} of {G} done, "
            group = (before + "unit group {h}/{G}: ").format(g=self.group, h=self.group + 1, G=self.groups)
        finished = ("pass 1" if self.index == 0 else f"passes 1-{self.index + 1}") + f" of {n}"
        names = ", ".join(PASS_NAMES.get(name, name) for name in self.names[:self.index + 1])
        if self.index + 1 < n:
            following = self._pass_name(self.index + 1)
        else:
            following = f"unit group {self.group + 2}/{self.groups}, pass 1/{n}: {PASS_NAMES[self.names[0]]}"
        return RunInterrupted(self._say(f"{group}{finished} done ({names})", saved, f"resume at {following}"),
                              following, cause)

    def _outputs(self) -> RunInterrupted:
        layers = list(self.dirnames)
        strips = [layer for layer in layers if self.images and not self.run.is_marked(f"images-{self.dirnames[layer]}")]
        if strips:
            what = f"the strips of {_listing(strips)}" + (" and the report" if self.report else "")
            return RunInterrupted(self._say(f"while writing the strips: the scores of every layer are saved, the "
                                            f"strips of {_listing(strips)} not", None, f"write only {what}"), "strips")
        if self.report:
            saved = "the scores and strips" if self.images else "the scores"
            return RunInterrupted(self._say(f"while writing the report: {saved} of every layer are saved", None,
                                            "write only the report"), "report")
        return RunInterrupted(self._say("after every output was written", None, "load the results again"), "done")


__all__ = ["ResumeTracker", "RunInterrupted"]
