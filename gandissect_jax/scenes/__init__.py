"""The procedural scene world and the demo models trained on it (registry names ``scenes64``,
``scenes64-segmenter``).

- :mod:`gandissect_jax.scenes.world`           render 64x64 scenes with exact labels (numpy, by seed)
- :mod:`gandissect_jax.scenes.demo_segmenter`  the demo U-Net segmenter (Segmenter protocol)
- :mod:`gandissect_jax.scenes.stats`           label frequencies of real and generated scenes
- :mod:`gandissect_jax.scenes.tfds_builder`    the world as a tensorflow-datasets builder (optional)
"""
