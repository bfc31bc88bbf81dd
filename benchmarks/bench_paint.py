"""GANPaint latency: the server round trip of one stroke, after warm-up, and photo inversion quality.

    python benchmarks/bench_paint.py latency            # demo 64x64 and LSUN-architecture 256x256
    python benchmarks/bench_paint.py inversion          # PSNR before / after the r refinement
    pytest benchmarks/bench_paint.py                    # the same through pytest-benchmark

A round trip is what the browser does per stroke: POST /api/edit over HTTP to a uvicorn server on
this machine (started in a thread of this process) with one stroke whose mask is a 256x256 RGBA
PNG (as the client sends it), the server decodes it, runs the one jitted edit-and-segment
function (h, the stroke, f twice, the segmenter on both images, label counts), encodes the
result PNGs and answers JSON; the client parses the JSON. Timed after 3 warm-up strokes (the
first compiles), each stroke a new mask and concept.

Models: the shipped demo pair (``scenes64``, dissected with ``--size 200`` into a temporary
directory unless ``GANDISSECT_PAINT_OUTDIR`` names a dissection), and the 256x256 Progressive GAN
of the LSUN checkpoints' architecture (``GeneratorConfig.for_resolution(256)``, random weights)
at layer4 (8x8x512) with the demo U-Net segmenter run at 256x256 as a stand-in segmenter and
synthetic rankings. ``paint()`` alone (h, strokes, f; no segmentation, no HTTP) is timed too.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import socket
import statistics
import sys
import tempfile
import threading
import time

import numpy as np

ROUNDS = int(os.environ.get("GANDISSECT_BENCH_ROUNDS", "20"))


def _mask_url(rng, size=256) -> str:
    from PIL import Image

    rgba = np.zeros((size, size, 4), np.uint8)
    top, left = rng.integers(0, size // 2, size=2)
    rgba[top:top + size // 3, left:left + size // 3, 3] = 255
    buffer = io.BytesIO()
    Image.fromarray(rgba).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@contextlib.contextmanager
def serve(models):
    """A uvicorn server of ``models`` on a free local port, in a thread; yields the base URL."""
    import uvicorn

    from gandissect_jax.paint.server import create_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(models), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def demo_model():
    from gandissect_jax.commands.paint import DEMO_LAYERS  # noqa: F401  (the demo's layers)
    from gandissect_jax.paint.model import load_paint_model

    outdir = os.environ.get("GANDISSECT_PAINT_OUTDIR")
    if not outdir:
        import gandissect_jax as gd
        from gandissect_jax.dissection import dissect_generator

        outdir = os.path.join(tempfile.mkdtemp(prefix="bench-paint-"), "scenes64")
        dissect_generator(gd.load_generator("scenes64"), gd.load_segmenter("scenes64-segmenter"), ["layer4"],
                          size=200, outdir=outdir, make_images=False, progress=False,
                          identity={"model": "scenes64", "segmenter": "scenes64-segmenter"})
    return load_paint_model(outdir)


def lsun_model(layer: str = "layer4"):
    """The LSUN checkpoints' 256x256 architecture with random weights, synthetic rankings, and the
    demo U-Net segmenter (fully convolutional) at 256x256 as a stand-in segmenter."""
    import jax

    import gandissect_jax as gd
    from gandissect_jax.paint.model import PaintModel
    from gandissect_jax.paint.rankings import LayerRankings

    config = gd.GeneratorConfig.for_resolution(256)
    G = gd.ProgressiveGenerator(gd.init_params(jax.random.key(0), config), config)
    S = gd.load_segmenter("scenes64-segmenter")
    names = tuple(label for label, _ in S.labels)
    units = G.layer_shape(layer)[-1]
    rng = np.random.default_rng(0)
    iou = rng.random((len(names), units)) * 0.3
    iou[0] = 0
    rankings = LayerRankings(
        layer=layer, label_names=names, concepts=names[1:],
        order={n: np.argsort(-iou[i], kind="stable") for i, n in enumerate(names) if i},
        metric={n: "iou" for n in names[1:]}, insertion_values=np.full(units, 2.0, np.float32),
        unit_label=iou.argmax(0), unit_iou=iou.max(0), iou=iou, interpretable=iou.max(0) > 0.05)
    return PaintModel("lsun256-random", G, S, {layer: rankings})


def round_trips(model, rounds: int = ROUNDS, warmup: int = 3) -> dict:
    """Milliseconds per stroke round trip (client-measured) and the server's own compute time."""
    import httpx

    rng = np.random.default_rng(0)
    concepts = list(next(iter(model.layers.values())).concepts)
    with serve([model]) as base, httpx.Client(base_url=base, timeout=600) as client:
        def stroke(i):
            body = {"model": model.name, "seed": i, "strokes": [
                {"concept": concepts[i % len(concepts)], "mode": ["add", "remove"][i % 2], "mask": _mask_url(rng)}]}
            start = time.perf_counter()
            response = client.post("/api/edit", json=body)
            result = response.json()
            elapsed = 1000 * (time.perf_counter() - start)
            assert response.status_code == 200, result
            return elapsed, result["elapsed_ms"]

        first = stroke(0)[0]
        for i in range(1, warmup):
            stroke(i)
        times = [stroke(warmup + i) for i in range(rounds)]
    client_ms = [t for t, _ in times]
    server_ms = [s for _, s in times]
    return {"first_ms": first, "median_ms": statistics.median(client_ms), "min_ms": min(client_ms),
            "p90_ms": float(np.percentile(client_ms, 90)), "server_median_ms": statistics.median(server_ms),
            "rounds": rounds}


def paint_only(model, rounds: int = ROUNDS) -> dict:
    """Milliseconds of ``paint()`` alone (h, one stroke, f; no segmenter, no HTTP), one image."""
    import jax

    from gandissect_jax.paint import Stroke, paint

    layer, rankings = next(iter(model.layers.items()))
    z = model.z_for_seed(0)[None]
    mask = np.zeros((64, 64), np.float32)
    mask[20:40, 20:40] = 1
    strokes = [Stroke(mask, rankings.concepts[0], "add")]
    jax.block_until_ready(paint(model.generator, z, strokes, rankings))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(paint(model.generator, z, strokes, rankings))
        times.append(1000 * (time.perf_counter() - start))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "p90_ms": float(np.percentile(times, 90))}


def inversion_quality(count: int = 8, layer: str = "layer4", **settings) -> dict:
    """PSNR (dB) of world scenes (never produced by the GAN) reconstructed from z, then after the r
    refinement, with :func:`gandissect_jax.paint.invert` (default settings); seconds per photo."""
    import jax

    import gandissect_jax as gd
    from gandissect_jax.paint import invert
    from gandissect_jax.scenes.world import render_scenes

    G = gd.load_generator("scenes64")
    photos, _ = render_scenes(123, np.arange(count))
    rows, seconds = [], []
    jax.block_until_ready(invert(G, layer, photos[:1], **settings))  # compile
    for photo in photos:
        start = time.perf_counter()
        result = jax.block_until_ready(invert(G, layer, photo[None], **settings))
        seconds.append(time.perf_counter() - start)
        rows.append((float(result.psnr_z[0]), float(result.psnr_r[0])))
    z, r = np.array(rows).T
    return {"psnr_z": z.tolist(), "psnr_r": r.tolist(), "mean_psnr_z": float(z.mean()),
            "mean_psnr_r": float(r.mean()), "seconds_per_photo": statistics.median(seconds)}


def machine() -> str:
    import platform

    import jax

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else "?"
    return (f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}), jax {jax.__version__} on "
            f"{jax.devices()[0].platform}, load average {' '.join(load)}")


# ------------------------------------------------------------------------------------- pytest


def test_demo_stroke_round_trip(benchmark):
    model = demo_model()
    result = benchmark.pedantic(lambda: round_trips(model), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    benchmark.extra_info["machine"] = machine()


def test_lsun256_stroke_round_trip(benchmark):
    model = lsun_model()
    result = benchmark.pedantic(lambda: round_trips(model, rounds=max(3, ROUNDS // 4)), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    benchmark.extra_info["paint_only"] = paint_only(model, rounds=max(3, ROUNDS // 4))
    benchmark.extra_info["machine"] = machine()


def test_inversion_psnr(benchmark):
    result = benchmark.pedantic(lambda: inversion_quality(count=4), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["mean_psnr_r"] > result["mean_psnr_z"]


def main(argv: list[str]) -> int:
    what = argv[1] if len(argv) > 1 else "latency"
    print(machine())
    if what == "latency":
        demo = demo_model()
        print("demo 64x64, layer4, round trip:", round_trips(demo))
        print("demo 64x64, paint() only:", paint_only(demo))
        lsun = lsun_model()
        print("LSUN-architecture 256x256, layer4, round trip (demo U-Net at 256 as segmenter):",
              round_trips(lsun, rounds=max(3, ROUNDS // 4)))
        print("LSUN-architecture 256x256, paint() only:", paint_only(lsun, rounds=max(3, ROUNDS // 4)))
    elif what == "inversion":
        print(inversion_quality(count=int(os.environ.get("GANDISSECT_BENCH_PHOTOS", "8"))))
    else:
        print(__doc__)
        return 2
    print(machine())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
