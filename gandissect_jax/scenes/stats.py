"""Label statistics of the scene world and of generators, as seen by a segmenter.

The shipped demo pair is judged by how often each class appears: the label frequencies of
generated images (segmented by the demo segmenter) against those of real world scenes.
"""

from __future__ import annotations

import numpy as np

from gandissect_jax.dissection.labels import count_labels
from gandissect_jax.scenes import world


def _shares(per_batch: list, num_labels: int) -> np.ndarray:
    """Label shares float64 (num_labels,) from per-batch (counts, outside) device pairs of count_labels."""
    counts = np.zeros(num_labels, np.int64)
    for batch_counts, outside in per_batch:  # read back once, after every batch was dispatched
        if int(outside):
            raise ValueError(f"label numbers outside 0..{num_labels - 1}")
        counts += np.asarray(batch_counts, np.int64)
    return counts / max(counts.sum(), 1)


def segmented_label_frequencies(segmenter, images_batches) -> np.ndarray:
    """Pixel share of each label float64 (num_labels,) over batches of NHWC images in [-1, 1].

    ValueError when the segmenter returns label numbers outside its labels."""
    num_labels = len(segmenter.labels)
    return _shares([count_labels(segmenter.segment(segmenter.params, images), num_labels) for images in images_batches], num_labels)


def generated_label_frequencies(generator, segmenter, n: int = 256, seed: int = 0, batch: int = 64) -> np.ndarray:
    """Label shares float64 (num_labels,) of ``n`` generated images (z seed ``seed``) under ``segmenter``."""
    from gandissect_jax.intervention import label_shares
    from gandissect_jax.sampling import sample_z

    return label_shares(generator, segmenter, sample_z(n, generator.z_dim, seed), batch_size=batch)


def world_label_frequencies(n: int = 2000, world_seed: int = 0, segmenter=None, batch: int = 200) -> np.ndarray:
    """Label shares float64 (num_labels,) of ``n`` world scenes: exact labels, or ``segmenter``'s if given."""
    if segmenter is None:
        batches = world.iterate_scenes(world_seed, batch, 0, n)
        return _shares([count_labels(labels, world.NUM_LABELS) for _, labels in batches], world.NUM_LABELS)
    return segmented_label_frequencies(segmenter, (x for x, _ in world.iterate_scenes(world_seed, batch, 0, n)))


def relative_gaps(generated: np.ndarray, real: np.ndarray) -> np.ndarray:
    """|generated - real| / real per label (labels 1..); float64 (num_labels - 1,)."""
    real = np.asarray(real, np.float64)[1:]
    return np.abs(np.asarray(generated, np.float64)[1:] - real) / np.maximum(real, 1e-12)


def demo_pair_report(generator, segmenter, n: int = 512, z_seed: int = 0, n_real: int = 2000,
                     real_segmented: np.ndarray | None = None) -> dict:
    """Label shares of a generator vs the world, as JSON-ready dict (the shipped pair's documented figures).

    Keys: ``generated`` (``n`` images, z = ``sample_z(n, z_dim, z_seed)``, labelled by ``segmenter``),
    ``real_segmented`` (``n_real`` world-seed-0 scenes labelled by ``segmenter``; pass it in to
    reuse it), ``real_exact`` (their exact labels) and ``relative_gap_vs_real_segmented``; each
    maps label name -> value for labels 1...
    """
    generated = generated_label_frequencies(generator, segmenter, n, z_seed)
    if real_segmented is None:
        real_segmented = world_label_frequencies(n_real, segmenter=segmenter)
    real_exact = world_label_frequencies(n_real)
    names = [name for name, _ in segmenter.labels]

    def table(freq):
        return {name: round(float(f), 6) for name, f in zip(names[1:], np.asarray(freq)[1:])}

    gaps = np.concatenate([[0.0], relative_gaps(generated, real_segmented)])
    return {
        "n_generated": int(n), "z_seed": int(z_seed), "n_real": int(n_real), "world_seed": 0,
        "generated": table(generated), "real_segmented": table(real_segmented),
        "real_exact": table(real_exact), "relative_gap_vs_real_segmented": table(gaps),
        "max_relative_gap": round(float(gaps[1:].max()), 6),
    }
