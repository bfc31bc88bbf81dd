"""What the multi-host tests share: a free local port for the coordinator, and the environment of
one process with N forced CPU devices (the GANDISSECT_* multi-host variables removed)."""

from __future__ import annotations

import os
import socket


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
