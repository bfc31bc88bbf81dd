"""What the multi-host tests share: a free local port for the coordinator, the environment of one
process with N forced CPU devices (the GANDISSECT_* multi-host variables removed), and waiting for
the processes of a run."""

from __future__ import annotations

import os
import socket
import subprocess


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_env(devices: int) -> dict:
    """os.environ with ``devices`` forced host CPU devices and no GANDISSECT_* multi-host variable."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    for name in ("GANDISSECT_COORDINATOR", "GANDISSECT_NUM_PROCESSES", "GANDISSECT_PROCESS_ID"):
        env.pop(name, None)
    return env


def finish(processes, timeout: float) -> list[tuple[int, str]]:
    """(exit status, stdout + stderr) of each process, in order; all are killed when one runs past
    ``timeout`` seconds (a hung collective must not hang the suite)."""
    out = []
    for process in processes:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
        out.append((process.returncode, stdout + stderr))
    return out
