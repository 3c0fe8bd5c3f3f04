"""The input-check helpers every module uses."""

from __future__ import annotations

import pytest
import torch

from attnzoo._checks import check_choice, check_divisible, check_int, check_mask, check_shape


def test_check_shape_returns_sizes_and_names_expected_and_given():
    dims = check_shape(torch.zeros(2, 8, 5, 6), "Mod", "B C H W", C=8)
    assert dims == {"B": 2, "C": 8, "H": 5, "W": 6}
    with pytest.raises(
        ValueError, match=r"Mod expects x of shape \(B, 8, H, W\) with C=8, got \(2, 7, 5, 6\)"
    ):
        check_shape(torch.zeros(2, 7, 5, 6), "Mod", "B C H W", C=8)
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\) \(4-D\), got \(2, 8, 5\) \(3-D\)"):
        check_shape(torch.zeros(2, 8, 5), "Mod", "B C H W", C=8)
    with pytest.raises(ValueError, match="non-empty"):
        check_shape(torch.zeros(0, 8, 5, 6), "Mod", "B C H W", C=8)
    with pytest.raises(TypeError, match="floating-point dtype, got torch.int64"):
        check_shape(torch.zeros(2, 8, 5, 6, dtype=torch.int64), "Mod", "B C H W")
    with pytest.raises(TypeError, match="floating-point dtype, got torch.complex64"):
        check_shape(torch.zeros(2, 8, 5, 6, dtype=torch.complex64), "Mod", "B C H W")
    with pytest.raises(TypeError, match="torch.Tensor, got list"):
        check_shape([1, 2], "Mod", "B C")


def test_check_shape_repeated_letters_must_agree():
    check_shape(torch.zeros(2, 4, 4), "Mod", "B N N")
    with pytest.raises(ValueError, match="N=4"):
        check_shape(torch.zeros(2, 4, 5), "Mod", "B N N")


def test_argument_checks():
    assert check_int(3, "heads", "Mod") == 3
    with pytest.raises(TypeError, match="heads must be an int, got float"):
        check_int(3.0, "heads", "Mod")
    with pytest.raises(TypeError, match="must be an int, got bool"):
        check_int(True, "heads", "Mod")
    with pytest.raises(ValueError, match="heads must be >= 1, got 0"):
        check_int(0, "heads", "Mod")
    with pytest.raises(ValueError, match="mode must be one of"):
        check_choice("x", ("a", "b"), "mode", "Mod")
    with pytest.raises(ValueError, match="dim=10 must be divisible by num_heads=3"):
        check_divisible(10, 3, "dim", "num_heads", "Mod")


def test_check_mask_broadcasting():
    check_mask(torch.ones(5, 7, dtype=torch.bool), (2, 3, 5, 7), "Mod")
    check_mask(torch.ones(2, 1, 1, 7), (2, 3, 5, 7), "Mod")
    with pytest.raises(ValueError, match=r"broadcastable to \(2, 3, 5, 7\), got \(3, 7\)"):
        check_mask(torch.ones(3, 7), (2, 3, 5, 7), "Mod")
    with pytest.raises(ValueError, match="broadcastable"):
        check_mask(torch.ones(1, 2, 3, 5, 7), (2, 3, 5, 7), "Mod")
