"""Measure the shipped demo pair: label frequencies of generated vs real scenes, and a sample grid.

    python scripts/demo_label_frequencies.py [--generator scenes64] [--segmenter scenes64-segmenter]

Writes ``<out>/label_frequencies.json`` and ``<out>/samples/shipped.png`` (32 samples for z seed 0
above 32 real scenes); ``<out>`` is results/demo_label_frequencies unless --out is given.
--update-shipped writes them into weights/scenes64 instead, where the tests check the shipped
checkpoints against them. ``scripts/train_demo_gan.py`` does the same at every export.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _outputs import SHIPPED, add_output_arguments, output_dir
from gandissect_jax.proggan import load_generator
from gandissect_jax.scenes.demo_segmenter import load_demo_segmenter


def write_report(G, S, out: Path, step=None, n: int = 512, seed: int = 0, n_real: int = 2000,
                 real_segmented=None) -> dict:
    """Write label_frequencies.json and samples/shipped.png for generator G under segmenter S."""
    import numpy as np
    from PIL import Image

    from gandissect_jax.sampling import sample_z
    from gandissect_jax.scenes import stats, world

    result = {"generator_step": step, **stats.demo_pair_report(G, S, n, seed, n_real, real_segmented)}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".label_frequencies.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out / "label_frequencies.json")
    fake = np.asarray(G(sample_z(32, G.z_dim, seed)))
    real, _ = world.render_scenes(0, np.arange(32))
    grid = world.image_grid(np.concatenate([fake, real]), columns=8)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out / "samples" / "shipped.png", optimize=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", default="scenes64")
    parser.add_argument("--segmenter", default="scenes64-segmenter")
    parser.add_argument("--n", type=int, default=512, help="generated images (z seed --seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", type=int, default=2000, help="real scenes (world seed 0)")
    add_output_arguments(parser, default="results/demo_label_frequencies", shipped="scenes64")
    args = parser.parse_args(argv)

    out = output_dir(parser, args)
    train_state = SHIPPED / "scenes64_train_state" / "config.json"
    step = json.loads(train_state.read_text()).get("step") if train_state.is_file() else None
    result = write_report(load_generator(args.generator), load_demo_segmenter(args.segmenter), out, step,
                          args.n, args.seed, args.real)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
