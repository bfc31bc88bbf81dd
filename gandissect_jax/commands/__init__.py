"""Sub-commands of the ``gandissect-jax`` CLI, one module each (see :mod:`gandissect_jax.cli`)."""
