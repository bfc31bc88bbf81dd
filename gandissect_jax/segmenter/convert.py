"""Load the reference's ``upp-resnet50-upernet`` weights (torch-free) and convert them to orbax.

A reference weight directory holds ``encoder_epoch_<E>.pth`` and ``decoder_epoch_<E>.pth``
(PyTorch state dicts, legacy or zip format) and ``labels.json`` (keys ``object``, ``material``,
``scene``, ``object_part``, usually ``part``). State-dict keys map to Flax variables mechanically:
the module path with ``.`` replaced by ``_`` names the Flax submodule; a prefix that has a
``running_mean`` is a batch norm (``weight`` -> ``scale``, ``bias`` -> ``bias``,
``running_mean``/``running_var`` -> ``batch_stats`` ``mean``/``var``); other ``weight`` tensors are
OIHW conv kernels (transposed to HWIO) and ``bias`` tensors conv biases.
"""

from __future__ import annotations

import glob
import json
import os
import re
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .upernet import HeadSizes, UnifiedParsingNetwork
from .. import untrusted_json

__all__ = [
    "MODEL_NAME",
    "SegmenterWeightsError",
    "head_sizes_from_labels",
    "state_dicts_to_variables",
    "read_reference_dir",
    "convert_reference",
    "load_variables",
    "is_reference_dir",
]

MODEL_NAME = "unified-parsing-resnet50-upernet"
FORMAT_VERSION = 1
FPN_DIM = 512

# (head, state-dict key of its classifier bias) -> how labels.json determines its size
_HEAD_BIAS_KEYS = {
    "object": "object_head.1.bias",
    "part": "part_head.1.bias",
    "material": "material_head.1.bias",
    "scene": "scene_head.2.bias",
}


class SegmenterWeightsError(ValueError):
    """A segmenter checkpoint or its labels.json is missing, mis-shaped or inconsistent."""


# ----------------------------------------------------------------------------------------------
# labels.json


def validate_labeldata(labeldata: Mapping[str, Any], where: str = "labels.json") -> dict:
    """Check the label data schema; returns a plain dict copy. Raises SegmenterWeightsError."""
    if not isinstance(labeldata, Mapping):
        raise SegmenterWeightsError(f"{where}: expected a JSON object, got {type(labeldata).__name__}")
    missing = [k for k in ("object", "material", "scene", "object_part") if k not in labeldata]
    if missing:
        raise SegmenterWeightsError(f"{where}: missing keys {missing}")
    data = json.loads(json.dumps(dict(labeldata)))
    objects = data["object"]
    for owner, parts in data["object_part"].items():
        if owner not in objects:
            raise SegmenterWeightsError(
                f"{where}: object_part owner {owner!r} is not in the object list")
        if not isinstance(parts, list) or not parts:
            raise SegmenterWeightsError(f"{where}: object_part[{owner!r}] must be a non-empty list")
    return data


def head_sizes_from_labels(labeldata: Mapping[str, Any]) -> HeadSizes:
    """Class counts the reference loader derives from labels.json (``part`` = sum of part lists)."""
    return HeadSizes(
        object=len(labeldata["object"]),
        part=sum(len(p) for p in labeldata["object_part"].values()),
        material=len(labeldata["material"]),
        scene=len(labeldata["scene"]),
    )


def _check_head_sizes(expected: HeadSizes, actual: Mapping[str, int], where: str) -> None:
    for head, count in actual.items():
        wanted = getattr(expected, head)
        if wanted != count:
            rule = ("the sum of the object_part list lengths" if head == "part"
                    else f"the length of its {head!r} list")
            raise SegmenterWeightsError(
                f"labels.json and {where} disagree on the {head} classes: labels.json gives "
                f"{wanted} ({rule}) but the checkpoint's {head} head ({_HEAD_BIAS_KEYS[head]}) "
                f"has {count} outputs")


# ----------------------------------------------------------------------------------------------
# state dicts -> Flax variables


def _strip_prefixes(state_dict: Mapping[str, np.ndarray], part: str) -> dict[str, np.ndarray]:
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", f"{part}."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = np.asarray(value)
    return out


def _convert_part(state_dict: Mapping[str, np.ndarray], part: str) -> tuple[dict, dict]:
    state_dict = _strip_prefixes(state_dict, part)
    bn_prefixes = {k[: -len(".running_mean")] for k in state_dict if k.endswith(".running_mean")}
    params: dict[str, dict[str, np.ndarray]] = {}
    stats: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        if "." not in key:
            raise SegmenterWeightsError(f"{part} checkpoint: unexpected key {key!r}")
        prefix, leaf = key.rsplit(".", 1)
        module = prefix.replace(".", "_")
        if prefix in bn_prefixes:
            if leaf == "num_batches_tracked":
                continue
            target, name = {"weight": (params, "scale"), "bias": (params, "bias"),
                            "running_mean": (stats, "mean"),
                            "running_var": (stats, "var")}.get(leaf, (None, None))
            if target is None:
                raise SegmenterWeightsError(f"{part} checkpoint: unexpected key {key!r}")
            target.setdefault(module, {})[name] = value.astype(np.float32)
        elif leaf == "weight":
            if value.ndim != 4:
                raise SegmenterWeightsError(
                    f"{part} checkpoint: {key!r} has shape {value.shape}, expected a 4-D conv "
                    "weight (out, in, kh, kw)")
            params.setdefault(module, {})["kernel"] = np.ascontiguousarray(
                value.transpose(2, 3, 1, 0).astype(np.float32))
        elif leaf == "bias":
            params.setdefault(module, {})["bias"] = value.astype(np.float32)
        else:
            raise SegmenterWeightsError(f"{part} checkpoint: unexpected key {key!r}")
    return params, stats


def _expected_shapes(heads: HeadSizes) -> Any:
    model = UnifiedParsingNetwork(heads=heads, fpn_dim=FPN_DIM)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3), jnp.float32))


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


_MULTIWORD = ("ppm_last_conv", "ppm_conv", "fpn_in", "fpn_out", "conv_fusion", "scene_head",
              "object_head", "part_head", "material_head")


def _torch_name(path: tuple) -> str:
    """Reference state-dict key (with its file) of a Flax variable path."""
    _, part, module, leaf = path
    leaf = {"kernel": "weight", "scale": "weight", "mean": "running_mean",
            "var": "running_var"}.get(leaf, leaf)
    head = next((w for w in _MULTIWORD if module.startswith(w + "_")), "")
    module = head + module[len(head):].replace("_", ".")
    return f"{part}: {module}.{leaf}"


def state_dicts_to_variables(encoder: Mapping[str, np.ndarray], decoder: Mapping[str, np.ndarray],
                             labeldata: Mapping[str, Any], where: str = "checkpoint") -> dict:
    """Map reference encoder/decoder state dicts to the Flax variables of the network.

    Returns:
      ``{"params": {"encoder", "decoder"}, "batch_stats": {...}}`` of float32 numpy arrays.

    Raises:
      SegmenterWeightsError: head sizes disagree with ``labeldata`` (naming both numbers), or a
        tensor is missing or mis-shaped. Extra keys are ignored with a warning (the reference
        loads with ``strict=False``).
    """
    heads = head_sizes_from_labels(labeldata)
    decoder_plain = _strip_prefixes(decoder, "decoder")
    actual = {head: int(decoder_plain[key].shape[0]) for head, key in _HEAD_BIAS_KEYS.items()
              if key in decoder_plain}
    _check_head_sizes(heads, actual, where)
    enc_params, enc_stats = _convert_part(encoder, "encoder")
    dec_params, dec_stats = _convert_part(decoder, "decoder")
    variables = {"params": {"encoder": enc_params, "decoder": dec_params},
                 "batch_stats": {"encoder": enc_stats, "decoder": dec_stats}}
    return _check_structure(variables, heads, where)


def _check_structure(variables: Mapping, heads: HeadSizes, where: str) -> dict:
    expected = _flatten(_expected_shapes(heads))
    got = _flatten(variables)
    missing = sorted(set(expected) - set(got))
    if missing:
        names = [_torch_name(p) for p in missing]
        raise SegmenterWeightsError(
            f"{where} lacks {len(missing)} tensors of the ResNet-50 UPerNet, e.g. {names[:6]}")
    wrong = [(p, got[p].shape, expected[p].shape) for p in expected
             if tuple(got[p].shape) != tuple(expected[p].shape)]
    if wrong:
        path, have, want = wrong[0]
        raise SegmenterWeightsError(
            f"{where}: {len(wrong)} tensors have the wrong shape, e.g. {_torch_name(path)} "
            f"is {tuple(have)} (as Flax {'/'.join(path)}), expected {tuple(want)}")
    extra = sorted(set(got) - set(expected))
    if extra:
        warnings.warn(f"{where}: ignoring {len(extra)} tensors the network does not use, e.g. "
                      f"{[_torch_name(p) for p in extra[:4]]}", stacklevel=3)
    result: dict = {}
    for path in expected:
        node = result
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.asarray(got[path], np.float32)
    return result


# ----------------------------------------------------------------------------------------------
# directories


def _epoch_files(directory: str) -> tuple[str, str]:
    epochs = []
    for path in glob.glob(os.path.join(directory, "encoder_epoch_*.pth")):
        match = re.fullmatch(r"encoder_epoch_(\d+)\.pth", os.path.basename(path))
        if match and os.path.isfile(os.path.join(directory, f"decoder_epoch_{match[1]}.pth")):
            epochs.append(int(match[1]))
    if not epochs:
        raise FileNotFoundError(
            f"{directory}: no encoder_epoch_<E>.pth / decoder_epoch_<E>.pth pair (the reference's "
            "upp-resnet50-upernet directory holds encoder_epoch_40.pth and decoder_epoch_40.pth)")
    epoch = 40 if 40 in epochs else max(epochs)
    return (os.path.join(directory, f"encoder_epoch_{epoch}.pth"),
            os.path.join(directory, f"decoder_epoch_{epoch}.pth"))


def is_reference_dir(directory: str | os.PathLike) -> bool:
    """True if ``directory`` has ``labels.json`` and an ``encoder_epoch_*.pth`` file."""
    directory = os.fspath(directory)
    return (os.path.isfile(os.path.join(directory, "labels.json"))
            and bool(glob.glob(os.path.join(directory, "encoder_epoch_*.pth"))))


def read_labels_json(path: str) -> dict:
    """Read and validate a ``labels.json``."""
    try:
        with open(path) as f:
            data = untrusted_json.load(f)
    except ValueError as err:  # not JSON (too deep included), or not UTF-8
        raise SegmenterWeightsError(f"{path} is not valid JSON: {err}") from err
    return validate_labeldata(data, path)


def read_reference_dir(directory: str | os.PathLike) -> tuple[dict, dict]:
    """Read a reference weight directory without PyTorch.

    Returns:
      ``(variables, labeldata)``: Flax variables (numpy float32) and the validated labels.json.
    """
    from ..pth import read_state_dict

    directory = os.fspath(directory)
    labels_path = os.path.join(directory, "labels.json")
    if not os.path.isfile(labels_path):
        raise FileNotFoundError(f"{directory}: no labels.json")
    labeldata = read_labels_json(labels_path)
    encoder_path, decoder_path = _epoch_files(directory)
    encoder = read_state_dict(encoder_path)
    decoder = read_state_dict(decoder_path)
    where = f"{os.path.basename(encoder_path)} / {os.path.basename(decoder_path)}"
    return state_dicts_to_variables(encoder, decoder, labeldata, where), labeldata


def _config(labeldata: Mapping[str, Any], source: str) -> dict:
    return {"model": MODEL_NAME, "format_version": FORMAT_VERSION, "encoder": "resnet50",
            "decoder": "upernet", "fpn_dim": FPN_DIM, "labels": dict(labeldata),
            "source": source}


def convert_reference(src_dir: str | os.PathLike, dest_dir: str | os.PathLike, *,
                      force: bool = False) -> str:
    """Convert a reference ``upp-resnet50-upernet`` directory into an orbax checkpoint.

    Args:
      src_dir: directory with ``encoder_epoch_40.pth``, ``decoder_epoch_40.pth``, ``labels.json``.
      dest_dir: checkpoint directory to write (atomically). It must not exist (or be empty), or --
        with ``force=True`` -- be a checkpoint written by gandissect-jax; it must not overlap
        ``src_dir``. Checked before anything is read.
      force: replace an existing gandissect-jax checkpoint at ``dest_dir`` (never anything else).

    Returns:
      The absolute path of the checkpoint, loadable with ``load_segmenter(dest_dir)``.

    Raises:
      gandissect_jax.checkpoints.DestinationError: ``dest_dir`` may not be written.
    """
    from ..checkpoints import check_destination, check_distinct, save_checkpoint

    check_distinct(src_dir, dest_dir)
    check_destination(dest_dir, force)
    variables, labeldata = read_reference_dir(src_dir)
    return save_checkpoint(dest_dir, variables, _config(labeldata, os.path.abspath(src_dir)),
                           force=force)


def load_variables(src: str | os.PathLike) -> tuple[dict, dict]:
    """Load ``(variables, labeldata)`` from a reference directory or an orbax checkpoint."""
    from ..checkpoints import is_checkpoint, load_checkpoint

    src = os.fspath(src)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"no segmenter weights directory at {src}")
    if is_reference_dir(src):
        return read_reference_dir(src)
    if is_checkpoint(src):
        variables, config = load_checkpoint(src)
        if config.get("model") != MODEL_NAME:
            raise SegmenterWeightsError(
                f"{src} is a checkpoint of {config.get('model')!r}, not {MODEL_NAME!r}")
        labeldata = validate_labeldata(config.get("labels"), f"{src}/config.json labels")
        heads = head_sizes_from_labels(labeldata)
        dec = variables.get("params", {}).get("decoder", {})
        actual = {head: int(dec[key.rsplit(".", 1)[0].replace(".", "_")]["bias"].shape[0])
                  for head, key in _HEAD_BIAS_KEYS.items()
                  if key.rsplit(".", 1)[0].replace(".", "_") in dec}
        _check_head_sizes(heads, actual, src)
        return _check_structure(variables, heads, src), labeldata
    raise SegmenterWeightsError(
        f"{src} is neither a reference segmenter directory (labels.json + encoder_epoch_*.pth + "
        "decoder_epoch_*.pth) nor a gandissect-jax checkpoint (config.json + params/)")
