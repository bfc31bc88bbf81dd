"""Dissection: stream samples through exact streaming statistics (``tally``), score units by IoU / IQR, write reports.

Entry points: :func:`dissect_generator` (a generator and a segmenter) and
:func:`dissect_features` (precomputed activations and segmentations) and :func:`dissect_model`
(a model of images, e.g. a classifier, over a labelled dataset), all configured by one
:class:`DissectConfig`; they return a :class:`LayerDissection` per layer and, given ``outdir``,
write ``dissect.json``, ``scores.npz``, image strips and an HTML report. :func:`tally` runs any
jittable computation over any source into any :class:`StreamingStatistic`, sharded and
resumable. See ``README.md`` in this package for the layout, what is exact and the schema.
"""

from .analysis import LABEL_RULES, label_units, score_layer
from .config import DissectConfig
from .dissect import dissect, dissect_features, dissect_generator, dissect_model
from .engine import make_mesh, tally
from .labels import count_labels
from .moments import running_covariance, running_moments, sample_ordered
from .results import LayerDissection
from .schema import read_dissect_json
from .scoring import chance_iou, score_counts, significance
from .datasets import ModelSource, TfdsSource
from .sources import ArraySource, GeneratorSource
from .statistics import StreamingStatistic, label_statistics, level_counts, top_k
from .threshold_search import IQR_FRACTIONS, search_iqr_thresholds
from .upsample import bilinear_matrix, upsample_bilinear

__all__ = [
    "dissect_generator", "dissect_features", "dissect_model", "dissect", "DissectConfig", "LayerDissection", "tally", "make_mesh",
    "StreamingStatistic", "top_k", "label_statistics", "level_counts", "running_moments", "running_covariance",
    "sample_ordered", "count_labels", "ArraySource", "GeneratorSource", "ModelSource", "TfdsSource", "score_layer", "score_counts",
    "search_iqr_thresholds", "read_dissect_json", "IQR_FRACTIONS", "upsample_bilinear", "bilinear_matrix",
    "label_units", "LABEL_RULES", "chance_iou", "significance",
]
