"""GFNet's global filter, ``irfft2(K * rfft2(x))`` over (H, W), by FFT or by small matrix products.

The orthonormal 2-D real transform of a channels-last map is linear along each axis, so besides
``torch.fft`` it can run as four real matrix products with the DFT matrices:

1. along W, ``(2 w, W) @ (B, H, W, C)``: the one-sided spectrum's real rows, then its imaginary rows
   (``w = W // 2 + 1``);
2. along H, one real ``(2 H, 2 H)`` matrix on the (row, real/imaginary) pairs: the complex DFT
   ``[[cos, -sin], [sin, cos]]``;
3. the filter, a complex product per (row, frequency, channel) written in real arithmetic;
4. the inverse along H (the conjugate matrix), then along W (``irfft``'s Hermitian weights: 1 for
   the zero and Nyquist columns, 2 for the others, which is also what makes ``irfft`` ignore the
   imaginary part of those two columns).

Both candidates are composite PyTorch ops, so double backward, ``FlopCounterMode``, ``torch.func``
and ``torch.compile`` see ordinary ops either way. The products cost O(N (H + W)) against the FFT's
O(N log N), but they run on the GEMM units in a few large calls where the FFT makes strided passes:
on the maps GFNet uses late (7 x 7, 14 x 14) they are the faster kernel, at 56 x 56 the FFT is
(`benchmarks/RESULTS.md`). Site ``"spectral"`` of `attnzoo.kernels.choose` decides per shape class;
the static rule takes the products up to `DFT_MAX_SIDE` a side on the CPU (on other devices the
float32 products may run in TF32, so the FFT), and they run with autocast off, in ``x``'s dtype.

Shape letters: B batch, H, W the map, C channels, w = W // 2 + 1 frequencies.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnzoo._checks import autocast_on, check_shape
from attnzoo.kernels import choose
from attnzoo.kernels.route import composite_required

__all__ = ["DFT_MAX_SIDE", "dft_matrices", "global_filter"]

# The static rule's largest side for the matrix products: of the FFT's time, 7 x 7 ran 0.45-0.77,
# 14 x 14 0.68-0.87, 16 x 16 up to 1.2 (a power of two, the FFT's best case), 28 x 28 1.0-1.1 and
# 56 x 56 1.5, on the AVX-512 and AVX2 kinds (benchmarks/RESULTS.md).
DFT_MAX_SIDE = 14

_matrices: dict[tuple[int, int, torch.dtype, torch.device], tuple[Tensor, ...]] = {}


def dft_matrices(height: int, width: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    """The four real matrices of the orthonormal 2-D real DFT of an `height x width` map.

    Returns:
        ``(forward_h, inverse_h, forward_w, inverse_w)``: `(2H, 2H)`, `(2H, 2H)` on (row,
        real/imaginary) pairs, `(2w, W)` and `(W, 2w)`, built in float64 and cast to ``dtype``.
        Cached per (size, dtype, device) in eager mode.
    """
    if composite_required(dispatch=True):  # tracing, fake tensors: fresh matrices, never the cache's
        return _build(height, width, dtype, device)
    key = (height, width, dtype, torch.device(device))
    found = _matrices.get(key)
    if found is None:
        with torch.inference_mode(False):  # an inference tensor could not be saved for a later backward
            found = _matrices[key] = _build(height, width, dtype, device)
    return found


def _build(height: int, width: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    f64 = torch.float64
    rows = torch.arange(height, dtype=f64)
    angle = -2 * math.pi * torch.outer(rows, rows) / height
    cos, sin = torch.cos(angle) / math.sqrt(height), torch.sin(angle) / math.sqrt(height)
    forward_h = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1)  # (H, 2, H, 2)
    inverse_h = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], 1)  # conjugate
    freqs = width // 2 + 1
    columns = torch.arange(width, dtype=f64)
    angle_w = -2 * math.pi * torch.outer(columns[:freqs], columns) / width
    forward_w = torch.cat([torch.cos(angle_w), torch.sin(angle_w)]) / math.sqrt(width)  # (2w, W)
    hermitian = torch.full((freqs, 1), 2.0, dtype=f64)  # an inner frequency is itself and its mirror
    hermitian[0] = 1.0
    if width % 2 == 0:
        hermitian[-1] = 1.0  # the Nyquist column has no mirror
    inverse_w = (forward_w * torch.cat([hermitian, hermitian])).T  # (W, 2w)
    mats = (forward_h.reshape(2 * height, 2 * height), inverse_h.reshape(2 * height, 2 * height),
            forward_w, inverse_w.contiguous())
    return tuple(m.to(device=device, dtype=dtype) for m in mats)


def global_filter(x: Tensor, weight: Tensor) -> Tensor:
    """``irfft2(view_as_complex(weight) * rfft2(x))`` over (H, W), both orthonormal.

    Args:
        x: Map `(B, H, W, C)`, float32 or float64 (the caller casts half precision up).
        weight: Filter `(H, w, C, 2)`, real and imaginary parts, in ``x``'s dtype.

    Returns:
        `(B, H, W, C)` in ``x``'s dtype.

    Raises:
        ValueError: For shapes that do not fit (``w != W // 2 + 1``, other H or C).
        TypeError: For dtypes other than float32/float64, or different ones.
    """
    dims = check_shape(x, "global_filter", "B H W C", "x")
    freqs = dims["W"] // 2 + 1
    check_shape(weight, "global_filter", "H w C two", "weight", H=dims["H"], w=freqs, C=dims["C"], two=2)
    if x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype:
        raise TypeError(f"global_filter expects float32 or float64 x and weight of one dtype, got "
                        f"{x.dtype} and {weight.dtype}")
    kernel = _choice(x, weight)
    return _dft_filter(x, weight) if kernel == "dft" else _fft_filter(x, weight)


def _fft_filter(x: Tensor, weight: Tensor) -> Tensor:
    height, width = x.shape[1:3]
    spectrum = torch.fft.rfft2(x, dim=(1, 2), norm="ortho")  # (B, H, w, C)
    filtered = spectrum * torch.view_as_complex(weight.contiguous())
    return torch.fft.irfft2(filtered, s=(height, width), dim=(1, 2), norm="ortho")


def _dft_filter(x: Tensor, weight: Tensor) -> Tensor:
    if autocast_on(x.device.type):  # the products run in x's dtype, like the FFT, never in half precision
        with torch.autocast(x.device.type, enabled=False):
            return _dft_products(x, weight)
    return _dft_products(x, weight)


def _dft_products(x: Tensor, weight: Tensor) -> Tensor:
    batch, height, width, channels = x.shape
    freqs = width // 2 + 1
    forward_h, inverse_h, forward_w, inverse_w = dft_matrices(height, width, x.dtype, x.device)
    rows = torch.matmul(forward_w, x)  # (B, H, 2w, C): real rows, then imaginary rows
    spec = torch.matmul(forward_h, rows.view(batch, 2 * height, freqs * channels))  # (B, 2H, w C)
    spec = spec.view(batch, height, 2, freqs, channels)
    real, imag = spec.unbind(2)  # (B, H, w, C) each
    w_real, w_imag = weight.unbind(-1)  # (H, w, C) each
    # the complex product; autograd saves views of `spec` only
    filtered = torch.stack([real * w_real - imag * w_imag, real * w_imag + imag * w_real], 2)
    back = torch.matmul(inverse_h, filtered.view(batch, 2 * height, freqs * channels))  # (B, 2H, w C)
    return torch.matmul(inverse_w, back.view(batch, height, 2 * freqs, channels))  # (B, H, W, C)


def _choice(x: Tensor, weight: Tensor) -> str:
    """``"dft"`` or ``"fft"`` (site ``"spectral"`` of `attnzoo.kernels.choose`)."""
    batch, height, width, channels = x.shape
    # elsewhere than on the CPU, float32 products may run in TF32 or lower (the FFT does not)
    exact_products = x.device.type == "cpu" or x.dtype == torch.float64
    static = "dft" if max(height, width) <= DFT_MAX_SIDE and exact_products else "fft"
    train = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    needs = [x.requires_grad, weight.requires_grad] if train else False
    key = (choose.bucket(batch), height, width, choose.bucket(channels), x.dtype, train)
    candidates = {
        "dft": choose.workload(_dft_filter, (x, weight), needs),
        "fft": choose.workload(_fft_filter, (x, weight), needs),
    }
    return choose.choose("spectral", key, candidates, static=static, elements=x.numel(), device=x.device)
