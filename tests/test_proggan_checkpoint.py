"""Converting reference .pth files to orbax checkpoints, loading them, and doing so without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import gandissect_jax as gj
from gandissect_jax.checkpoints import is_checkpoint
from gandissect_jax.proggan import GeneratorConfig, convert_reference
from gandissect_jax.pth import PthError, read_pth, write_legacy_pth

FIXTURES = Path(__file__).parent / "fixtures" / "proggan"
PTH = FIXTURES / "proggan32.pth"


@pytest.fixture(scope="module")
def golden():
    return np.load(FIXTURES / "proggan32_outputs_subset.npz")


def reference_image(golden):
    return np.transpose(golden["output_32x32"], (0, 2, 3, 1))


def test_convert_then_load_checkpoint(tmp_path, golden):
    dest = convert_reference(PTH, tmp_path / "g32")
    assert is_checkpoint(dest)
    config = json.loads((Path(dest) / "config.json").read_text())
    assert config["sizes"] == [128, 128, 128, 64, 32] and config["kind"] == "generator"
    G = gj.load_generator(dest)
    assert GeneratorConfig.from_dict(config) == G.config
    from_pth = gj.load_generator(PTH)
    for layer in G.layer_names:
        for name in ("kernel", "bias"):
            np.testing.assert_array_equal(
                np.asarray(G.params[layer][name]), np.asarray(from_pth.params[layer][name])
            )
    x = np.asarray(G(golden["z"]))
    ref = reference_image(golden)
    assert np.abs(x - ref).max() <= 1e-4 * np.abs(ref).max()


def test_convert_accepts_directory_with_one_pth(tmp_path):
    src = tmp_path / "download"
    src.mkdir()
    (src / "g.pth").write_bytes(PTH.read_bytes())
    (src / "fetch-record.json").write_text("{}")
    dest = convert_reference(src, tmp_path / "out")
    assert gj.load_generator(dest).config.sizes == (128, 128, 128, 64, 32)


def test_save_generator_round_trip_of_trained_params(tmp_path):
    import jax

    config = GeneratorConfig.from_channels(z_dim=32, channels=(64, 32, 16))
    G = gj.ProgressiveGenerator(gj.init_params(jax.random.key(1), config), config)
    path = gj.save_generator(G, tmp_path / "trained")
    G2 = gj.load_generator(path)
    assert G2.config == config
    z = gj.sample_z(2, 32, seed=5)
    np.testing.assert_array_equal(np.asarray(G2(z)), np.asarray(G(z)))


def test_failed_conversion_writes_nothing(tmp_path):
    bad = tmp_path / "bad.pth"
    state = read_pth(PTH)
    state["layer4.conv.weight"] = state["layer4.conv.weight"][:, :64]
    write_legacy_pth(bad, state)
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    with pytest.raises(ValueError, match="layer4.conv.weight"):
        convert_reference(bad, out_parent / "g")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x80\x02garbage" * 10)
    with pytest.raises(PthError):
        convert_reference(garbage, out_parent / "g")
    assert os.listdir(out_parent) == []

    # an existing checkpoint survives a failed re-conversion untouched
    good = convert_reference(PTH, out_parent / "g")
    before = sorted(p.name for p in Path(good).rglob("*"))
    with pytest.raises(ValueError):
        convert_reference(bad, good)
    assert sorted(p.name for p in Path(good).rglob("*")) == before
    assert os.listdir(out_parent) == ["g"]


def test_corrupt_checkpoint_dir_is_a_clear_error(tmp_path):
    dest = Path(convert_reference(PTH, tmp_path / "g"))
    (dest / "config.json").write_text(json.dumps({"kind": "segmenter", "sizes": [1]}))
    with pytest.raises(ValueError, match="not a generator"):
        gj.load_generator(dest)


TORCH_FREE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"torch is blocked in this test ({name})")
            return None

    sys.meta_path.insert(0, BlockTorch())
    try:
        import torch  # noqa: F401
        raise SystemExit("the torch blocker did not work")
    except ImportError:
        pass

    import numpy as np
    import gandissect_jax as gj
    from gandissect_jax.proggan import convert_reference

    pth, dest, z_file, out_file = sys.argv[1:5]
    convert_reference(pth, dest)
    G = gj.load_generator(dest)
    h, f = G.split("layer4")
    x = f(G.params, *h(G.params, np.load(z_file)))
    np.save(out_file, np.asarray(x))
    loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    print("TORCH_MODULES", loaded)
    """
)


def test_torch_free_convert_load_and_generate(tmp_path, golden):
    script = tmp_path / "torch_free.py"
    script.write_text(TORCH_FREE_SCRIPT)
    np.save(tmp_path / "z.npy", golden["z"])
    result = subprocess.run(
        [sys.executable, str(script), str(PTH), str(tmp_path / "ckpt"), str(tmp_path / "z.npy"),
         str(tmp_path / "x.npy")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TORCH_MODULES []" in result.stdout
    x = np.load(tmp_path / "x.npy")
    ref = reference_image(golden)
    assert np.abs(x - ref).max() <= 1e-4 * np.abs(ref).max()


# --------------------------------------------------------------------------------------------
# Generator state dicts as training code saves them: prefixes and wrappers (issue 11 §4)


def _legacy_object_span(data: bytes) -> tuple[int, int]:
    """Byte range of the object pickle (the 4th) in a legacy .pth, without PROTO and STOP."""
    import io
    import pickle
    import pickletools

    stream = io.BytesIO(data)
    for _ in range(3):
        pickle.load(stream)
    start = stream.tell()
    stop = [pos for op, _, pos in pickletools.genops(stream) if op.name == "STOP"][0]
    return start + 2, stop  # skip PROTO 2


def write_wrapped_pth(path: Path, state_dict: dict, wrap) -> None:
    """Write ``wrap(STATE)`` as a legacy .pth, where STATE is ``state_dict``'s tensors.

    ``wrap`` builds nested dicts around the placeholder ``STATE`` (plus plain ints), the way
    ``torch.save({'G': G.state_dict(), 'epoch': 3})`` does; the file is assembled from the one
    ``write_legacy_pth`` writes, so its tensors and storages are exactly those of a real file.
    """
    import pickle
    import struct

    write_legacy_pth(path, state_dict)
    data = path.read_bytes()
    start, stop = _legacy_object_span(data)
    inner = data[start:stop]

    def encode(obj) -> bytes:
        if obj is STATE:
            return inner
        if isinstance(obj, int):
            return pickle.BININT + struct.pack("<i", obj)
        out = pickle.EMPTY_DICT
        for key, value in obj.items():
            raw = key.encode()
            out += pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw + encode(value) + pickle.SETITEM
        return out

    body = pickle.PROTO + bytes([2]) + encode(wrap(STATE)) + pickle.STOP
    path.write_bytes(data[: start - 2] + body + data[stop + 1:])


STATE = object()


@pytest.fixture(scope="module")
def small_state_dict():
    import jax

    from gandissect_jax.proggan import init_params, state_dict_from_params

    config = GeneratorConfig.from_channels(16, [16, 16, 8])
    return state_dict_from_params(init_params(jax.random.PRNGKey(0), config), config), config


def _prefixed(prefix):
    return lambda sd: {prefix + k: v for k, v in sd.items()}


TRAINING_LAYOUTS = {
    "dataparallel_module_prefix": (lambda S: S, _prefixed("module.")),
    "nested_dataparallel": (lambda S: S, _prefixed("module.module.")),
    "torch_compile_prefix": (lambda S: S, _prefixed("_orig_mod.")),
    "G": (lambda S: {"G": S, "epoch": 12}, None),
    "g_ema": (lambda S: {"g_ema": S}, None),
    "generator": (lambda S: {"generator": S, "iteration": 5000}, None),
    "state_dict": (lambda S: {"state_dict": S}, None),
    "state_dict_of_dataparallel": (lambda S: {"state_dict": S}, _prefixed("module.")),
    "G_of_dataparallel": (lambda S: {"G": S}, _prefixed("module.")),
    "state_dict_then_G": (lambda S: {"state_dict": {"G": S}}, None),
}


@pytest.mark.parametrize("layout", sorted(TRAINING_LAYOUTS))
def test_generator_checkpoints_as_training_code_saves_them_load(tmp_path, small_state_dict, layout):
    state, config = small_state_dict
    wrap, rename = TRAINING_LAYOUTS[layout]
    path = tmp_path / f"{layout}.pth"
    write_wrapped_pth(path, (rename or (lambda sd: sd))(state), wrap)
    G = gj.load_generator(path)
    assert G.config == config
    for key, value in state.items():
        layer, name = key.split(".", 1)
        expected = value.transpose(2, 3, 1, 0) if name == "conv.weight" else value
        np.testing.assert_array_equal(np.asarray(G.params[layer]["kernel" if name == "conv.weight" else "bias"]),
                                      expected)


def test_training_checkpoint_with_several_generators_gives_the_ema_one(tmp_path, small_state_dict):
    state, _ = small_state_dict
    from gandissect_jax.proggan import params_from_state_dict

    other = {k: v + 1 for k, v in state.items()}
    params, _ = params_from_state_dict({"G": other, "g_ema": state, "D": {"x": state["layer1.wscale.b"]}})
    np.testing.assert_array_equal(params["layer1"]["bias"], state["layer1.wscale.b"])


def test_convert_command_accepts_a_dataparallel_checkpoint(tmp_path, small_state_dict):
    from gandissect_jax.cli import main

    state, config = small_state_dict
    path = tmp_path / "dp.pth"
    write_wrapped_pth(path, _prefixed("module.")(state), lambda S: {"state_dict": S, "epoch": 3})
    assert main(["convert", str(path), str(tmp_path / "out")]) == 0
    assert gj.load_generator(tmp_path / "out").config == config


@pytest.mark.parametrize("wrap, keys", [
    (lambda S: {"D": S}, "'D'"),
    (lambda S: {"model": S, "epoch": 3}, "'model', 'epoch'"),
    (lambda S: {"G": {"net": S}}, "'G'"),
])
def test_unknown_wrappers_are_refused_naming_the_file_and_keys(tmp_path, small_state_dict, wrap, keys):
    state, _ = small_state_dict
    path = tmp_path / "odd.pth"
    write_wrapped_pth(path, state, wrap)
    with pytest.raises(ValueError) as err:
        gj.load_generator(path)
    message = str(err.value)
    assert str(path) in message and f"top-level keys: [{keys}" in message
    assert "'g_ema'" in message and "'module.'" in message  # says what would have been accepted


def test_partly_prefixed_state_dict_is_refused(small_state_dict):
    from gandissect_jax.proggan import params_from_state_dict

    state, _ = small_state_dict
    mixed = {("module." + k if i % 2 else k): v for i, (k, v) in enumerate(state.items())}
    with pytest.raises(ValueError, match="unexpected tensors|missing tensor"):
        params_from_state_dict(mixed, "mixed.pth")
