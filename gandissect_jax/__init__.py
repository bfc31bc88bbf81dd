"""gandissect-jax: GAN Dissection (Bau et al., ICLR 2019) in JAX/Flax.

Data flows ``z -> h -> r -> (edit) -> f -> x -> segment -> tally -> report``:

- :mod:`gandissect_jax.generator`     the Generator protocol (split into h and f) and verify_split
- :mod:`gandissect_jax.flax_split`    split_module: any Flax (linen or nnx) model as a Generator
- :mod:`gandissect_jax.proggan`       the Progressive GAN generator, which implements it
- :mod:`gandissect_jax.sampling`      z sampling identical to the reference
- :mod:`gandissect_jax.intervention`  pure edits of a layer's representation (ablate / insert)
- :mod:`gandissect_jax.ace`           ACE optimization: which units cause a concept
- :mod:`gandissect_jax.effects`       causal effects: ablate, insert, context maps, ablation curves
- :mod:`gandissect_jax.artifacts`     artifact units ranked with the discriminator
- :mod:`gandissect_jax.paint`         GANPaint: strokes that add or remove concepts; photo inversion (invert)
- :mod:`gandissect_jax.unitseg`       unit segmentation (each pixel: its most active unit's concept)
- :mod:`gandissect_jax.pth`           torch-free reader of PyTorch ``.pth`` checkpoints
- :mod:`gandissect_jax.checkpoints`   orbax checkpoints (params + architecture JSON)
- :mod:`gandissect_jax.weights`       registry of downloadable weights, fetch and convert
- :mod:`gandissect_jax.segmenter_protocol`  the Segmenter protocol (what dissection needs of a segmenter)
- :mod:`gandissect_jax.segmenter`     the unified-parsing UPerNet (and the protocol, re-exported)
- :mod:`gandissect_jax.dissection`    unit statistics, IoU / IQR scores, per-label unit rankings (IoU, ACE) and reports
- :mod:`gandissect_jax.scenes`        the procedural scene world and its shipped demo models

Public names are imported lazily, so ``import gandissect_jax`` is cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Generator": "gandissect_jax.generator",
    "Split": "gandissect_jax.generator",
    "SplitError": "gandissect_jax.generator",
    "split_module": "gandissect_jax.flax_split",
    "verify_split": "gandissect_jax.generator",
    "check_generator": "gandissect_jax.generator",
    "load_generator": "gandissect_jax.proggan",
    "ProgressiveGenerator": "gandissect_jax.proggan",
    "GeneratorConfig": "gandissect_jax.proggan",
    "init_params": "gandissect_jax.proggan",
    "save_generator": "gandissect_jax.proggan",
    "Edit": "gandissect_jax.intervention",
    "edited_generator": "gandissect_jax.intervention",
    "sample_z": "gandissect_jax.sampling",
    "edit_representation": "gandissect_jax.intervention",
    "ablation_edit": "gandissect_jax.intervention",
    "insertion_edit": "gandissect_jax.intervention",
    "label_shares": "gandissect_jax.intervention",
    "build_ace_corpus": "gandissect_jax.ace",
    "optimize_ace": "gandissect_jax.ace",
    "ace_ranking": "gandissect_jax.ace",
    "ablate": "gandissect_jax.effects",
    "insert": "gandissect_jax.effects",
    "context_map": "gandissect_jax.effects",
    "ace_curve": "gandissect_jax.effects",
    "paired_label_shares": "gandissect_jax.effects",
    "artifact_ranking": "gandissect_jax.artifacts",
    "unit_segmentation": "gandissect_jax.unitseg",
    "invert": "gandissect_jax.paint",
    "load_discriminator": "gandissect_jax.scenes.discriminator",
    "load_segmenter": "gandissect_jax.segmenter",
    "Segmenter": "gandissect_jax.segmenter_protocol",
    "check_segmenter": "gandissect_jax.segmenter_protocol",
    "dissect_generator": "gandissect_jax.dissection",
    "dissect_features": "gandissect_jax.dissection",
    "dissect_model": "gandissect_jax.dissection",
    "DissectConfig": "gandissect_jax.dissection",
    "LayerDissection": "gandissect_jax.dissection",
    "tally": "gandissect_jax.dissection",
    "StreamingStatistic": "gandissect_jax.dissection",
    "top_k": "gandissect_jax.dissection",
    "running_moments": "gandissect_jax.dissection",
    "running_covariance": "gandissect_jax.dissection",
    "label_index": "gandissect_jax.segmenter_protocol",
    "to_uint8": "gandissect_jax.images",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'gandissect_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
