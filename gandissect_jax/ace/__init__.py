"""ACE optimization: find the units of a layer that *cause* a concept (the paper's Sec. 3.2).

Dissection says which units *correlate* with a concept; the average causal effect (ACE) of a set
of units says which ones make it appear. Searching all subsets is hopeless, so, as the paper and
the reference (``netdissect.aceoptimize``) do, we fit a continuous per-unit weight
``alpha`` in ``[0, 1]^C`` with gradient descent through f and the segmenter, and then rank the
units by ``alpha``. Two kinds of sample drive the fit, collected by :func:`build_ace_corpus`:

- *present*: images where the concept is visible, each with the feature-map location ``p`` that
  covers the most concept pixels. Ablating ``alpha`` there should erase the concept;
- *candidate*: images where the concept is absent at a location ``q`` but inserting the
  concept's typical features there (``v``, the presence-weighted mean of the layer's features)
  makes it appear. Inserting ``alpha`` there should create the concept.

:func:`optimize_ace` then minimises, with any optax ``GradientTransformation`` (default: Adam
chained with :func:`project_unit_interval`, the projection onto ``[0, 1]``, as a transform)::

    mean_present  s_c(f(r * (1 - alpha m_p)))[p]
  - mean_candidate s_c(f(r * (1 - alpha m_q) + v alpha m_q))[q]  +  l2 * |alpha|^2

where ``m_p`` is the one-hot map of location ``p`` and ``s_c`` the segmenter's differentiable
class score averaged over the pixels under the feature location. The reference measures the
insertion term at the *present* sample's location ``p`` instead of ``q`` (an indexing slip in
``ace_loss``); we measure it where the insertion happened.

Two more objectives ablate ``alpha`` at every position of the present samples: ``"removal"``
(the reference's full-image variant) minimises the concept's score, and ``"specific_removal"``
(ours) minimises the concept's remaining share while penalising any change of the other labels'
shares, to find units whose ablation removes the concept without turning it into something else.
With ``max_units=k`` the fit is kept on ``{alpha in [0, 1]^C : sum(alpha) <= k}``, the convex
relaxation of "ablate k units", so the weights rank the best set of that size (the projection
:func:`project_unit_budget`, also a chainable transform); ``binarize`` pushes the weights to 0 or 1
by the last epoch, so that the fit ends on whole units.

Speed: ``r = h(z)`` does not depend on ``alpha``, so it is computed once per corpus sample and kept
on the device; a step runs only ``f`` and the segmenter (forward and backward, with respect to
``alpha`` alone). Every jitted program here takes the generator's and the segmenter's parameters
as arguments and is keyed by their structure (:mod:`gandissect_jax._structure`), so it compiles
once per architecture and shapes: repeated fits, and fits of another weight set of the same
architecture, compile nothing.

Example::

    corpus = build_ace_corpus(G, S, "layer4", "tree", search_size=4000, progress=True)
    fit = optimize_ace(G, S, corpus, init=iou_of_tree_per_unit)
    units = ace_ranking(fit.alpha, tie_break=iou_of_tree_per_unit)[:20]
    shares = label_shares(G, S, z, layer="layer4", edit=ablation_edit(units, 128))
"""
from __future__ import annotations

from .corpus import AceCorpus, _location_map, build_ace_corpus, layer_shape  # noqa: F401 (_location_map)
from .fit import (AceFit, AceProblem, _score_at, _take, ace_ranking, ace_step, optimize_ace,  # noqa: F401 (_score_at, _take)
                  prepare_ace, representations)
from .projections import ace_optimizer, project_to_budget, project_unit_budget, project_unit_interval
from .scores import OBJECTIVES, _pool_to_grid, concept_labels, concept_score, label_scores  # noqa: F401

__all__ = [
    "AceCorpus", "AceFit", "build_ace_corpus", "optimize_ace", "ace_ranking", "concept_score",
    "project_to_budget", "label_scores", "project_unit_interval", "project_unit_budget",
    "ace_optimizer", "concept_labels", "prepare_ace", "AceProblem", "ace_step", "representations",
    "layer_shape",
]
