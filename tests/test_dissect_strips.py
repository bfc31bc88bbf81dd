"""Image strips render each top-k sample once and equal, byte for byte, strips rendered unit by unit."""

from __future__ import annotations

import io
import os
import types

import numpy as np
import pytest
from PIL import Image

import gandissect_jax
from gandissect_jax.dissection.sources import GeneratorSource
from gandissect_jax.dissection.strips import outline_activation, unit_groups, write_strips
from gandissect_jax.dissection.upsample import bilinear_matrix

NUM_SAMPLES, TOPK, BATCH = 100, 6, 16


class CountingSource:
    """A source whose ``visual_batch`` calls are recorded (the sample numbers of each call)."""

    def __init__(self, source):
        self.source, self.calls = source, []

    def visual_batch(self, indices, layer):
        self.calls.append(np.asarray(indices).copy())
        return self.source.visual_batch(indices, layer)


@pytest.fixture(scope="module")
def demo():
    """The demo generator's layer4 with overlapping random top-k lists and the 0.9 quantile as levels."""
    source = GeneratorSource(gandissect_jax.load_generator("scenes64"),
                             gandissect_jax.load_segmenter("scenes64-segmenter"), ["layer4"], NUM_SAMPLES, micro_batch=8)
    units = source.feature_shapes["layer4"][2]
    rng = np.random.RandomState(3)
    tops = np.stack([rng.choice(NUM_SAMPLES, TOPK, replace=False) for _ in range(units)])
    _, features = source.visual_batch(np.arange(16), "layer4")
    levels = np.quantile(features.reshape(-1, units), 0.9, axis=0).astype(np.float32)
    result = types.SimpleNamespace(layer="layer4", topk_indices=tops, levels=levels, num_units=units)
    return source, result


def unit_by_unit_jpeg(source, result, unit: int, gap: int = 4) -> bytes:
    """The strip of one unit from its own render of its top-k samples (one visual_batch per unit)."""
    tops = result.topk_indices[unit]
    padded = np.concatenate([tops, np.full(BATCH - tops.size, tops[-1])])
    images, features = source.visual_batch(padded, result.layer)
    size = 96  # 64-pixel images are shown at least 96 pixels high, nearest-neighbour
    rows_ = (np.arange(size) * images.shape[1] // size)
    images = images[:, rows_][:, :, rows_]
    rows, cols = bilinear_matrix(features.shape[1], size), bilinear_matrix(features.shape[2], size)
    strip = np.full((size, tops.size * (size + gap) - gap, 3), 255, np.uint8)
    for rank in range(tops.size):
        mask = rows @ features[rank, :, :, unit].astype(np.float64) @ cols.T > float(result.levels[unit])
        strip[:, rank * (size + gap): rank * (size + gap) + size] = outline_activation(images[rank], mask)
    out = io.BytesIO()
    Image.fromarray(strip).save(out, format="JPEG", quality=88)
    return out.getvalue()


def strip_bytes(directory) -> dict[str, bytes]:
    image = os.path.join(directory, "image")
    return {name: open(os.path.join(image, name), "rb").read() for name in sorted(os.listdir(image))}


def test_strips_render_each_top_sample_once(demo, tmp_path):
    source, result = demo
    counting = CountingSource(source)
    write_strips(str(tmp_path), result, counting, batch_size=BATCH, show_progress=False)
    distinct = np.unique(result.topk_indices)
    rendered = np.concatenate([np.unique(call) for call in counting.calls])  # padding repeats within a call
    assert np.array_equal(np.sort(rendered), distinct)  # every needed sample, each in exactly one call
    assert len(counting.calls) == -(-distinct.size // BATCH)
    assert len(strip_bytes(tmp_path)) == result.num_units


def test_strips_equal_unit_by_unit_renders_byte_for_byte(demo, tmp_path):
    source, result = demo
    write_strips(str(tmp_path), result, source, batch_size=BATCH, show_progress=False)
    written = strip_bytes(tmp_path)
    for unit in (0, 1, 17, result.num_units - 1):
        assert written[f"{unit}-top.jpg"] == unit_by_unit_jpeg(source, result, unit)


def test_strips_under_a_small_cache_bound_are_the_same_bytes(demo, tmp_path):
    source, result = demo
    write_strips(str(tmp_path / "all"), result, source, batch_size=BATCH, show_progress=False)
    counting = CountingSource(source)
    bound = 20 * 160 * 160 * 3  # 20 thumbnails: several unit groups
    write_strips(str(tmp_path / "groups"), result, counting, batch_size=BATCH, show_progress=False,
                 max_cache_bytes=bound)
    assert strip_bytes(tmp_path / "groups") == strip_bytes(tmp_path / "all")
    groups = unit_groups(result.topk_indices, 20)
    assert len(groups) > 1 and sum(len(g) for g in groups) == result.num_units
    assert all(np.unique(result.topk_indices[g.start:g.stop]).size <= 20 for g in groups)
    assert max(np.unique(call).size for call in counting.calls) <= 20


def test_unit_groups_keep_one_unit_whose_samples_exceed_the_bound():
    tops = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 4, 5]])
    assert unit_groups(tops, 2) == [range(0, 1), range(1, 2), range(2, 3)]
    assert unit_groups(tops, 8) == [range(0, 3)]
    assert unit_groups(tops, 6) == [range(0, 1), range(1, 3)]
