"""The scene world as a tensorflow-datasets dataset (``scenes64``), built and read without TensorFlow.

Importing this module needs ``tensorflow-datasets`` (``pip install gandissect-jax[datasets]``);
nothing else in the library imports it. tfds writes array_record files, and
``builder.as_data_source(split)`` reads them with random access and no TensorFlow::

    from gandissect_jax.scenes.tfds_builder import Scenes64, ScenesConfig
    builder = Scenes64(data_dir="/tmp/tfds", config=ScenesConfig(name="small", train=1000, test=100))
    builder.download_and_prepare(file_format="array_record")
    train = builder.as_data_source("train")
    example = train[0]   # {"image": uint8 (64, 64, 3), "label": uint8 (64, 64), "index": int64}

Example ``i`` of split ``s`` is scene ``offset_s + i`` of world ``config.world_seed`` (train scenes
start at 0, test scenes at ``config.test_offset``), quantized to uint8 as
``gandissect_jax.images.to_uint8`` (round half up); labels are the exact world labels (see ``world.LABEL_NAMES``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from gandissect_jax.images import to_uint8
from gandissect_jax.scenes import world


@dataclasses.dataclass
class ScenesConfig(tfds.core.BuilderConfig):
    """Split sizes and world seed of a scenes64 dataset variant."""

    train: int = 50_000
    test: int = 2_000
    world_seed: int = 0
    test_offset: int = 10**9
    batch: int = 256


class Scenes64(tfds.core.GeneratorBasedBuilder):
    """64x64 procedural outdoor scenes with exact per-pixel labels (11 labels, 0 = none)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        ScenesConfig(name="default", description="50,000 train and 2,000 test scenes of world seed 0."),
        ScenesConfig(name="small", description="1,000 train and 100 test scenes.", train=1000, test=100),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(world.SIZE, world.SIZE, 3), dtype=np.uint8),
                    "label": tfds.features.Tensor(shape=(world.SIZE, world.SIZE), dtype=np.uint8),
                    "index": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # example i is scene offset + i
            metadata=tfds.core.MetadataDict(label_names=list(world.LABEL_NAMES)),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the world renders itself
        config = self.builder_config
        return {
            "train": self._generate_examples(0, config.train),
            "test": self._generate_examples(config.test_offset, config.test),
        }

    def _generate_examples(self, offset: int, count: int):
        config = self.builder_config
        for start in range(0, count, config.batch):
            stop = min(start + config.batch, count)
            images, labels = world.render_scenes(config.world_seed, np.arange(offset + start, offset + stop))
            images = to_uint8(images)
            for i in range(stop - start):
                yield start + i, {"image": images[i], "label": labels[i].astype(np.uint8), "index": offset + start + i}


def build_scenes64(data_dir, train: int = 1000, test: int = 100, world_seed: int = 0, name: str | None = None):
    """Build (if needed) a scenes64 variant under ``data_dir`` as array_record; returns the builder."""
    config = ScenesConfig(name=name or f"w{world_seed}_train{train}_test{test}", train=train, test=test,
                          world_seed=world_seed)
    builder = Scenes64(data_dir=str(data_dir), config=config)
    builder.download_and_prepare(file_format="array_record")
    return builder
