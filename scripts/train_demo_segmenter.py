"""Train the demo segmenter (a small U-Net) on the scene world and evaluate it on held-out scenes.

    python scripts/train_demo_segmenter.py                    # into results/demo_segmenter/segmenter
    python scripts/train_demo_segmenter.py --update-shipped   # replace the shipped weights/scenes64/segmenter

Training scenes are world seed ``--seed`` scenes 0, 1, 2, ...; evaluation uses world seed
``--eval-seed`` (different scenes). Images are augmented with random blur and noise so the
segmenter also labels the softer images a generator makes. Writes the orbax checkpoint, a
metrics JSON (pixel accuracy, per-class IoU) and a log next to it.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from _outputs import add_output_arguments, output_dir
from gandissect_jax.scenes import world
from gandissect_jax.scenes.demo_segmenter import (
    DEFAULT_WIDTHS, DemoSegmenter, UNet, init_segmenter_params, save_demo_segmenter,
)


def augment(rng, images):
    """Random per-image blur (mix with a 3x3 box blur) and Gaussian noise; NHWC in [-1, 1]."""
    k1, k2, k3 = jax.random.split(rng, 3)
    n = images.shape[0]
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sum(padded[:, i : i + images.shape[1], j : j + images.shape[2]] for i in range(3) for j in range(3)) / 9
    mix = jax.random.uniform(k1, (n, 1, 1, 1)) * (jax.random.uniform(k2, (n, 1, 1, 1)) < 0.5)
    noise_scale = jax.random.uniform(k3, (n, 1, 1, 1), maxval=0.06)
    noisy = images * (1 - mix) + blurred * mix + noise_scale * jax.random.normal(k3, images.shape)
    return jnp.clip(noisy, -1, 1)


def evaluate(segmenter: DemoSegmenter, seed: int, count: int, batch: int = 200):
    """Confusion matrix (11 x 11, rows = truth) of the segmenter on ``count`` scenes of world ``seed``."""
    confusion = np.zeros((world.NUM_LABELS, world.NUM_LABELS), np.int64)
    for images, labels in world.iterate_scenes(seed, batch, 0, count):
        pred = np.asarray(segmenter.segment(segmenter.params, images))[..., 0]
        confusion += np.bincount(
            (labels * world.NUM_LABELS + pred).reshape(-1), minlength=world.NUM_LABELS**2
        ).reshape(world.NUM_LABELS, world.NUM_LABELS)
    return confusion


def scores(confusion: np.ndarray) -> dict:
    """Pixel accuracy and per-class IoU (labels 1..10) from a confusion matrix."""
    tp = np.diag(confusion).astype(np.float64)
    iou = tp / np.maximum(confusion.sum(0) + confusion.sum(1) - tp, 1)
    return {
        "pixel_accuracy": float(tp.sum() / confusion.sum()),
        "iou": {name: float(iou[i]) for i, name in enumerate(world.LABEL_NAMES) if i > 0},
        "pixels": {name: int(confusion[i].sum()) for i, name in enumerate(world.LABEL_NAMES) if i > 0},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output_arguments(parser, default="results/demo_segmenter/segmenter", shipped="scenes64/segmenter")
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seed", type=int, default=1000)
    parser.add_argument("--eval-count", type=int, default=2000)
    args = parser.parse_args(argv)

    out = output_dir(parser, args)
    log_path = out.parent / "segmenter_training.log"
    log = open(log_path, "w")

    def say(msg):
        print(msg)
        log.write(msg + "\n")
        log.flush()

    say(f"train_demo_segmenter {vars(args)} jax {jax.__version__} devices {jax.devices()}")
    rng = jax.random.PRNGKey(args.seed)
    params = init_segmenter_params(rng, DEFAULT_WIDTHS)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, 100, args.steps, args.lr * 0.02)
    optimizer = optax.adam(schedule)
    opt_state = optimizer.init(params)
    network = UNet(widths=DEFAULT_WIDTHS)
    # mild class weights (inverse square root of the world's pixel shares) help the small parts
    _, sample_labels = world.render_scenes(args.seed + 10**6, np.arange(512))
    freq = np.maximum(world.label_frequencies(sample_labels)[1:], 1e-4)
    weights = jnp.asarray(np.sqrt(freq.max() / freq) / np.sqrt(freq.max() / freq).mean(), jnp.float32)
    say("class weights " + " ".join(f"{n}={w:.2f}" for n, w in zip(world.LABEL_NAMES[1:], np.asarray(weights))))

    @jax.jit
    def train_step(params, opt_state, images, labels, step_rng):
        images = augment(step_rng, images)

        def loss_fn(p):
            logits = network.apply({"params": p}, images)
            target = labels - 1
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, target)
            return jnp.mean(ce * weights[target])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    start = time.time()
    batches = world.iterate_scenes(args.seed, args.batch)
    running = None
    for step in tqdm(range(args.steps), desc="segmenter"):
        images, labels = next(batches)
        params, opt_state, loss = train_step(
            params, opt_state, jnp.asarray(images), jnp.asarray(labels), jax.random.fold_in(rng, step)
        )
        running = float(loss) if running is None else 0.95 * running + 0.05 * float(loss)
        if (step + 1) % 100 == 0:
            say(f"step {step + 1} loss {running:.4f} elapsed {time.time() - start:.0f}s")
    train_seconds = time.time() - start

    segmenter = DemoSegmenter(params, DEFAULT_WIDTHS)
    result = scores(evaluate(segmenter, args.eval_seed, args.eval_count))
    result.update(train_seconds=train_seconds, steps=args.steps, batch=args.batch,
                  eval_seed=args.eval_seed, eval_count=args.eval_count, train_seed=args.seed)
    say(json.dumps(result, indent=1))
    save_demo_segmenter(out, params, DEFAULT_WIDTHS)
    (out.parent / "segmenter_metrics.json").write_text(json.dumps(result, indent=1) + "\n")
    say(f"saved {out}")


if __name__ == "__main__":
    main()
