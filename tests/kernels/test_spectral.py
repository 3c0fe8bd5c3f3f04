"""GFNet's global filter by DFT matrix products and by FFT (`attnzoo.kernels.spectral`), against the
plain definition in float64: the 2-D DFT written as explicit complex exponentials."""

from __future__ import annotations

import math

import pytest
import torch
from tests.kernels.kernel_checks import (
    Holder,
    assert_flop_counter,
    assert_gradgradcheck,
    assert_matches,
    assert_torch_func,
)

from attnzoo.kernels import choose, spectral
from attnzoo.kernels.choose import prefer

D = torch.float64
SIZES = [(14, 14), (5, 7), (6, 8), (1, 1), (1, 2), (3, 1), (7, 13), (17, 16)]  # both rules' sides


def _inputs(height, width, batch=2, channels=3, dtype=D):
    gen = torch.Generator().manual_seed(height * 31 + width)
    x = torch.randn(batch, height, width, channels, generator=gen, dtype=dtype)
    weight = torch.randn(height, width // 2 + 1, channels, 2, generator=gen, dtype=dtype)
    return x, weight


def _dft(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=D)
    return torch.exp(-2j * math.pi * torch.outer(k, k) / n) / math.sqrt(n)  # (n, n) complex128, unitary


def reference(x, weight):
    """y = F^-1(K F(x)) with F the unitary 2-D DFT, K the Hermitian extension of the one-sided filter
    (irfft2's reading: the missing columns mirror, and the zero and Nyquist columns keep their real
    part only)."""
    height, width = x.shape[1:3]
    fh, fw = _dft(height), _dft(width)
    spec = torch.einsum("ip,bpqc,jq->bijc", fh, x.to(torch.complex128), fw)  # (B, H, W, C)
    half = torch.view_as_complex(weight)  # (H, w, C)
    full = torch.zeros(height, width, x.shape[-1], dtype=torch.complex128)
    freqs = half.shape[1]
    full[:, :freqs] = half
    mirror = (-torch.arange(height)) % height
    for col in range(freqs, width):  # K[i, W - j] = conj(K[-i, j])
        full[:, col] = half[mirror, width - col].conj()
    self_mirrored = [0] + ([width // 2] if width % 2 == 0 else [])
    for col in self_mirrored:  # a column that mirrors itself must be Hermitian in the rows
        full[:, col] = (half[:, col] + half[mirror, col].conj()) / 2
    out = torch.einsum("ip,bpqc,jq->bijc", fh.conj(), spec * full, fw.conj())
    return out.real


@pytest.mark.parametrize("kernel", ["dft", "fft"])
@pytest.mark.parametrize("size", SIZES)
def test_matches_the_definition_with_gradients(kernel, size):
    x, weight = _inputs(*size)
    with prefer("spectral", kernel):
        assert_matches(spectral.global_filter, reference, (x, weight), tol=1e-12)


@pytest.mark.parametrize("size", [(14, 14), (7, 9)])
def test_float32_products_stay_close(size):
    x, weight = _inputs(*size, channels=8)
    want = reference(x, weight)
    with prefer("spectral", "dft"):
        got = spectral.global_filter(x.float(), weight.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_static_rule_follows_the_side_and_the_override():
    small, big = _inputs(14, 14)[0], _inputs(32, 32)[0]
    w_small, w_big = _inputs(14, 14)[1], _inputs(32, 32)[1]
    assert spectral._choice(small, w_small) == "dft"  # calibration is off in the suite: the static rule
    assert spectral._choice(big, w_big) == "fft"
    with prefer("spectral", "fft"):
        assert spectral._choice(small, w_small) == "fft"


def test_products_ignore_autocast():
    # under bf16 autocast the products still run in float32, as the FFT does
    x, weight = (t.float() for t in _inputs(7, 6, channels=8))
    want = reference(x.double(), weight.double())
    for kernel in ("dft", "fft"):
        with prefer("spectral", kernel), torch.autocast("cpu", dtype=torch.bfloat16):
            got = spectral.global_filter(x, weight)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_named():
    x, weight = _inputs(5, 7)
    with pytest.raises(ValueError, match=r"weight of shape \(5, 4, 3, 2\)"):
        spectral.global_filter(x, weight[:, :3])
    with pytest.raises(ValueError, match=r"x of shape \(B, H, W, C\)"):
        spectral.global_filter(x[0], weight)
    with pytest.raises(TypeError, match="float32 or float64"):
        spectral.global_filter(x.float(), weight)


def test_fake_tensors_never_meet_the_cache():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, weight = _inputs(6, 5)
    with prefer("spectral", "dft"):
        spectral.global_filter(x, weight)  # fills the cache with real matrices
        with FakeTensorMode() as mode:
            out = spectral.global_filter(mode.from_tensor(x), mode.from_tensor(weight))
    assert out.shape == x.shape


def test_calibration_records_its_choice(monkeypatch):
    monkeypatch.setenv("ATTNZOO_KERNEL_CALIBRATE", "1")
    choose.clear()
    x, weight = _inputs(16, 16, batch=4, channels=64, dtype=torch.float32)
    try:
        out = spectral.global_filter(x.requires_grad_(), weight)
        assert [key[0] for key in choose.chosen()] == ["spectral"]
        assert out.grad_fn is not None and x.grad is None  # the caller's graph is untouched
    finally:
        choose.clear()


@pytest.mark.parametrize("kernel", ["dft", "fft"])
def test_double_backward(kernel):
    with prefer("spectral", kernel):
        assert_gradgradcheck(spectral.global_filter, _inputs(4, 5))


def test_flop_counter_counts_the_products():
    with prefer("spectral", "dft"):
        assert_flop_counter(spectral.global_filter, _inputs(6, 7))


@pytest.mark.parametrize("kernel", ["dft", "fft"])
def test_torch_func(kernel):
    with prefer("spectral", kernel):
        assert_torch_func(Holder(spectral.global_filter, _inputs(5, 6)))


def test_matrices_built_under_inference_mode_serve_training():
    spectral._matrices.clear()
    x, weight = _inputs(9, 10)
    with prefer("spectral", "dft"):
        with torch.inference_mode():
            spectral.global_filter(x, weight)
        leaf = x.clone().requires_grad_()
        spectral.global_filter(leaf, weight).sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
