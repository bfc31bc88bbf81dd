"""Test-session set-up: one XLA persistent compilation cache shared by the tests and their subprocesses.

Many tests compile the same programs: the demo generator and segmenter at the same shapes, and
the CLI runs in subprocesses (multi-host processes, interrupted and resumed runs) that each
compile a whole dissection again. JAX's persistent compilation cache
(``jax_compilation_cache_dir``) lets a later compilation of an identical program load the
executable instead (the cache key covers the program, the compile options, the devices and the
jax/jaxlib versions, so results are unchanged). The cache lives in a fresh temporary directory
for each test session, removed at its end: nothing is carried between sessions or machines. A
``JAX_COMPILATION_CACHE_DIR`` already set by the user is used as it is and kept.
``tests/compilations.py`` counts a cache hit as a compilation, so the tests that assert that
nothing recompiles still catch a program compiled twice.
"""

from __future__ import annotations

import os
import shutil
import tempfile

_OWN_CACHE: list[str] = []


def pytest_configure(config):
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        path = tempfile.mkdtemp(prefix="gandissect-jax-tests-xla-cache-")
        _OWN_CACHE.append(path)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = path  # inherited by the tests' subprocesses
    # cache programs that take 0.2 s or more to compile (JAX's default: 1 s)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    # a size limit turns on JAX's file lock around cache reads and writes (processes share the cache)
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    jax.config.update("jax_compilation_cache_max_size", int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))


def pytest_unconfigure(config):
    for path in _OWN_CACHE:
        shutil.rmtree(path, ignore_errors=True)
