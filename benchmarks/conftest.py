"""Shared pytest configuration of the benchmark suites (run with ``pytest benchmarks/``).

- Files named ``bench_*.py`` are collected as test modules (as well as ``test_*.py``).
- pytest-benchmark's machine info is extended with the CPU model and the JAX devices, so saved
  results say what they were measured on.
- The PyTorch reference is imported through :mod:`reference_harness` (``$GANDISSECT_REFERENCE``).
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # `import reference_harness` from any bench file


def pytest_collect_file(file_path, parent):
    # files named on the command line are already collected by pytest itself
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def cpu_model() -> str:
    """The CPU model name (from /proc/cpuinfo), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def pytest_benchmark_update_machine_info(config, machine_info):
    import os

    import jax

    machine_info["cpu_model"] = cpu_model()
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["jax_version"] = jax.__version__
    machine_info["jax_devices"] = [str(d) for d in jax.devices()]
