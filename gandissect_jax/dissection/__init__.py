"""Dissection: unit statistics, IoU / IQR scores against segmentations, and reports.

Entry points: :func:`dissect_generator` (a generator and a segmenter) and
:func:`dissect_features` (precomputed activations and segmentations). Both return a
:class:`LayerDissection` per layer and, given ``outdir``, write ``dissect.json``, ``scores.npz``,
image strips and an HTML report. See ``README.md`` in this package for what is exact.
"""

from .pipeline import dissect_features, dissect_generator
from .results import LayerDissection
from .scoring import score_counts
from .threshold_search import IQR_FRACTIONS, search_iqr_thresholds
from .upsample import bilinear_matrix, upsample_bilinear

__all__ = [
    "dissect_generator", "dissect_features", "LayerDissection", "score_counts", "search_iqr_thresholds",
    "IQR_FRACTIONS", "upsample_bilinear", "bilinear_matrix",
]
