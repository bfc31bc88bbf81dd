"""``gandissect-jax layers MODEL``: the layers of a generator that can be dissected, with their shapes."""

from __future__ import annotations

import argparse

from .arguments import naming, text

DEFAULT_MODEL = "scenes64"

DESCRIPTION = f"""\
List the layers of a generator, in forward order, with the shape of one sample's representation
at each (height x width x units). These are the names that dissect --layers takes.

MODEL is a registry name (see: gandissect-jax weights list), a generator .pth file or a checkpoint
directory written by gandissect-jax convert; default: the shipped demo generator {DEFAULT_MODEL!r}.

  gandissect-jax layers
  gandissect-jax layers path/to/generator.pth"""


def add_parser(subparsers) -> None:
    """Register the ``layers`` sub-command."""
    parser = subparsers.add_parser(
        "layers", help="list a generator's layers and their shapes (the names dissect --layers takes)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL", type=text("a generator source"),
                        help="the generator: a registry name (see: gandissect-jax weights list), a generator .pth "
                             "file or a checkpoint directory written by gandissect-jax convert (default %(default)r, "
                             "the shipped demo generator)")
    parser.set_defaults(func=run)


def layer_shapes(generator) -> list[tuple[str, tuple[int, ...] | str]]:
    """(name, per-sample shape) of every layer of a generator, in forward order.

    Uses ``generator.layer_shape(layer)`` when the generator has it, else the shape of
    ``split(layer).h`` evaluated abstractly (``jax.eval_shape``: nothing is computed). A layer the
    generator cannot split (ValueError) gets the reason instead of a shape.
    """
    import jax
    import jax.numpy as jnp

    from gandissect_jax.generator import split_of

    shapes: list[tuple[str, tuple[int, ...] | str]] = []
    for layer in generator.layer_names:
        try:
            if hasattr(generator, "layer_shape"):
                shape = tuple(int(s) for s in generator.layer_shape(layer))
            else:
                z = jax.ShapeDtypeStruct((1, int(generator.z_dim)), jnp.float32)
                r, _ = jax.eval_shape(split_of(generator, layer).h, generator.params, z)
                shape = tuple(int(s) for s in r.shape[1:])
        except ValueError as err:
            shape = f"cannot be split: {err}"
        shapes.append((layer, shape))
    return shapes


def run(args: argparse.Namespace) -> int:
    """Print one line per layer: name and shape."""
    import gandissect_jax

    with naming("MODEL"):
        generator = gandissect_jax.load_generator(args.model)
    shapes = layer_shapes(generator)
    width = max(len(name) for name, _ in shapes)
    print(f"{args.model}: z_dim {generator.z_dim}, {len(shapes)} layers (height x width x units)")
    for name, shape in shapes:
        text = shape if isinstance(shape, str) else " x ".join(str(s) for s in shape)
        print(f"  {name:{width}s}  {text}")
    return 0
