"""Train the demo Progressive GAN generator (the library's Flax ProGAN) on the scene world.

    python scripts/train_demo_gan.py                      # start, or resume from runs/scenes64_gan
    python scripts/train_demo_gan.py --steps 40000        # train further
    python scripts/train_demo_gan.py --export-only        # export the latest state to results/demo_gan/weights
    python scripts/train_demo_gan.py --export-only --update-shipped   # ... to the shipped weights/ instead

Architecture: generator sizes (z=128; 128, 128, 64, 32, 16) at 64x64 trained directly at full
resolution (no progressive growing); a small equalized-learning-rate discriminator with a
minibatch-stddev feature; non-saturating logistic loss, R1 penalty on reals (gamma 1, lazy
every 4 steps); Adam lr 2e-3, betas (0, 0.99); an exponential moving average of the generator
(half-life 10k images, ramped up over the first 5% of images seen) is what gets exported.

Reproducible by seed: step k uses the world's scenes k*B .. k*B+B-1 and rng fold_in(seed, k),
so an interrupted run that resumes continues exactly the same sequence.

State:
  runs/scenes64_gan/checkpoints/   orbax CheckpointManager: full state (params, EMA, Adam states)
  runs/scenes64_gan/samples/       sample grids (PNG) at every --sample-every steps
  WEIGHTS/scenes64/generator/      exported EMA generator (orbax, load_generator-compatible)
  WEIGHTS/scenes64_train_state/    exported raw G and D params + step (to resume in a fresh
                                   checkout: the Adam states are not shipped; with beta1 = 0 they
                                   re-warm within a few hundred steps)
  WEIGHTS/scenes64/gan_training_log.jsonl  losses and timing every --log-every steps
  WEIGHTS is --weights (default results/demo_gan/weights); --update-shipped exports into the
  shipped, version-controlled weights/ instead.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
from tqdm import tqdm

from _outputs import SHIPPED, add_output_arguments, output_dir

from gandissect_jax.checkpoints import load_checkpoint, save_checkpoint
from gandissect_jax.proggan import GeneratorConfig, ProgressiveGenerator, init_params, save_generator
from gandissect_jax.scenes import world
from gandissect_jax.scenes.discriminator import D_CHANNELS
from gandissect_jax.scenes.discriminator import SceneDiscriminator as Discriminator  # the network the demo ships

Z_DIM = 128
CHANNELS = (128, 128, 64, 32, 16)


def make_training(args, g_config: GeneratorConfig):
    """Build the optimizers and the jitted train step for the given hyper-parameters."""
    G = ProgressiveGenerator(init_params(jax.random.PRNGKey(0), g_config), g_config)
    D = Discriminator()
    g_opt = optax.adam(args.lr, b1=0.0, b2=0.99, eps=1e-8)
    d_opt = optax.adam(args.lr, b1=0.0, b2=0.99, eps=1e-8)
    r1_interval = args.r1_interval

    def g_forward(params, z):
        return G.apply(params, z)

    def step_fn(state, reals, rng, with_r1: bool):
        z_d, z_g = jax.random.split(rng)
        n = reals.shape[0]
        fakes = g_forward(state["g"], jax.random.normal(z_d, (n, Z_DIM)))

        def d_loss_fn(d_params):
            real_logits = D.apply({"params": d_params}, reals)
            fake_logits = D.apply({"params": d_params}, jax.lax.stop_gradient(fakes))
            loss = jnp.mean(jax.nn.softplus(fake_logits)) + jnp.mean(jax.nn.softplus(-real_logits))
            r1 = jnp.zeros(())
            if with_r1:
                grad_real = jax.grad(lambda x: D.apply({"params": d_params}, x).sum())(reals)
                r1 = jnp.mean(jnp.sum(grad_real**2, axis=(1, 2, 3)))
                loss = loss + 0.5 * args.r1_gamma * r1 * r1_interval
            return loss, (jnp.mean(real_logits), jnp.mean(fake_logits), r1)

        (d_loss, (real_score, fake_score, r1)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(state["d"])
        d_updates, d_opt_state = d_opt.update(d_grads, state["d_opt"], state["d"])
        d_params = optax.apply_updates(state["d"], d_updates)

        def g_loss_fn(g_params):
            fake = g_forward(g_params, jax.random.normal(z_g, (n, Z_DIM)))
            return jnp.mean(jax.nn.softplus(-D.apply({"params": d_params}, fake)))

        g_loss, g_grads = jax.value_and_grad(g_loss_fn)(state["g"])
        g_updates, g_opt_state = g_opt.update(g_grads, state["g_opt"], state["g"])
        g_params = optax.apply_updates(state["g"], g_updates)

        # EMA with half-life args.ema_kimg thousand images, ramped up early in training
        images_seen = (state["step"] + 1).astype(jnp.float32) * n
        ema_images = jnp.minimum(args.ema_kimg * 1000.0, images_seen * args.ema_rampup)
        beta = 0.5 ** (n / jnp.maximum(ema_images, 1e-8))
        g_ema = jax.tree_util.tree_map(lambda e, p: beta * e + (1 - beta) * p, state["g_ema"], g_params)
        new_state = dict(state, g=g_params, d=d_params, g_ema=g_ema, g_opt=g_opt_state, d_opt=d_opt_state,
                         step=state["step"] + 1)
        metrics = {"d_loss": d_loss, "g_loss": g_loss, "real_score": real_score, "fake_score": fake_score, "r1": r1}
        return new_state, metrics

    steps = {flag: jax.jit(lambda s, x, r, flag=flag: step_fn(s, x, r, flag), donate_argnums=0) for flag in (False, True)}

    def init_state(seed: int):
        key_g, key_d = jax.random.split(jax.random.PRNGKey(seed))
        g_params = init_params(key_g, g_config)
        d_params = D.init(key_d, jnp.zeros((args.batch, 64, 64, 3)))["params"]
        return {
            "g": g_params, "d": d_params, "g_ema": jax.tree_util.tree_map(jnp.copy, g_params),
            "g_opt": g_opt.init(g_params), "d_opt": d_opt.init(d_params), "step": jnp.zeros((), jnp.int32),
        }

    return G, steps, init_state, g_opt, d_opt


def save_grid(G: ProgressiveGenerator, params, z, path: Path):
    """Write a PNG grid of the generator's images for fixed latents z."""
    images = np.asarray(G.apply(params, z))
    grid = world.image_grid(images, columns=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def save_snapshot_grid(samples_dir: Path, step: int):
    """Keep the generated half (top 4 rows) of samples/shipped.png as samples/stepNNNNNN.png at 64 px per image."""
    grid = Image.open(samples_dir / "shipped.png")
    scale = grid.width // (8 * 64)  # shipped.png may have been written at 2x by older versions
    top = grid.crop((0, 0, grid.width, grid.height // 2))
    if scale > 1:
        top = top.resize((top.width // scale, top.height // scale), Image.NEAREST)
    top.save(samples_dir / f"step{step:06d}.png", optimize=True)


_REAL_SEGMENTED = {}  # label shares of real scenes under the shipped segmenter, computed once


def export(state, g_config: GeneratorConfig, weights_dir: Path, meta: dict):
    """Write the shippable snapshot atomically: the EMA generator, raw G/D params, documented figures.

    ``weights/scenes64/label_frequencies.json`` and ``samples/shipped.png`` are rewritten for the
    exported generator (when the demo segmenter is shipped), so the files always agree.
    """
    step = int(state["step"])
    G = ProgressiveGenerator(jax.device_get(state["g_ema"]), g_config)
    save_generator(G, weights_dir / "scenes64" / "generator", force=True)
    save_checkpoint(
        weights_dir / "scenes64_train_state",
        {"g": jax.device_get(state["g"]), "d": jax.device_get(state["d"])},
        dict(meta, kind="scenes64-gan-train-state", step=step, g_sizes=list(g_config.sizes)),
        force=True,
    )
    segmenter_dir = weights_dir / "scenes64" / "segmenter"
    if segmenter_dir.is_dir():
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from demo_label_frequencies import write_report

        from gandissect_jax.scenes import stats
        from gandissect_jax.scenes.demo_segmenter import load_demo_segmenter

        S = load_demo_segmenter(segmenter_dir)
        if "real" not in _REAL_SEGMENTED:
            _REAL_SEGMENTED["real"] = stats.world_label_frequencies(2000, segmenter=S)
        report = write_report(G, S, weights_dir / "scenes64", step, real_segmented=_REAL_SEGMENTED["real"])
        print(f"exported step {step}: max relative label-share gap {report['max_relative_gap']:.3f}")
        if step in (1000, 2000, 4000, 8000, 16000, 32000):
            save_snapshot_grid(weights_dir / "scenes64" / "samples", step)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/scenes64_gan")
    add_output_arguments(parser, default="results/demo_gan/weights", shipped="", flag="--weights")
    parser.add_argument("--steps", type=int, default=40000, help="total steps to reach")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--r1-gamma", type=float, default=1.0)
    parser.add_argument("--r1-interval", type=int, default=4)
    parser.add_argument("--ema-kimg", type=float, default=10.0)
    parser.add_argument("--ema-rampup", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="rng seed (init, latents)")
    parser.add_argument("--world-seed", type=int, default=0, help="seed of the scene world")
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--export-every", type=int, default=500)
    parser.add_argument("--sample-every", type=int, default=500)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--init-from", default=None,
                        help="weights dir holding scenes64_train_state + scenes64/generator to start "
                             "from when the workdir has no checkpoint (default: the export directory if it "
                             "holds them, else the shipped weights/; read only)")
    parser.add_argument("--export-only", action="store_true")
    args = parser.parse_args(argv)

    import orbax.checkpoint as ocp

    workdir = Path(args.workdir).resolve()
    weights_dir = output_dir(parser, args).resolve()
    g_config = GeneratorConfig.from_channels(Z_DIM, CHANNELS)
    G, steps, init_state, g_opt, d_opt = make_training(args, g_config)
    hparams = {k: getattr(args, k) for k in ("batch", "lr", "r1_gamma", "r1_interval", "ema_kimg", "ema_rampup",
                                              "seed", "world_seed")}

    manager = ocp.CheckpointManager(
        workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False),
    )
    state = init_state(args.seed)
    latest = manager.latest_step()
    source = "fresh init"
    if latest is not None:
        state = manager.restore(latest, args=ocp.args.StandardRestore(state))
        source = f"{workdir / 'checkpoints'} step {latest}"
    else:
        init_dir = (Path(args.init_from).resolve() if args.init_from else
                    weights_dir if (weights_dir / "scenes64_train_state").is_dir() else SHIPPED)
        train_state_dir = init_dir / "scenes64_train_state"
        if train_state_dir.is_dir():
            params, meta = load_checkpoint(train_state_dir)
            ema, _ = load_checkpoint(init_dir / "scenes64" / "generator")
            as_like = lambda tree, like: jax.tree_util.tree_map(lambda a, b: jnp.asarray(a, b.dtype), tree, like)
            state["g"] = as_like(params["g"], state["g"])
            state["d"] = as_like(params["d"], state["d"])
            state["g_ema"] = as_like(ema, state["g_ema"])
            state["g_opt"], state["d_opt"] = g_opt.init(state["g"]), d_opt.init(state["d"])
            state["step"] = jnp.asarray(int(meta["step"]), jnp.int32)
            source = f"{train_state_dir} step {int(meta['step'])} (fresh Adam moments)"
    start_step = int(state["step"])
    print(f"train_demo_gan: {source}; training steps {start_step} -> {args.steps}; {hparams}")

    log_path = weights_dir / "scenes64" / "gan_training_log.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sample_z = jnp.asarray(np.random.RandomState(1234).standard_normal((32, Z_DIM)).astype(np.float32))
    meta = {"hparams": hparams, "z_dim": Z_DIM, "channels": list(CHANNELS), "d_channels": list(D_CHANNELS)}

    def checkpoint(state):
        manager.save(int(state["step"]), args=ocp.args.StandardSave(state))

    if args.export_only:
        export(state, g_config, weights_dir, meta)
        print(f"exported step {start_step} to {weights_dir}")
        return

    rng = jax.random.PRNGKey(args.seed + 1)
    t_last, step_last = time.time(), start_step
    last_r1 = jnp.zeros(())
    progress = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc="gan")
    for step in progress:
        reals, _ = world.render_scenes(args.world_seed, np.arange(step * args.batch, (step + 1) * args.batch))
        with_r1 = step % args.r1_interval == 0
        state, metrics = steps[with_r1](state, jnp.asarray(reals), jax.random.fold_in(rng, step))
        if with_r1:
            last_r1 = metrics["r1"]
        done = step + 1
        if done % args.log_every == 0:
            metrics = {k: float(v) for k, v in dict(metrics, r1=last_r1).items()}
            now = time.time()
            record = {"step": done, **{k: round(v, 5) for k, v in metrics.items()},
                      "steps_per_s": round((done - step_last) / (now - t_last), 4), "time": now}
            t_last, step_last = now, done
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            progress.set_postfix(d=f"{metrics['d_loss']:.3f}", g=f"{metrics['g_loss']:.3f}")
        if done % args.sample_every == 0:
            save_grid(G, state["g_ema"], sample_z, workdir / "samples" / f"step{done:06d}.png")
        if done % args.checkpoint_every == 0:
            checkpoint(state)
        if done % args.export_every == 0:
            export(state, g_config, weights_dir, meta)
    checkpoint(state)
    manager.wait_until_finished()
    export(state, g_config, weights_dir, meta)
    save_grid(G, state["g_ema"], sample_z, workdir / "samples" / f"step{int(state['step']):06d}.png")
    print(f"done at step {int(state['step'])}")


if __name__ == "__main__":
    main()
