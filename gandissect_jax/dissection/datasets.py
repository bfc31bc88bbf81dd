"""Dataset sources for dissection: a model's layers over a labelled image dataset (ModelSource) and tensorflow-datasets examples with label maps (TfdsSource)."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gandissect_jax.generator import split_of
from gandissect_jax.images import to_uint8

from .resume import pytree_digest
from .sources import FeaturesOnly, _clip


# ============================================================================ a model over a dataset


class ModelSource:
    """A model's layers over a labelled image dataset: features come from the model, labels from the data.

    model: any :class:`~gandissect_jax.generator.Generator`-protocol object whose input is an
    image batch, e.g. a Flax classifier seen through ``split_module(module, params, at=...,
    input_shape=(H, W, 3))``; only ``split(layer).h`` is run (the model's head up to each layer),
    so the model needs ``params``, ``layer_names`` and ``split`` (TypeError naming what is missing).
    data: a source of ``{"image": float32 (n, H, W, 3) in [-1, 1], "label": int (n, H', W'[, D])}``
    by example number, such as :class:`TfdsSource` (``num_samples``, ``fetch``, ``images``,
    ``identity``). This is Network Dissection of a discriminative model (Bau et al., CVPR 2017):
    units are scored against the dataset's own label maps.
    """

    def __init__(self, model, data, layers: Sequence[str], identity: dict | None = None):
        names = tuple(getattr(model, "layer_names", ()))
        unknown = [layer for layer in layers if names and layer not in names]
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown}; the model has {list(names)}")
        if not layers:
            raise ValueError("no layers to dissect")
        self.model, self.data = model, data
        self.layers = tuple(layers)
        self.num_samples = int(data.num_samples)
        self._identity = identity or {}
        heads = {layer: split_of(model, layer, needs=("params", "layer_names", "split"))[0] for layer in self.layers}

        def features(params, images):
            return {layer: head(params, images)[0] for layer, head in heads.items()}

        self._features = jax.jit(features)
        first = data.fetch(np.zeros(1, np.int64), None)
        if "image" not in first or "label" not in first:
            raise ValueError(f"the data source must give 'image' and 'label'; it gives {sorted(first)}")
        labels = first["label"]
        if labels.ndim not in (3, 4):
            raise ValueError(f"the data's labels must be label maps (n, H, W[, D]), got shape {tuple(labels.shape)}")
        self.seg_size = (int(labels.shape[1]), int(labels.shape[2]))
        probe = jax.eval_shape(features, model.params, jax.ShapeDtypeStruct(first["image"].shape, jnp.float32))
        for layer, shape in probe.items():
            if len(shape.shape) != 4:
                raise ValueError(f"layer {layer!r} gives shape {tuple(shape.shape[1:])} per sample; dissection "
                                 "needs feature maps (h, w, units)")
        self.feature_shapes = {layer: tuple(int(s) for s in probe[layer].shape[1:]) for layer in self.layers}
        self._placed: tuple[Any, Any] | None = None

    def _params(self, sharding) -> Any:
        if sharding is None:
            return self.model.params
        if self._placed is None or self._placed[0] is not sharding.mesh:
            self._placed = (sharding.mesh, jax.device_put(self.model.params, NamedSharding(sharding.mesh, P())))
        return self._placed[1]

    def fetch(self, indices: np.ndarray, sharding, labels: bool = True) -> dict[str, jax.Array]:
        batch = self.data.fetch(indices, sharding)
        feats = self._features(self._params(sharding), batch["image"])
        out = {name: jax.device_put(value, sharding) for name, value in feats.items()}
        if labels:
            label = jnp.asarray(batch["label"], jnp.int32)
            out["labels"] = jax.device_put(label if label.ndim == 4 else label[..., None], sharding)
        return out

    def features_only(self) -> FeaturesOnly:
        return FeaturesOnly(self)

    def visual_batch(self, indices: np.ndarray, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (n, H, W, 3) dataset images and float32 (n, h, w, U) features of ``layer``."""
        batch = self.data.fetch(indices, None)
        return self.data.images(indices), np.asarray(self._features(self.model.params, batch["image"])[layer], np.float32)

    def identity(self) -> dict:
        if getattr(self, "_params_digest", None) is None:
            self._params_digest = pytree_digest(self.model.params)
        return {"kind": "model", "data": self.data.identity(), "layers": list(self.layers),
                "feature_shapes": {k: list(v) for k, v in self.feature_shapes.items()},
                "params": self._params_digest, **self._identity}


# ============================================================================ tensorflow-datasets


class TfdsSource:
    """Images and label maps of a tensorflow-datasets split, by example number (random access).

    data: a random-access split, e.g. ``builder.as_data_source("train")`` (array_record; needs
    no TensorFlow), or any sequence of example dicts; see :meth:`from_builder`. fetch ->
    ``{"image": float32 (n, H, W, 3) in [-1, 1] (uint8 x / 127.5 - 1), "label": int32 (n, H, W, D)}``
    (a 2-D label map gets D = 1; a scalar label stays (n,)). Feed it to ``tally`` with a
    ``compute`` that runs your model on ``batch["image"]``.
    """

    batch_invariant = True  # examples are read as stored

    def __init__(self, data, *, image_key: str = "image", label_key: str | None = "label",
                 num_samples: int | None = None, identity: dict | None = None):
        self.data = data
        self.image_key, self.label_key = image_key, label_key
        self.num_samples = int(len(data) if num_samples is None else min(num_samples, len(data)))
        if self.num_samples < 1:
            raise ValueError("the dataset split has no examples")
        example = data[0]
        for key in (image_key, label_key):
            if key is not None and key not in example:
                raise ValueError(f"the dataset's examples have no {key!r}; they have {sorted(example)}")
        self._identity = identity or {}

    @classmethod
    def from_builder(cls, builder, split: str = "train", **kwargs) -> "TfdsSource":
        """Source over ``builder.as_data_source(split)`` of a prepared tfds builder."""
        identity = {"dataset": str(builder.info.full_name), "split": split}
        return cls(builder.as_data_source(split), identity={**identity, **kwargs.pop("identity", {})}, **kwargs)

    def examples(self, indices: np.ndarray) -> list[dict]:
        return [self.data[int(i)] for i in _clip(indices, self.num_samples)]

    def images(self, indices: np.ndarray) -> np.ndarray:
        """uint8 (n, H, W, 3) images."""
        return to_uint8(np.stack([np.asarray(e[self.image_key]) for e in self.examples(indices)]))

    def fetch(self, indices: np.ndarray, sharding) -> dict[str, jax.Array]:
        examples = self.examples(indices)
        images = np.stack([np.asarray(e[self.image_key]) for e in examples])
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / np.float32(127.5) - np.float32(1)
        batch = {"image": jax.device_put(images.astype(np.float32), sharding)}
        if self.label_key is not None:
            labels = np.stack([np.asarray(e[self.label_key]) for e in examples]).astype(np.int32)
            if labels.ndim == 3:
                labels = labels[..., None]
            batch["label"] = jax.device_put(labels, sharding)
        return batch

    def identity(self) -> dict:
        return {"kind": "tfds", "num_samples": self.num_samples, **self._identity}


__all__ = ["ModelSource", "TfdsSource"]
