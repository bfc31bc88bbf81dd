"""``gandissect-jax generate``: images (PNG) and, optionally, layer features (.npz) from a generator.

Output layout under ``--out DIR``::

    DIR/images/000000.png ...   one PNG per sample ([-1, 1] mapped to uint8 by gandissect_jax.images.to_uint8)
    DIR/z.npy                   the (N, z_dim) float32 latents (gandissect_jax.sample_z(N, z_dim, seed))
    DIR/features/<layer>.npz    array ``features``: (N, H, W, C) float32, NHWC, one file per --layers

Every file is written to a temporary name and renamed, so an interrupted run leaves no partial
file behind.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from . import arguments


DEFAULT_MODEL = "scenes64"
count = arguments.positive_int(arguments.MAX_SAMPLES)
z_seed = arguments.seed()
batch = arguments.batch_size()


def add_parser(subparsers) -> None:
    """Register the ``generate`` sub-command."""
    parser = subparsers.add_parser(
        "generate",
        help="generate images (and layer features) from a Progressive GAN",
        description="Generate PNG images, and optionally per-layer features as .npz, from a "
        "generator given as a registry name, a .pth file or a converted checkpoint directory "
        f"(default: the shipped demo generator {DEFAULT_MODEL!r}). Writes OUT/images/000000.png ..., "
        "OUT/z.npy (the latents) and OUT/features/LAYER.npz (array 'features', (N, H, W, C) float32) "
        "for each of --layers; list the layers with: gandissect-jax layers MODEL.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, type=arguments.text("a generator source"),
                        help="registry name, .pth file or checkpoint directory (default %(default)r)")
    parser.add_argument("--n", type=count, required=True, help=f"number of images, in {count.interval} (required)")
    parser.add_argument("--seed", type=z_seed, default=1,
                        help=f"z seed, in {z_seed.interval} (default %(default)s; the reference's standard_z_sample)")
    parser.add_argument("--out", required=True, type=arguments.text("a directory"),
                        help="output directory (made if missing)")
    parser.add_argument("--layers", nargs="*", default=[], type=arguments.text("a layer name"),
                        help="layers whose features to save (list them with: gandissect-jax layers MODEL)")
    parser.add_argument("--batch-size", type=batch, default=16,
                        help=f"images per forward pass, in {batch.interval} (default %(default)s)")
    parser.set_defaults(func=run)


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


def _save_npz(path: str, **arrays: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def run(args: argparse.Namespace) -> int:
    """Generate ``args.n`` images (and features) into ``args.out``."""
    from PIL import Image
    from tqdm.auto import tqdm

    from gandissect_jax.images import to_uint8
    from gandissect_jax.proggan import load_generator
    from gandissect_jax.sampling import sample_z

    arguments.check_directory(args.out, "--out")
    with arguments.naming("--model"):
        G = load_generator(args.model)
    layers = list(dict.fromkeys(args.layers))
    with arguments.naming("--layers"):
        for layer in layers:
            G.config.layer_index(layer)  # unknown layer: ValueError listing the valid names
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    z = sample_z(args.n, G.z_dim, args.seed)
    features = {
        layer: np.zeros((args.n, *G.layer_shape(layer)), np.float32) for layer in layers
    }
    for start in tqdm(range(0, args.n, args.batch_size), desc="generate", unit="batch"):
        batch = z[start : start + args.batch_size]
        images, feats = G.features(batch, tuple(layers))
        pixels = to_uint8(images)
        for offset, pixel in enumerate(pixels):
            path = out / "images" / f"{start + offset:06d}.png"
            _atomic_write(path, lambda tmp, p=pixel: Image.fromarray(p).save(tmp, format="PNG"))
        for layer in layers:
            features[layer][start : start + len(batch)] = np.asarray(feats[layer])
    _atomic_write(out / "z.npy", lambda tmp: _save_npy(tmp, z))
    if layers:
        (out / "features").mkdir(exist_ok=True)
    for layer, array in features.items():
        _atomic_write(
            out / "features" / f"{layer}.npz",
            lambda tmp, a=array: _save_npz(tmp, features=a),
        )
    print(f"wrote {args.n} images to {out / 'images'}" + (f" and features of {', '.join(layers)}" if layers else ""))
    return 0
