"""Strips from the count pass's gallery: no generator run after the passes, the same bytes as rendering the top-k samples again."""

from __future__ import annotations

import os

import numpy as np
import pytest

import gandissect_jax
from gandissect_jax.dissection import dissect_generator
from gandissect_jax.dissection.gallery import Gallery
from gandissect_jax.dissection.sources import GeneratorSource
from gandissect_jax.dissection.strips import write_strips

NUM_SAMPLES, TOPK = 40, 4


def strip_bytes(directory) -> dict[str, bytes]:
    image = os.path.join(directory, "image")
    return {name: open(os.path.join(image, name), "rb").read() for name in sorted(os.listdir(image))}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A demo dissection (layers layer4 and layer6) whose renders after the passes are counted."""
    calls = []
    original = GeneratorSource.visual_batch

    def counted(self, indices, layer):
        calls.append(layer)
        return original(self, indices, layer)

    outdir = str(tmp_path_factory.mktemp("gallery"))
    generator = gandissect_jax.load_generator("scenes64")
    segmenter = gandissect_jax.load_segmenter("scenes64-segmenter")
    GeneratorSource.visual_batch = counted
    try:
        results = dissect_generator(generator, segmenter, ["layer4", "layer6"], size=NUM_SAMPLES, topk=TOPK,
                                    batch_size=16, micro_batch=8, outdir=outdir, progress=False, make_report=False)
    finally:
        GeneratorSource.visual_batch = original
    source = GeneratorSource(generator, segmenter, ["layer4", "layer6"], NUM_SAMPLES, micro_batch=8)
    return outdir, results, source, calls


def test_strips_need_no_generator_run_after_the_passes(run):
    outdir, results, _, calls = run
    assert calls == []
    assert len(strip_bytes(os.path.join(outdir, "layer4"))) == results["layer4"].unit_label.shape[0]
    assert not os.path.exists(os.path.join(outdir, ".progress", "strips", "layer4.npz"))  # removed once written


@pytest.mark.parametrize("layer", ["layer4", "layer6"])
def test_gallery_strips_equal_rendered_strips_byte_for_byte(run, tmp_path, layer):
    outdir, results, source, _ = run
    write_strips(str(tmp_path), results[layer], source, batch_size=16, show_progress=False)
    rendered = strip_bytes(tmp_path)
    kept = strip_bytes(os.path.join(outdir, layer))
    assert sorted(rendered) == sorted(kept) and len(kept) == results[layer].unit_label.shape[0]
    assert all(rendered[name] == kept[name] for name in rendered)


def test_gallery_keeps_only_a_layers_top_samples_and_reads_back(tmp_path):
    thumbs = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    gallery = Gallery(np.array([1, 4, 7, 9, 12]), thumbs, np.zeros((2, 2, 3, 3), np.float32))
    kept = gallery.for_layer(np.array([[12, 4], [4, 9]]))
    assert kept.indices.tolist() == [4, 9, 12]
    assert np.array_equal(kept.thumbnail(9), thumbs[3])
    with pytest.raises(KeyError, match="sample 7"):
        kept.thumbnail(7)
    kept.save(str(tmp_path / "g.npz"))
    back = Gallery.load(str(tmp_path / "g.npz"))
    assert np.array_equal(back.thumbs, kept.thumbs) and np.array_equal(back.indices, kept.indices)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert Gallery.load(str(tmp_path / "bad.npz")) is None and Gallery.load(str(tmp_path / "none.npz")) is None


def test_strips_stopped_midway_resume_from_the_kept_gallery(run, tmp_path, monkeypatch):
    """Ctrl-C while the strips are written: the rerun measures nothing again and renders nothing,
    and its strips are the same bytes."""
    import importlib

    module = importlib.import_module("gandissect_jax.dissection.dissect")
    first, results, _, _ = run
    generator = gandissect_jax.load_generator("scenes64")
    segmenter = gandissect_jax.load_segmenter("scenes64-segmenter")
    original, calls = module.write_strips, []

    def stopped(layer_dir, *args, **kwargs):
        calls.append(kwargs.get("gallery"))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(layer_dir, *args, **kwargs)

    options = dict(size=NUM_SAMPLES, topk=TOPK, batch_size=16, micro_batch=8, outdir=str(tmp_path), progress=False,
                   make_report=False)
    monkeypatch.setattr(module, "write_strips", stopped)
    with pytest.raises(KeyboardInterrupt):
        dissect_generator(generator, segmenter, ["layer4", "layer6"], **options)
    assert os.path.exists(tmp_path / ".progress" / "strips" / "layer6.npz")
    fetched, fetch = [], GeneratorSource.fetch
    monkeypatch.setattr(GeneratorSource, "fetch", lambda self, *a, **k: fetched.append(1) or fetch(self, *a, **k))
    monkeypatch.setattr(GeneratorSource, "visual_batch", lambda *a, **k: pytest.fail("the rerun rendered"))
    again = dissect_generator(generator, segmenter, ["layer4", "layer6"], **options)
    assert calls[2] is not None and len(calls) == 3  # layer6 again, from the saved gallery
    assert len(fetched) == 1  # the first batch's label check before resuming; no pass ran again
    assert np.array_equal(again["layer6"].topk_indices, results["layer6"].topk_indices)
    for layer in ("layer4", "layer6"):
        assert strip_bytes(tmp_path / layer) == strip_bytes(os.path.join(first, layer))


def test_a_kept_gallery_fits_only_its_own_units_and_thumbnail_size():
    gallery = Gallery(np.array([1, 4, 7]), np.zeros((3, 96, 96, 3), np.uint8), np.zeros((2, 2, 8, 8), np.float32))
    assert gallery.fits(np.array([[1, 4], [7, 4]]), 96)
    assert not gallery.fits(np.array([[1, 4], [7, 4]]), 128)  # another --thumbsize
    assert not gallery.fits(np.array([[1, 4], [7, 5]]), 96)  # a top-k sample it does not hold
    assert not gallery.fits(np.array([[1, 4, 7], [7, 4, 1]]), 96)  # another k
    assert not gallery.fits(np.array([[1, 4]]), 96)  # another number of units


def test_count_pass_stopped_then_rerun_at_another_batch_size_keeps_the_progress(run, tmp_path, monkeypatch):
    """The count pass's checkpoint holds the gallery, whose image slots follow the per-device batch:
    a rerun at another batch size must resume (the quantile passes are not run again; the count pass
    starts afresh in its own directory), never refuse or discard the run's progress."""
    _, results, _, _ = run
    generator = gandissect_jax.load_generator("scenes64")
    segmenter = gandissect_jax.load_segmenter("scenes64-segmenter")
    fetch, calls = GeneratorSource.fetch, []

    def stop_in_count_pass(self, indices, sharding, labels=True, images=False):
        if images:
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
        return fetch(self, indices, sharding, labels=labels, images=images)

    options = dict(size=NUM_SAMPLES, topk=TOPK, micro_batch=8, outdir=str(tmp_path), progress=False,
                   make_report=False, checkpoint_every=0.0)
    monkeypatch.setattr(GeneratorSource, "fetch", stop_in_count_pass)
    with pytest.raises(KeyboardInterrupt):
        dissect_generator(generator, segmenter, ["layer4", "layer6"], batch_size=16, **options)
    [passes_dir] = (tmp_path / ".progress").glob("passes-*")
    assert (passes_dir / "plan.npz").exists() and list(passes_dir.glob("counts*/*"))
    monkeypatch.setattr(GeneratorSource, "fetch", fetch)
    from gandissect_jax.dissection import passes

    monkeypatch.setattr(passes, "_save_plan", lambda *a, **k: pytest.fail("a quantile pass ran again"))
    again = dissect_generator(generator, segmenter, ["layer4", "layer6"], batch_size=8, **options)
    for layer in ("layer4", "layer6"):
        for field, value in vars(results[layer]).items():
            if isinstance(value, np.ndarray):
                assert value.tobytes() == getattr(again[layer], field).tobytes(), (layer, field)


def test_a_gallery_over_the_memory_cap_is_not_kept_and_the_strips_render(run, tmp_path, monkeypatch):
    import importlib

    module = importlib.import_module("gandissect_jax.dissection.dissect")
    first, _, _, _ = run
    monkeypatch.setattr(module, "MAX_GALLERY_BYTES", 0)
    rendered, original = [], GeneratorSource.visual_batch
    monkeypatch.setattr(GeneratorSource, "visual_batch",
                        lambda self, indices, layer: rendered.append(layer) or original(self, indices, layer))
    dissect_generator(gandissect_jax.load_generator("scenes64"), gandissect_jax.load_segmenter("scenes64-segmenter"),
                      ["layer4"], size=NUM_SAMPLES, topk=TOPK, batch_size=16, micro_batch=8, outdir=str(tmp_path),
                      progress=False, make_report=False)
    assert rendered and set(rendered) == {"layer4"}
    assert strip_bytes(tmp_path / "layer4") == strip_bytes(os.path.join(first, "layer4"))
