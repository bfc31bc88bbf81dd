"""The reference's ProgressiveGenerator state dicts (.pth) <-> our params pytree, unwrapping what training code wraps around them."""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from ._config import GeneratorConfig
from ._generator import ProgressiveGenerator, check_params



# --------------------------------------------------------------------------------------------
# Reference state dicts (.pth) <-> params


_OLD_LAYER = re.compile(r"^features\.(\d+)\.(.+)$")
_NEW_LAYER = re.compile(r"^layer(\d+)\.(conv\.weight|wscale\.b)$")
_OUTPUT = re.compile(r"^output_(\d+)x(\d+)\.(conv\.weight|wscale\.b)$")


def _rename_old_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map the older ``features.N.*`` / ``output.*`` names onto ``layerN+1.*`` / ``output_RxR.*``."""
    count = 0
    while f"features.{count}.conv.weight" in state_dict:
        count += 1
    resolution = 4 * 2 ** ((count - 1) // 2)
    renamed = {}
    for key, value in state_dict.items():
        match = _OLD_LAYER.match(key)
        if match:
            renamed[f"layer{int(match.group(1)) + 1}.{match.group(2)}"] = value
        elif key.startswith("output."):
            renamed[f"output_{resolution}x{resolution}.{key[len('output.'):]}"] = value
        else:
            renamed[key] = value
    return renamed


def _sizes_from_state_dict(state_dict: Mapping[str, np.ndarray], source: str) -> tuple[int, ...]:
    """Infer ``sizes`` as the reference does, with a clear error for gaps or bad ranks."""
    indices = sorted(
        int(m.group(1)) for m in map(_NEW_LAYER.match, state_dict) if m and m.group(2) == "conv.weight"
    )
    if not indices:
        raise ValueError(
            f"{source}: no 'layer1.conv.weight' (or 'features.0.conv.weight'): "
            "not a Progressive GAN generator state dict"
        )
    for k in range(1, max(indices) + 1):
        if f"layer{k}.conv.weight" not in state_dict:
            raise ValueError(f"{source}: missing tensor 'layer{k}.conv.weight'")
    sizes = []
    for k in range(1, max(indices) + 1):
        weight = state_dict[f"layer{k}.conv.weight"]
        if np.ndim(weight) != 4:
            raise ValueError(
                f"{source}: tensor 'layer{k}.conv.weight' has shape {tuple(np.shape(weight))}, "
                "expected a 4-d OIHW conv weight"
            )
        if 0 in np.shape(weight):
            raise ValueError(
                f"{source}: tensor 'layer{k}.conv.weight' has shape {tuple(np.shape(weight))}: a conv "
                "weight with no channels (every size must be positive)"
            )
        if k == 1:
            sizes.append(int(weight.shape[1]))
        if k % 2 == 1:
            sizes.append(int(weight.shape[0]))
    return tuple(sizes)


def _expected_state_shapes(config: GeneratorConfig) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for spec in config.layers:
        k = spec.kernel_size
        shapes[f"{spec.name}.conv.weight"] = (spec.out_channels, spec.in_channels, k, k)
        shapes[f"{spec.name}.wscale.b"] = (spec.out_channels,)
    return shapes


# Wrappers and key prefixes that training code puts around a generator's state dict, in the
# order they are looked for: the EMA generator first (what a trainer samples with), then the
# trained one, then generic names.
STATE_DICT_WRAPPERS = ("g_ema", "G", "generator", "state_dict")
# Prefixes of every key: nn.DataParallel / DistributedDataParallel, torch.compile.
STATE_DICT_PREFIXES = ("module.", "_orig_mod.")
_MAX_WRAPPING = 4


def _keys_text(obj: Mapping, limit: int = 20) -> str:
    keys = [repr(k) for k in list(obj)[:limit]]
    return "[" + ", ".join(keys) + (f", ... ({len(obj)} in all)" if len(obj) > limit else "") + "]"


def _strip_prefixes(state_dict: Mapping) -> Mapping:
    """Remove a prefix shared by every key (repeatedly: ``module.module.`` is seen in the wild)."""
    while state_dict and all(isinstance(k, str) for k in state_dict):
        for prefix in STATE_DICT_PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                break
        else:
            return state_dict
    return state_dict


def _is_generator_state_dict(obj: Mapping) -> bool:
    return "layer1.conv.weight" in obj or "features.0.conv.weight" in obj


def unwrap_state_dict(obj: Any, source: str = "state dict") -> Mapping[str, Any]:
    """Find the generator state dict in what a ``.pth`` file holds, as training code saves it.

    Accepted: the state dict itself; every key prefixed by ``module.`` (``nn.DataParallel``) or
    ``_orig_mod.`` (``torch.compile``); wrapped in a dict under ``'g_ema'``, ``'G'``,
    ``'generator'`` or ``'state_dict'`` (looked for in that order, so a training checkpoint
    ``{'G': ..., 'g_ema': ..., 'D': ..., 'optimizer': ...}`` gives the EMA generator); and any
    nesting of these up to four deep (``{'state_dict': {'module.layer1.conv.weight': ...}}``).

    Raises:
      ValueError naming ``source`` and listing the top-level keys found, for anything else.
    """
    top = obj
    path: list[str] = []
    for _ in range(_MAX_WRAPPING + 1):
        if not isinstance(obj, Mapping):
            where = f" under {'/'.join(repr(p) for p in path)}" if path else ""
            raise ValueError(f"{source}: holds a {type(obj).__name__}{where}, not a generator state dict")
        obj = _strip_prefixes(obj)
        if _is_generator_state_dict(obj):
            return obj
        wrapper = next((k for k in STATE_DICT_WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if wrapper is None:
            break
        path.append(wrapper)
        obj = obj[wrapper]
    where = f" (looked inside {'/'.join(repr(p) for p in path)}, keys {_keys_text(obj)})" if path else ""
    raise ValueError(
        f"{source}: not a Progressive GAN generator state dict, nor one wrapped as training "
        "code saves it; top-level keys: "
        f"{_keys_text(top) if isinstance(top, Mapping) else type(top).__name__}{where}. Accepted: a "
        "state dict with 'layer1.conv.weight' (or 'features.0.conv.weight'), keys optionally "
        f"prefixed by {' or '.join(repr(p) for p in STATE_DICT_PREFIXES)}, optionally wrapped as "
        f"{{{' | '.join(repr(k) for k in STATE_DICT_WRAPPERS)}: state_dict}}"
    )


def params_from_state_dict(
    state_dict: Mapping[str, Any], source: str = "state dict"
) -> tuple[dict, GeneratorConfig]:
    """Convert a reference ``ProgressiveGenerator`` state dict to ``(params, config)``.

    Accepts ``layerK.*`` / ``output_RxR.*`` names or the older ``features.N.*`` / ``output.*``,
    wrapped or prefixed as training code saves them (see :func:`unwrap_state_dict`); tensors are
    numpy arrays in PyTorch layout. Sizes are inferred from the conv weights as the reference's
    ``sizes_from_state_dict`` does.

    Raises:
      ValueError naming ``source`` and the key (and both shapes) for a missing, mis-shaped or
      unexpected tensor, or listing the top-level keys when no generator state dict is found.
    """
    state_dict = unwrap_state_dict(state_dict, source)
    if "features.0.conv.weight" in state_dict:
        state_dict = _rename_old_state_dict(state_dict)
    config = GeneratorConfig(sizes=_sizes_from_state_dict(state_dict, source))
    expected = _expected_state_shapes(config)
    for key, shape in expected.items():
        if key not in state_dict:
            raise ValueError(f"{source}: missing tensor {key!r} (expected shape {shape})")
        actual = tuple(np.shape(state_dict[key]))
        if actual != shape:
            raise ValueError(
                f"{source}: tensor {key!r} has shape {actual}, but the architecture inferred from "
                f"the conv weights (sizes {list(config.sizes)}) needs {shape}"
            )
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise ValueError(
            f"{source}: unexpected tensors {unexpected[:8]} for a generator with layers "
            f"{', '.join(config.layer_names)}"
        )
    params = {}
    for spec in config.layers:
        weight = np.asarray(state_dict[f"{spec.name}.conv.weight"], dtype=np.float32)
        params[spec.name] = {
            "kernel": np.ascontiguousarray(weight.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
            "bias": np.asarray(state_dict[f"{spec.name}.wscale.b"], dtype=np.float32),
        }
    return params, config


def state_dict_from_params(params: Mapping, config: GeneratorConfig) -> dict[str, np.ndarray]:
    """Inverse of :func:`params_from_state_dict`: reference names, OIHW float32 numpy arrays."""
    params = check_params(params, config)
    state = {}
    for spec in config.layers:
        kernel = np.asarray(params[spec.name]["kernel"], dtype=np.float32)
        state[f"{spec.name}.conv.weight"] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
        state[f"{spec.name}.wscale.b"] = np.asarray(params[spec.name]["bias"], dtype=np.float32)
    return state


def generator_from_state_dict(
    state_dict: Mapping[str, Any], source: str = "state dict"
) -> ProgressiveGenerator:
    """A :class:`ProgressiveGenerator` from a reference state dict (see :func:`params_from_state_dict`)."""
    params, config = params_from_state_dict(state_dict, source)
    return ProgressiveGenerator(params, config)
