"""``gandissect-jax generate``: images (PNG) and, optionally, layer features (.npy) from a generator.

Output layout under ``--out DIR``::

    DIR/images/000000.png ...   one PNG per sample ([-1, 1] mapped to uint8 by gandissect_jax.images.to_uint8)
    DIR/z.npy                   the (N, z_dim) float32 latents (gandissect_jax.sample_z(N, z_dim, seed))
    DIR/features/<layer>.npy    (N, H, W, C) float32, NHWC, one file per --layers: what
                                ``gandissect-jax dissect --features`` reads

    DIR/generate.json           what the run writes (model, n, seed, layers), written first

Every file is written to a temporary name and renamed, so an interrupted run leaves no partial
file behind. Nothing of the user's is overwritten: ``--out`` must be new or empty, or hold the
output of an earlier ``generate`` (its ``generate.json``). A rerun of the same command
writes the same files again; another command (other model, n, seed or layers) is refused unless
``--force``, which first removes exactly the files the earlier run wrote, so no image of the
earlier run is left beside the new ones. The latents and features are kept in memory until they
are written: a run that would need more than the available memory is refused before any work.
"""

from __future__ import annotations

import argparse
import json
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
        description="Generate PNG images, and optionally per-layer features as .npy, from a "
        "generator given as a registry name, a .pth file or a converted checkpoint directory "
        f"(default: the shipped demo generator {DEFAULT_MODEL!r}). Writes OUT/images/000000.png ..., "
        "OUT/z.npy (the latents) and OUT/features/LAYER.npy ((N, H, W, C) float32, NHWC, ready for dissect --features) "
        "for each of --layers, and OUT/generate.json (the settings); list the layers with: "
        "gandissect-jax layers MODEL.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, type=arguments.text("a generator source"),
                        help="registry name, .pth file or checkpoint directory (default %(default)r)")
    parser.add_argument("--n", type=count, required=True, help=f"number of images, in {count.interval} (required)")
    parser.add_argument("--seed", type=z_seed, default=1,
                        help=f"z seed, in {z_seed.interval} (default %(default)s; the reference's standard_z_sample)")
    parser.add_argument("--out", required=True, type=arguments.text("a directory"),
                        help="output directory (made if missing): new or empty, or the output of an earlier "
                        "generate run (the same command rewrites it; other settings need --force); never "
                        "anything else")
    parser.add_argument("--layers", nargs="*", default=[], type=arguments.text("a layer name"),
                        help="layers whose features to save (list them with: gandissect-jax layers MODEL)")
    parser.add_argument("--batch-size", type=batch, default=16,
                        help=f"images per forward pass, in {batch.interval} (default %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="replace the output of an earlier generate run of other settings in --out (only "
                        "the files it wrote are removed; anything else in --out is always refused)")
    parser.set_defaults(func=run)


MARKER = "generate.json"


def _is_output(relative: str, settings: dict) -> bool:
    """True when a run of ``settings`` writes ``relative`` (a path under --out, the marker excluded):
    images/000000.png ... below n, z.npy, features/<layer>.npy (decided by name, never by listing
    n names: a forged generate.json may claim any n)."""
    if relative == "z.npy":
        return True
    folder, _, name = relative.partition("/")
    if folder == "images" and name.endswith(".png") and name[:-4].isdigit() and name.isascii():
        index = int(name[:-4])
        return index < settings["n"] and name == f"{index:06d}.png"
    return folder == "features" and name.endswith(".npy") and name[:-4] in settings["layers"]


def _earlier_settings(out: Path) -> dict | None:
    from gandissect_jax import untrusted_json

    try:
        with open(out / MARKER, encoding="utf-8") as handle:
            earlier = untrusted_json.load(handle)
    except (OSError, ValueError):
        return None
    valid = (isinstance(earlier, dict) and isinstance(earlier.get("n"), int) and not isinstance(earlier["n"], bool)
             and 0 < earlier["n"] <= arguments.MAX_SAMPLES and isinstance(earlier.get("layers"), list)
             and all(isinstance(layer, str) and layer and "/" not in layer and layer not in (".", "..")
                     for layer in earlier["layers"]))
    return earlier if valid else None


def prepare_out(out: Path, settings: dict, force: bool) -> None:
    """Make ``out`` ready for a run of ``settings`` without touching anything of the user's:
    ValueError naming --out when it holds entries that no generate run wrote, or the output of a
    generate run of other settings (without ``force``); with ``force``, that earlier run's files
    (the ones its settings name) are removed, then its emptied folders."""
    if not out.exists():
        return
    entries = sorted(os.listdir(out))
    if not entries:
        return
    earlier = _earlier_settings(out) if MARKER in entries else None
    if earlier is None:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ValueError(f"--out {out} already holds {shown}, which no gandissect-jax generate run wrote; "
                         "generate writes into a new or empty directory (nothing was written)")
    def theirs(relative: str) -> bool:  # not a file a run of ``earlier`` wrote (links never are)
        path = out / relative
        return not (_is_output(relative, earlier) and path.is_file() and not path.is_symlink())

    foreign = [entry for entry in entries if entry not in ("images", "features", MARKER) and theirs(entry)]
    listed = []
    for folder in ("images", "features"):
        if folder in entries:
            if not (out / folder).is_dir() or (out / folder).is_symlink():
                foreign.append(folder)
            else:
                listed += [f"{folder}/{name}" for name in sorted(os.listdir(out / folder))]
    foreign += [relative for relative in listed if theirs(relative)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ValueError(f"--out {out} holds {shown}, which no gandissect-jax generate run wrote; move it away or "
                         "choose another --out (nothing was written)")
    if earlier == settings:
        return  # the same command again: the same files, rewritten
    if not force:
        changed = ", ".join(f"{key} was {earlier.get(key)!r}, now {settings[key]!r}" for key in settings
                            if earlier.get(key) != settings[key])
        raise ValueError(f"--out {out} holds the output of another generate run ({changed}); give --force to "
                         "replace it (only its files are removed) or choose another --out (nothing was written)")
    for relative in listed + ["z.npy"]:
        path = out / relative
        if path.is_file() and not path.is_symlink():
            path.unlink()
    for folder in ("features", "images"):
        if (out / folder).is_dir() and not os.listdir(out / folder):
            (out / folder).rmdir()
    (out / MARKER).unlink()


def check_memory(n: int, z_dim: int, feature_shapes: dict) -> None:
    """ValueError naming --n when the latents (float64 while drawn) and the features (float32) of
    ``n`` samples, held until they are written, exceed the host memory available now."""
    from gandissect_jax.dissection.memory import available_host_memory

    per_sample = 8 * z_dim + sum(4 * int(np.prod(shape)) for shape in feature_shapes.values())
    available = available_host_memory()
    if n * per_sample > available:
        fits = max(1, available // per_sample)
        raise ValueError(f"--n {n} needs {n * per_sample / 2**30:.1f} GiB for the latents and features, held "
                         f"until they are written; {available / 2**30:.1f} GiB are available: --n in [1, {fits}] "
                         "(or generate in parts, each with its own --seed and --out)")


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
    with arguments.naming("--n"):
        check_memory(args.n, G.z_dim, {layer: G.layer_shape(layer) for layer in layers})
    settings = {"model": os.path.abspath(args.model) if os.path.exists(args.model) else args.model,
                "n": args.n, "seed": args.seed, "layers": layers}
    prepare_out(out, settings, args.force)
    (out / "images").mkdir(parents=True, exist_ok=True)
    _atomic_write(out / MARKER, lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=1)))
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
            out / "features" / f"{layer}.npy",
            lambda tmp, a=array: _save_npy(tmp, a),
        )
    print(f"wrote {args.n} images to {out / 'images'}" + (f" and features of {', '.join(layers)}" if layers else ""))
    return 0
