"""GANPaint: paint concepts into and out of generated scenes (and inverted photos), in Python and in the browser.

The edit (Bau et al., ICLR 2019, Sec. 4.3; the reference's ``netdissect/server.py`` and GANPaint
client): a stroke of concept c over an image region turns the top units of c's ranking (by ACE
when fitted, else by IoU) on -- to a high quantile of their activations -- or off, inside the
stroke's region of the layer's feature map, and the generator redraws the scene from there.

Python::

    from gandissect_jax.paint import Stroke, load_rankings, paint
    rankings = load_rankings("results/scenes64", "layer4")       # from a dissection directory
    mask = np.zeros((64, 64)); mask[40:, :24] = 1                 # image space, any resolution
    images = paint(G, z, [Stroke(mask, "tree", "add")], rankings)  # (N, 64, 64, 3) in [-1, 1]

    inv = invert(G, "layer4", photos)                             # z, then r at the layer (optax)
    inv.psnr_z, inv.psnr_r                                        # reconstruction PSNR, dB

The web app: ``gandissect-jax paint`` (:mod:`.server`, :mod:`.model`, ``static/``).

Modules: :mod:`.rankings` (unit rankings and insertion values of a dissection),
:mod:`.edits` (strokes as fixed-shape arrays; the jitted edit functions; :func:`paint`),
:mod:`.invert` (photo inversion and blending), :mod:`.model` (a dissected generator ready to
paint), :mod:`.server` (the FastAPI app; needs the ``paint`` extra).
"""

from __future__ import annotations

from .edits import DEFAULT_TOP, MAX_STROKES, Stroke, StrokeArrays, apply_strokes, encode_strokes, paint, pool_mask
from .invert import Inversion, blend, invert, psnr
from .rankings import LayerRankings, layer_rankings, load_rankings

__all__ = [
    "Stroke",
    "StrokeArrays",
    "paint",
    "apply_strokes",
    "encode_strokes",
    "pool_mask",
    "DEFAULT_TOP",
    "MAX_STROKES",
    "Inversion",
    "invert",
    "blend",
    "psnr",
    "LayerRankings",
    "layer_rankings",
    "load_rankings",
]
