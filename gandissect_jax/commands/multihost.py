"""The multi-host flags of the commands that run as N cooperating processes (``dissect``, ``ace``): the argument group, its usage check, and running a command's body on JAX's distributed runtime.

Every process runs the same command; only process 0 reads and writes ``--outdir``
(:mod:`gandissect_jax.dissection.distributed`). A process that stops on an error leaves with one
line naming itself and the error (:func:`leave`), so that the others fail at once rather than wait
in their next collective.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from . import arguments

num_processes = arguments.int_in_range(1, 65536)
process_id = arguments.int_in_range(0, 65535)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``multi-host`` group: --coordinator, --num-processes, --process-id, --multi-host."""
    hosts = parser.add_argument_group(
        "multi-host", "run as one of N cooperating processes (TPU pod slice, GPU cluster; the same command on\n"
        "every process); only process 0 reads and writes --outdir. Give the three flags below (or\n"
        "GANDISSECT_COORDINATOR, GANDISSECT_NUM_PROCESSES, GANDISSECT_PROCESS_ID), or --multi-host to let\n"
        "JAX detect the cluster (TPU pods, SLURM, Open MPI)")
    hosts.add_argument("--coordinator", metavar="HOST:PORT", type=arguments.text("HOST:PORT"),
                       help="address of process 0's coordination service, the port in [1, 65535]")
    hosts.add_argument("--num-processes", type=num_processes, default=None,
                       help=f"number of processes, in {num_processes.interval} (default: one process, this one)")
    hosts.add_argument("--process-id", type=process_id, default=None,
                       help=f"this process's number, in {process_id.interval} and below --num-processes "
                       "(default: none, one process)")
    hosts.add_argument("--multi-host", action="store_true",
                       help="jax.distributed.initialize() with no arguments: the cluster is detected (TPU pods, "
                       "SLURM, Open MPI); not with the three flags above")


def check(args) -> None:
    """Usage check (:class:`~gandissect_jax.commands.arguments.UsageError`): the multi-host flags,
    completed from the GANDISSECT_* variables, name a run (or none is given: then the variables
    alone are checked when the run starts); --multi-host goes without them."""
    flags = [flag for flag, value in (("--coordinator", args.coordinator), ("--num-processes", args.num_processes),
                                      ("--process-id", args.process_id)) if value is not None]
    if not flags:
        return
    if args.multi_host:
        raise arguments.UsageError(f"--multi-host lets JAX detect the cluster; give it without {', '.join(flags)} "
                                   "(or give --coordinator, --num-processes and --process-id without --multi-host)")
    from gandissect_jax.dissection import distributed

    try:
        distributed.process_settings(args.coordinator, args.num_processes, args.process_id)
    except ValueError as err:
        raise arguments.UsageError(str(err)) from None


def run(command: str, args, body: Callable[[argparse.Namespace], int]) -> int:
    """Join the other processes named by the multi-host flags (a no-op when none is given), before
    any JAX computation, then ``body(args)``. In a multi-process run an error leaves at once
    (:func:`leave`); with one process it propagates as usual."""
    from gandissect_jax.dissection import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.multi_host)
    if not distributed.multiprocess():
        return body(args)
    try:
        return body(args)
    except BaseException as err:  # noqa: BLE001 -- one line, then leave at once (see leave)
        leave(command, err)


def leave(command: str, err: BaseException) -> None:
    """One line ``gandissect-jax <command>: error: process I of N: ...`` naming this process and
    the error, then exit at once (status 130 after Ctrl-C, else 1).

    A process of a multi-host run that stops on an error must not wait in JAX's shutdown barrier for
    the others (which would wait for it in their next collective until a heartbeat timeout): it
    exits, its connections close, and the other processes' collectives fail at once. What process 0
    saved stays, so relaunching every process with the same command resumes.
    """
    import jax

    interrupted = isinstance(err, KeyboardInterrupt)
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if interrupted and jax.process_index() != 0:  # its own Interrupted knows no checkpoint: process 0 saved it
        first = "interrupted; process 0 saved the progress: relaunch every process with the same command to resume"
    if not interrupted and not isinstance(err, (ValueError, FileNotFoundError, KeyError, OSError)):
        first = (f"{type(err).__name__}: {first} (another process of this run probably stopped); what process 0 "
                 f"saved stays: relaunch every process with the same command to resume")
    print(f"gandissect-jax {command}: {'' if interrupted else 'error: '}process {jax.process_index()} of "
          f"{jax.process_count()}: {first}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130 if interrupted else 1)
