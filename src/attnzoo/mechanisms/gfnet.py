"""Global filter layer, "Global Filter Networks for Image Classification" (Rao et al., 2021),
arXiv:2107.00645.

The map is taken to the frequency domain (2-D real FFT over H and W), multiplied element-wise by a
learned complex filter per channel, and brought back: a depth-wise circular convolution with a
kernel as large as the map. Time $O(B C N \\log N)$, memory $O(B N C)$, N = H W; no map between
positions is built. On small maps the transforms run as real DFT matrix products instead,
$O(B C N (H + W))$, which beat the FFT there (`attnzoo.kernels.spectral`, chosen per shape class).
The filter has one entry per frequency, so it fixes the input size: H, and W // 2 + 1 (W itself up
to one: both 2 (w - 1) and 2 w - 1 columns have w frequencies).

Deviations: the input is channels-last `(B, H, W, C)` (GFNet's and fightingcv's `GlobalFilter` take
`(B, N, C)` tokens and guess a square map when no `spatial_size` is given); the transform runs in the
input's dtype (float32 for float16/bfloat16, which the FFT lacks) and the output keeps the input's
dtype, while GFNet's code casts to float32 and returns float32 for every input (float64 included).

Shape letters: B batch, H, W height and width, C channels (`dim`), N = H W, w = W // 2 + 1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo._checks import check_int, check_shape
from attnzoo._geometry import grid2d, int_pair
from attnzoo._registry import Example, register
from attnzoo.kernels.spectral import global_filter
from attnzoo.maps.capture import capturing, query_indices, record

__all__ = ["GlobalFilter"]


@register(
    "gfnet",
    family="gfnet",
    paper="Global Filter Networks for Image Classification",
    year=2021,
    layout="NHWC",
    example=Example(kwargs={"dim": 8, "feat_size": (5, 7)}, inputs=((2, 5, 7, 8),), output=(2, 5, 7, 8),
                    channel_dim=-1, free_sizes=()),
    aliases=("global_filter",),
    for_input=lambda geo: {"feat_size": grid2d(geo)},
)
class GlobalFilter(nn.Module):
    r"""Global filter (GFNet): a learned per-channel filter applied in the 2-D Fourier domain.

    $$
    y = \mathcal{F}^{-1}\big(K \odot \mathcal{F}(x)\big) = x \circledast k
    $$

    with $\mathcal{F}$ the orthonormal 2-D real FFT over (H, W), $K \in \mathbb{C}^{H \times w \times C}$
    the learned filter (w = W // 2 + 1) and, equivalently, $k$ a depth-wise circular convolution kernel
    of size H x W. Time $O(B C N \log N)$, memory $O(B N C)$ with N = H W.

    Args:
        dim: Channels C of the input (last axis).
        feat_size: Input size `(H, W)` (or one int for both) the filter is built for. Default: 14.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters (real; the filter is stored as real and imaginary parts).
            Default: None.

    Shape:
        - x: `(B, H, W', C)` with H, W' from `feat_size` (W' may also be W - 1 or W + 1 when it has the
          same W' // 2 + 1 frequencies).
        - Output: `(B, H, W', C)`; with `need_weights=True` also the equivalent circular convolution
          kernel `(H, W', C)`: `out[b, i, j, c] = sum_{p, q} x[b, p, q, c] k[(i - p) % H, (j - q) % W', c]`.

    Example:
        ```python
        >>> gf = GlobalFilter(64, feat_size=(14, 14))
        >>> x = torch.randn(2, 14, 14, 64)
        >>> out, kernel = gf(x, need_weights=True)
        >>> out.shape, kernel.shape
        (torch.Size([2, 14, 14, 64]), torch.Size([14, 14, 64]))

        ```
    """

    def __init__(
        self,
        dim: int,
        feat_size: int | tuple[int, int] = 14,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.dim = check_int(dim, "dim", who)
        self.feat_size = int_pair(feat_size, "feat_size", who)
        height, width = self.feat_size
        weight = torch.randn(height, width // 2 + 1, dim, 2, device=device, dtype=dtype) * 0.02  # GFNet's
        self.complex_weight = nn.Parameter(weight)  # (H, w, C, 2): real and imaginary parts

    def reset_parameters(self) -> None:
        """GFNet's initialisation: normal with std 0.02 (both the real and the imaginary parts)."""
        nn.init.normal_(self.complex_weight, std=0.02)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, feat_size={self.feat_size}"

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Filter every channel in the frequency domain; `(out, kernel)` with `need_weights`.

        Args:
            x: Feature map `(B, H, W, C)`.
            need_weights: Also return the `(H, W, C)` circular convolution kernel. Default: False.
        """
        who = type(self).__name__
        height, freqs = self.complex_weight.shape[:2]
        dims = check_shape(x, who, "B H W C", H=height, C=self.dim)
        width = dims["W"]
        if width // 2 + 1 != freqs:
            raise ValueError(
                f"{who} (feat_size={self.feat_size}) expects x of shape (B, {height}, W, {self.dim}) with "
                f"W // 2 + 1 == {freqs} (W = {2 * freqs - 2} or {2 * freqs - 1}), got W={width}"
            )
        compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        out = global_filter(x.to(compute), self.complex_weight.to(compute)).to(x.dtype)  # (B, H, W, C)
        if not need_weights and not capturing():
            return out
        weight = torch.view_as_complex(self.complex_weight.to(compute).contiguous())  # (H, w, C)
        # ortho forward and inverse: y = F^-1(F(x) K) (F unnormalised, F^-1 with 1/N), so y = x (*) F^-1(K)
        kernel = torch.fft.irfft2(weight, s=(height, width), dim=(0, 1), norm="backward")  # (H, W, C)
        if capturing():
            self._record(kernel.detach(), dims["B"], (height, width))
        return (out, kernel.to(x.dtype)) if need_weights else out

    def _record(self, kernel: Tensor, batch: int, size: tuple[int, int]) -> None:
        """Rows of the capture's queries: how strongly each position feeds the query's output, the
        circular kernel's magnitude at their offset, averaged over channels (no softmax)."""
        height, width = size
        idx = query_indices(size, kernel.device)
        dy = (idx[:, None] // width - torch.arange(height, device=kernel.device)) % height  # (Q, H)
        dx = (idx[:, None] % width - torch.arange(width, device=kernel.device)) % width  # (Q, W)
        rows = kernel.abs().mean(-1)[dy[:, :, None], dx[:, None, :]]  # (Q, H, W)
        record(self, "rows", rows.flatten(1).expand(batch, 1, -1, -1), grid=size, queries=idx,
               query_grid=size,
               note="no attention: |global filter| (circular convolution) at each offset, mean over channels")
