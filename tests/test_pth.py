"""The torch-free .pth reader against files written by real PyTorch, and the legacy writer."""

import collections
import os
import pickle

import numpy as np
import pytest

from gandissect_jax.pth import PthError, read_pth, read_state_dict, write_legacy_pth

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "pth")


@pytest.mark.parametrize("name", ["torch_zip.pth", "torch_legacy.pth"])
def test_reads_files_written_by_torch(name):
    expected = np.load(os.path.join(FIXTURES, "expected.npz"))
    raw = read_pth(os.path.join(FIXTURES, name))
    assert raw["epoch"] == 3
    state = read_state_dict(os.path.join(FIXTURES, name))
    assert list(state) == list(expected.files)
    for key in expected.files:
        assert state[key].dtype == expected[key].dtype, key
        assert state[key].shape == expected[key].shape, key
        np.testing.assert_array_equal(state[key], expected[key], err_msg=key)
    # views share storage in the file but come back as independent arrays
    np.testing.assert_array_equal(state["transposed"], np.arange(24.0).reshape(4, 6).T)
    np.testing.assert_array_equal(state["sliced"], np.arange(24.0).reshape(4, 6)[1:3, 2:])


def test_legacy_writer_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    state = collections.OrderedDict(
        [
            ("w", rng.standard_normal((3, 2, 3, 3)).astype(np.float32)),
            ("t", np.arange(6.0).reshape(2, 3).T),  # non-contiguous input
            ("n", np.array(5, dtype=np.int64)),
            ("m", np.array([True, False])),
        ]
    )
    path = tmp_path / "out.pth"
    write_legacy_pth(path, state)
    back = read_state_dict(path)
    assert list(back) == list(state)
    for key in state:
        assert back[key].dtype == state[key].dtype
        np.testing.assert_array_equal(back[key], state[key])
    # the header records are those of PyTorch 0.4's torch.save
    with open(path, "rb") as f:
        assert pickle.load(f) == 0x1950A86A20F9469CFC6C
        assert pickle.load(f) == 1001
        assert pickle.load(f)["little_endian"] is True


def test_refuses_arbitrary_globals(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        for record in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(record, f, protocol=2)
        pickle.dump({"x": Evil()}, f, protocol=2)
    with pytest.raises(PthError, match="refusing to unpickle global"):
        read_pth(path)
    assert not (tmp_path / "pwned").exists()


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello, not a checkpoint\n")
    with pytest.raises(PthError, match="not a PyTorch checkpoint"):
        read_pth(path)
    with pytest.raises(FileNotFoundError):
        read_pth(tmp_path / "missing.pth")


def test_truncated_file(tmp_path):
    path = tmp_path / "full.pth"
    write_legacy_pth(path, {"w": np.ones((100,), np.float32)})
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[:-40])
    with pytest.raises(PthError, match="storage '0'"):
        read_pth(cut)


def test_state_dict_must_hold_tensors(tmp_path):
    path = tmp_path / "list.pth"
    with open(path, "wb") as f:
        for record in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, [1, 2], []):
            pickle.dump(record, f, protocol=2)
    assert read_pth(path) == [1, 2]
    with pytest.raises(PthError, match="not a state dict"):
        read_state_dict(path)
