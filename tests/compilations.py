"""Counting XLA compilations in tests: ``with compilations() as compiled: ...; assert len(compiled) == 0``.

A program loaded from the persistent compilation cache (``tests/conftest.py`` turns it on) counts
too: JAX records ``backend_compile_duration`` around the cache lookup as well as around a compile.
"""

import contextlib

import jax


@contextlib.contextmanager
def compilations():
    """Collects one entry per XLA compilation made inside the block."""
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        # public from jax 0.8.1; the declared minimum (0.7.2) has only the private function
        unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None)
        if unregister is None:
            from jax._src.monitoring import _unregister_event_duration_listener_by_callback as unregister
        unregister(listener)
