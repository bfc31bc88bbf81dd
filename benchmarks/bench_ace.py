"""ACE optimization at the real scale: one step's time against the reference's ``aceoptimize``.

Models: the LSUN-architecture Progressive GAN (sizes [512, 512, 512, 512, 512, 256, 128, 64],
256x256, 23.0M parameters, as the released ``*_lsun.pth``; random weights, ``init_params`` key 0)
edited at ``layer4`` (8x8x512), and the unified-parsing UPerNet-50 with synthetic weights of the
real vocabulary's shape (the golden recipe of ``tests/fixtures/segmenter/golden_recipe.py`` applied
to heads of 336 objects, 427 owner parts -- the per-owner part lists, with ``-``, of the 77 owners
in CSAILVision/unifiedparsing ``data/object_part.csv`` --, 26 materials and 365 scenes), quad
division, ``segsizes=(256,)``, scores at ``downsample=2`` (the reference's ``ace_loss``).

One ACE step: the ``ace`` objective on a batch of 2 present and 2 candidate samples (the
reference's ``--train_batch_size 2``): ablate alpha at each present sample's location, insert at
each candidate's, ``f`` and the segmenter forward and backward, one optax update. Ours runs
``gandissect_jax.ace.ace_step`` with ``r = h(z)`` precomputed (:func:`prepare_ace`); compilation
is timed apart and the steps after the first must compile nothing (checked with
``jax.monitoring``). ``test_class_scores_backward`` times one backward pass of
``UnifiedParsingSegmenter.class_scores`` (every label's score map from one pass) at 256x256.

With ``$GANDISSECT_REFERENCE`` set and torch importable, ``test_reference_ace_step`` runs the
reference's own ``ace_loss`` (read from ``netdissect/aceoptimize.py`` and executed as it is; its
module imports are not needed) with ``run_backward=True`` on the same z, weights and locations:
the reference ``ProgressiveGenerator`` in ``nethook.InstrumentedModel`` (parameters frozen, as
``train_ablation`` does) and the reference ``UnifiedParsingSegmenter`` (PrRoI pooling replaced by
``benchmarks/prroi_torch_cpu.py``), under PyTorch's default threads. Before timing, the
ablation-only term of the loss is checked against ours (same value to float32 rounding). The
reference leaves the segmenter's parameters trainable, so its backward pass also computes their
gradients; the test also times it with them frozen (``reference_frozen_segmenter``), the fairest
comparison of the computation itself. The two implementations are timed alternately, round by
round, and the median ratio is recorded (``GANDISSECT_BENCH_ROUNDS`` rounds, default 3).
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gandissect_jax import ace
from gandissect_jax.proggan import GeneratorConfig, ProgressiveGenerator, init_params, state_dict_from_params
from gandissect_jax.sampling import sample_z
from gandissect_jax.segmenter import UnifiedParsingSegmenter
from gandissect_jax.segmenter.convert import state_dicts_to_variables

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "segmenter"))
import golden_recipe  # noqa: E402

LSUN_SIZES = (512, 512, 512, 512, 512, 256, 128, 64)
LAYER = "layer4"
BATCH = 2
DOWNSAMPLE = 2
# per-owner part list lengths (with "-") of the 77 owners in unifiedparsing data/object_part.csv
OWNER_PARTS = (2, 24, 15, 2, 11, 10, 2, 11, 13, 2, 8, 6, 9, 10, 9, 10, 4, 3, 2, 5, 11, 11, 2, 4, 2, 10, 2,
               4, 5, 5, 2, 4, 10, 10, 9, 2, 6, 3, 2, 8, 6, 3, 6, 3, 5, 3, 2, 3, 4, 10, 4, 6, 3, 4, 2, 3, 6,
               8, 5, 6, 4, 10, 10, 2, 3, 4, 3, 3, 2, 8, 2, 2, 3, 3, 2, 2, 2)


def rounds() -> int:
    return int(os.environ.get("GANDISSECT_BENCH_ROUNDS", "3"))


@contextlib.contextmanager
def compilations():
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def real_vocabulary() -> dict:
    """labels.json of the real vocabulary's shape: 336 objects (sky, building, person, tree, door,
    window, ... and numbered fillers), 427 owner parts, 26 materials, 365 scenes."""
    owners = ["sky", "building", "person"] + [f"owner{k}" for k in range(len(OWNER_PARTS) - 3)]
    named = owners + ["tree", "door", "window", "grass", "road", "roof"]
    objects = ["-"] + named + [f"object{k}" for k in range(336 - 1 - len(named))]
    object_part = {}
    for owner, count in zip(owners, OWNER_PARTS):
        if owner == "building":
            parts = ["-", "window", "door", "roof"] + [f"building part {k}" for k in range(count - 4)]
        else:
            parts = ["-"] + [f"{owner} part {k}" for k in range(count - 1)]
        object_part[owner] = parts
    part_names = ["-"] + sorted({p for parts in object_part.values() for p in parts if p != "-"})
    return {"object": objects, "part": part_names, "material": ["-"] + [f"material{k}" for k in range(25)],
            "scene": [f"scene{k}" for k in range(365)], "object_part": object_part}


def state_dicts(labeldata: dict) -> tuple[dict, dict]:
    """The golden recipe's tensors for the key list of keys.json, heads resized to ``labeldata``."""
    heads = {"object_head.1": len(labeldata["object"]), "material_head.1": len(labeldata["material"]),
             "scene_head.2": len(labeldata["scene"]),
             "part_head.1": sum(len(p) for p in labeldata["object_part"].values())}
    keys = golden_recipe.load_keys()
    result = []
    for part in ("encoder", "decoder"):
        entries = keys[part]
        bn_prefixes = {e["key"][: -len(".running_mean")] for e in entries if e["key"].endswith(".running_mean")}
        state = {}
        for e in entries:
            shape = list(e["shape"])
            prefix = e["key"].rsplit(".", 1)[0]
            if part == "decoder" and prefix in heads:
                shape[0] = heads[prefix]
            state[e["key"]] = golden_recipe.recipe_tensor(e["key"], tuple(shape), bn_prefixes, part == "encoder")
        result.append(state)
    return result[0], result[1]


@pytest.fixture(scope="module")
def models():
    labeldata = real_vocabulary()
    encoder, decoder = state_dicts(labeldata)
    S = UnifiedParsingSegmenter(state_dicts_to_variables(encoder, decoder, labeldata), labeldata,
                                segdiv="quad", segsizes=(256,))
    config = GeneratorConfig(sizes=LSUN_SIZES)
    G = ProgressiveGenerator(init_params(jax.random.key(0), config), config)
    return G, S, labeldata, (encoder, decoder)


def make_corpus(G, S, concept: str = "tree") -> ace.AceCorpus:
    """A fixed corpus of BATCH present and BATCH candidate samples (z of seeds 10, 11, locations
    drawn from RandomState(0)); the insertion value is the mean feature of the candidates."""
    rng = np.random.RandomState(0)
    zp, zc = sample_z(BATCH, G.z_dim, 10), sample_z(BATCH, G.z_dim, 11)
    r, _ = G.split(LAYER).h(G.params, jnp.asarray(zc))
    locations = lambda: rng.randint(0, 64, BATCH).astype(np.int32)  # noqa: E731
    return ace.AceCorpus(layer=LAYER, labels=ace.concept_labels(S, concept), present_z=zp,
                         present_location=locations(), candidate_z=zc, candidate_location=locations(),
                         eval_present_z=zp, eval_present_location=locations(), eval_candidate_z=zc,
                         eval_candidate_location=locations(),
                         insertion_value=np.asarray(r).mean((0, 1, 2)).astype(np.float32))


def ours_step(G, S, corpus):
    """(step function that runs one ACE step and blocks, compile seconds, first-step seconds)."""
    problem = ace.prepare_ace(G, S, corpus, init=np.full(512, 0.5, np.float32), batch_size=BATCH,
                              seg_downsample=DOWNSAMPLE)
    state = {"alpha": problem.alpha, "opt": problem.opt_state}
    index = jnp.arange(BATCH)
    args = (jnp.float32(0.0), problem.consts, problem.train, index, index)
    start = time.perf_counter()
    ace.ace_step.lower(state["alpha"], state["opt"], *args, spec=problem.spec).compile()
    compile_s = time.perf_counter() - start

    def step():
        alpha, opt, loss = ace.ace_step(state["alpha"], state["opt"], *args, spec=problem.spec)
        jax.block_until_ready(alpha)
        state["alpha"], state["opt"] = alpha, opt
        return float(loss)

    start = time.perf_counter()
    step()
    return step, compile_s, time.perf_counter() - start, problem


def test_ace_step(benchmark, models):
    G, S, _, _ = models
    corpus = make_corpus(G, S)
    step, compile_s, first_s, _ = ours_step(G, S, corpus)
    with compilations() as compiled:
        benchmark.group = "ACE step, LSUN ProGAN layer4 + UPerNet-50 (quad), 256x256, batch 2+2"
        benchmark.pedantic(step, rounds=rounds(), iterations=1)
    assert compiled == [], f"{len(compiled)} compilations after the first step"
    benchmark.extra_info.update(implementation="gandissect-jax", backend=jax.default_backend(),
                                compile_s=round(compile_s, 2), first_step_s=round(first_s, 2),
                                recompilations_after_first_step=len(compiled),
                                step_s=round(benchmark.stats.stats.mean, 3))


def test_class_scores_backward(benchmark, models):
    G, S, _, _ = models
    images = jnp.clip(G(jnp.asarray(sample_z(BATCH, G.z_dim, 3))), -1, 1)
    wanted = jnp.asarray([S.labels.index((name, "object")) for name in ("tree", "door", "building")])

    @jax.jit
    def backward(params, x):
        return jax.grad(lambda x: S.class_scores(params, x, DOWNSAMPLE)[..., wanted].sum())(x)

    start = time.perf_counter()
    grad = backward(S.params, images).block_until_ready()
    first_s = time.perf_counter() - start
    assert grad.shape == images.shape and bool(jnp.isfinite(grad).all()) and float(jnp.abs(grad).max()) > 0
    every = S.class_scores(S.params, images, DOWNSAMPLE)
    assert every.shape == (BATCH, 128, 128, len(S.labels))
    benchmark.group = "class_scores backward, UPerNet-50 (quad), 256x256, batch 2"
    benchmark.pedantic(lambda: backward(S.params, images).block_until_ready(), rounds=rounds(), iterations=1)
    benchmark.extra_info.update(implementation="gandissect-jax", labels=len(S.labels), first_call_s=round(first_s, 2),
                                backward_s=round(benchmark.stats.stats.mean, 3))


# ------------------------------------------------------------------------------------ reference


def reference_ace_loss():
    """The reference's ``ace_loss`` function, compiled from ``netdissect/aceoptimize.py`` alone."""
    from reference_harness import reference_checkout, skip_reason

    reason = skip_reason()
    if reason is not None:
        pytest.skip(f"reference not available: {reason}")
    path = reference_checkout() / "netdissect" / "aceoptimize.py"
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "ace_loss")
    import torch

    namespace = {"torch": torch}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["ace_loss"]


def reference_models(G, labeldata, weights):
    import types

    import prroi_torch_cpu
    from reference_harness import import_reference

    extra = {"netdissect.upsegmodel.prroi_pool": prroi_torch_cpu}
    if "skimage" not in sys.modules:  # only the quad segmentation uses it, not predict_single_class
        try:
            import skimage.morphology  # noqa: F401
        except ImportError:
            stub = types.ModuleType("skimage")
            stub.morphology = types.ModuleType("skimage.morphology")
            extra.update({"skimage": stub, "skimage.morphology": stub.morphology})
    segmenter_module = import_reference("netdissect.segmenter", extra_modules=extra)
    upsegmodel = import_reference("netdissect.upsegmodel", extra_modules=extra)
    resnet = import_reference("netdissect.upsegmodel.resnet", extra_modules=extra)
    proggan = import_reference("netdissect.proggan")
    nethook = import_reference("netdissect.nethook")
    import torch

    nr_classes = {k: len(labeldata[k]) for k in ("object", "scene", "material")}
    nr_classes["part"] = sum(len(p) for p in labeldata["object_part"].values())
    encoder = upsegmodel.models.Resnet(resnet.resnet50(pretrained=False))
    decoder = upsegmodel.ModelBuilder().build_decoder(arch="upernet", fc_dim=2048, use_softmax=True,
                                                      nr_classes=nr_classes)
    encoder.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights[0].items()})
    decoder.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights[1].items()})
    segmodel = upsegmodel.SegmentationModule(encoder, decoder, labeldata)
    segmodel.categories = ["object", "part", "material"]
    segmodel.eval()
    segmenter_module.load_unified_parsing_segmentation_model = lambda *args: segmodel
    segmenter = segmenter_module.UnifiedParsingSegmenter(segsizes=[256], segdiv="quad")
    generator = proggan.ProgressiveGenerator(sizes=list(LSUN_SIZES)).eval()
    state = state_dict_from_params(G.params, G.config)
    generator.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    model = nethook.InstrumentedModel(generator)
    model.feature_shape = {LAYER: (1, 512, 8, 8)}
    for p in model.parameters():  # as train_ablation does
        p.requires_grad = False
    model.eval()
    return model, segmenter, segmodel


def test_reference_ace_step(benchmark, models):
    G, S, labeldata, weights = models
    ace_loss = reference_ace_loss()  # skips without $GANDISSECT_REFERENCE
    model, segmenter, segmodel = reference_models(G, labeldata, weights)
    import torch

    corpus = make_corpus(G, S)
    classnum = corpus.labels[0]
    assert segmenter.get_label_and_category_names()[0][classnum] == ("tree", "object")
    alpha0 = np.full(512, 0.5, np.float32)
    ablation = torch.from_numpy(alpha0.reshape(1, 512, 1, 1).copy()).requires_grad_(True)
    replacement = torch.from_numpy(corpus.insertion_value.reshape(1, 512, 1, 1).copy())
    batch = [torch.from_numpy(np.asarray(a)) for a in (corpus.present_z, corpus.present_location.astype(np.int64),
                                                        corpus.candidate_z, corpus.candidate_location.astype(np.int64))]

    # same computation: the erase term (ablation only) of the reference vs ours at the same alpha
    with torch.no_grad():
        erase_ref = float(ace_loss(segmenter, classnum, model, LAYER, replacement, ablation, *batch,
                                   ablation_only=True))
    problem = ace.prepare_ace(G, S, corpus, init=alpha0, batch_size=BATCH, seg_downsample=DOWNSAMPLE,
                              objective="ace")
    spec = problem.spec
    @jax.jit  # as inside the step: traced, so the images are not clipped (nor is the reference's)
    def erase(gparams, sparams, alpha, data):
        batch_data = ace._take(data, jnp.arange(BATCH), jnp.arange(BATCH))
        mp = alpha * ace._location_map(batch_data.present_location, spec.grid)
        images = spec.f(gparams, batch_data.present_r * (1 - mp), ())
        return ace._score_at(spec, sparams, images, batch_data.present_location).sum()

    erase_ours = float(erase(G.params, S.params, problem.alpha, problem.train))
    assert erase_ours == pytest.approx(erase_ref, rel=2e-3, abs=1e-4), (erase_ours, erase_ref)

    def reference_step():
        ablation.grad = None
        ace_loss(segmenter, classnum, model, LAYER, replacement, ablation, *batch, run_backward=True)
        return ablation.grad

    step, compile_s, first_s, _ = ours_step(G, S, corpus)
    reference_step()  # warm-up
    benchmark.group = "ACE step, LSUN ProGAN layer4 + UPerNet-50 (quad), 256x256, batch 2+2"
    benchmark.pedantic(reference_step, rounds=rounds(), iterations=1)
    mean = benchmark.stats.stats.mean

    # interleaved, round by round: ours, the reference as it runs, the reference with the
    # segmenter's parameters frozen
    ours_s, ref_s, frozen_s = [], [], []
    for _ in range(rounds()):
        start = time.perf_counter()
        step()
        ours_s.append(time.perf_counter() - start)
        for p in segmodel.parameters():
            p.requires_grad = True
        start = time.perf_counter()
        reference_step()
        ref_s.append(time.perf_counter() - start)
        for p in segmodel.parameters():
            p.requires_grad = False
        start = time.perf_counter()
        reference_step()
        frozen_s.append(time.perf_counter() - start)
    for p in segmodel.parameters():
        p.requires_grad = True
    benchmark.extra_info.update(
        implementation=f"reference aceoptimize.ace_loss (PyTorch {torch.__version__}, {torch.get_num_threads()} threads)",
        step_s=round(mean, 3), erase_term_reference=erase_ref, erase_term_ours=erase_ours,
        interleaved_ours_s=[round(v, 3) for v in ours_s], interleaved_reference_s=[round(v, 3) for v in ref_s],
        interleaved_reference_frozen_segmenter_s=[round(v, 3) for v in frozen_s],
        speedup_median=round(float(np.median(np.asarray(ref_s) / np.asarray(ours_s))), 3),
        speedup_vs_frozen_segmenter_median=round(float(np.median(np.asarray(frozen_s) / np.asarray(ours_s))), 3),
        ours_compile_s=round(compile_s, 2),
    )
    print(json.dumps(benchmark.extra_info, indent=1))
