"""Safe loading: state_dicts load, pickles that would run code are refused."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

from attnzoo.io import UnsafeCheckpointError, load_state_dict, load_weights


class Evil:
    """A pickle payload that would run a shell command (creating a file) if it were ever unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_state_dict_round_trip(tmp_path):
    lin = nn.Linear(3, 2)
    torch.save(lin.state_dict(), tmp_path / "w.pt")
    other = load_weights(nn.Linear(3, 2), tmp_path / "w.pt")
    assert torch.equal(other.weight, lin.weight)
    torch.save({"epoch": 3, "state_dict": lin.state_dict()}, tmp_path / "ckpt.pt")
    assert set(load_state_dict(tmp_path / "ckpt.pt")) == {"weight", "bias"}
    assert set(load_state_dict(tmp_path / "ckpt.pt", key="state_dict")) == {"weight", "bias"}
    with pytest.raises(ValueError, match="no entry 'model'"):
        load_state_dict(tmp_path / "ckpt.pt", key="model")


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"weight": Evil(marker)}, f)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_state_dict(path)
    assert not marker.exists()
    # The same payload in torch.save's zip format.
    torch.save({"weight": Evil(marker)}, tmp_path / "evil_zip.pt")
    with pytest.raises(UnsafeCheckpointError):
        load_weights(nn.Linear(1, 1), tmp_path / "evil_zip.pt")
    assert not marker.exists()
    # The check can fail: plain pickle does run the payload.
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_non_tensor_content_is_rejected(tmp_path):
    torch.save({"weight": [1, 2, 3]}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="state_dict of tensors"):
        load_state_dict(tmp_path / "odd.pt")


def test_empty_truncated_and_wrong_format_files_get_one_clear_error(tmp_path):
    lin = nn.Linear(3, 2)
    good = tmp_path / "w.pt"
    torch.save(lin.state_dict(), good)
    data = good.read_bytes()
    cases = {
        "empty.pt": (b"", "is empty"),
        "truncated.pt": (data[: len(data) // 2], "truncated or damaged"),
        "text.pt": (b"hello, not a checkpoint\n" * 10, "could not be read"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=message) as info:
            load_state_dict(path)
        assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="is a directory"):
        load_state_dict(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_state_dict(tmp_path / "missing.pt")


def test_a_pickle_named_safetensors_is_a_clear_error_and_never_runs(tmp_path):
    pytest.importorskip("safetensors")
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.safetensors"
    with open(path, "wb") as f:
        pickle.dump({"weight": Evil(marker)}, f)
    with pytest.raises(ValueError, match="not a valid .safetensors file") as info:
        load_state_dict(path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load_state_dict(empty)
