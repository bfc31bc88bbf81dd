"""The Segmenter protocol, re-exported where the segmenter package's users look for it.

It is defined in :mod:`gandissect_jax.segmenter_protocol`, a module that imports no segmenter,
so that the dissection engine can check segmenters without importing the UPerNet.
"""

from gandissect_jax.segmenter_protocol import Segmenter, check_segmenter, label_index

__all__ = ["Segmenter", "check_segmenter", "label_index"]
