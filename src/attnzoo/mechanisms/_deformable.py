"""Helpers of deformable attention (`attnzoo.mechanisms.deformable`): the channel LayerNorm of the
offset network, the normalised sampling grids, the relative position bias read from a table at
continuous displacements, and the attention rows spread back onto the input map for `capture_maps`.

Coordinates are grid_sample's with `align_corners=True`: $-1$ and $+1$ are the centres of the first and
last pixel, and points are stored as `(x, y)` (grid_sample's order).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.kernels.route import forward_ad_active

__all__ = ["ChannelLayerNorm", "bilinear_sample", "line", "grid_points", "sample_bias", "spread_rows"]


def bilinear_sample(x: Tensor, grid: Tensor) -> Tensor:
    """`F.grid_sample(x, grid, "bilinear", "zeros", align_corners=True)`: `x` `(N, C, H, W)` read at
    `grid` `(N, Ho, Wo, 2)` (`(x, y)` in $[-1, 1]$) gives `(N, C, Ho, Wo)`.

    Under forward-mode AD (`torch.func.jvp`, dual tensors) the four corners are gathered with plain
    ops, since torch's grid sampler has no forward derivative; otherwise torch's kernel runs.
    """
    if not forward_ad_active():
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    n, c, height, width = x.shape
    ho, wo = grid.shape[1:3]
    px = (grid[..., 0] + 1) * (0.5 * (width - 1))  # (N, Ho, Wo), pixel coordinates
    py = (grid[..., 1] + 1) * (0.5 * (height - 1))
    x0, y0 = px.detach().floor(), py.detach().floor()
    fx, fy = px - x0, py - y0  # fractions in [0, 1): linear in the grid, so on a pixel centre the
    # derivative is the right-hand slope, as grid_sample's (|px - cx| would have none there)
    flat = x.reshape(n, c, height * width)
    out = x.new_zeros(())
    corners = ((x0, y0, 1 - fx, 1 - fy), (x0 + 1, y0, fx, 1 - fy), (x0, y0 + 1, 1 - fx, fy),
               (x0 + 1, y0 + 1, fx, fy))
    for cx, cy, wx, wy in corners:
        weight = wx * wy  # (N, Ho, Wo), the bilinear weight
        inside = (cx >= 0) & (cx <= width - 1) & (cy >= 0) & (cy <= height - 1)  # zeros outside
        index = (cy.clamp(0, height - 1) * width + cx.clamp(0, width - 1)).long().reshape(n, 1, ho * wo)
        corner = flat.gather(2, index.expand(n, c, ho * wo)).reshape(n, c, ho, wo)
        out = out + corner * (weight * inside)[:, None]
    return out


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of a map `(B, C, H, W)` (DAT's `LayerNormProxy`; key `norm`)."""

    def __init__(self, channels: int, factory: dict[str, Any]) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, **factory)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(x.permute(0, 2, 3, 1))  # (B, H, W, C)
        return y.permute(0, 3, 1, 2)  # (B, C, H, W)


def line(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """`n` evenly spaced coordinates from -1 to +1 (the pixel centres); 0 for one point."""
    if n == 1:
        return torch.zeros(1, dtype=dtype, device=device)
    return torch.linspace(-1.0, 1.0, n, dtype=dtype, device=device)


def grid_points(ys: Tensor, xs: Tensor) -> Tensor:
    """Points `(len(ys), len(xs), 2)` as `(x, y)`, row-major."""
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")  # (len(ys), len(xs)) each
    return torch.stack((gx, gy), dim=-1)


def sample_bias(table: Tensor, queries: Tensor, pos: Tensor, batch: int, groups: int) -> Tensor:
    """Relative position bias at continuous displacements (DAT's $\\phi(\\hat B; R)$).

    The table `(h, 2H - 1, 2W - 1)` spans displacements of $-(H-1) \\dots H-1$ pixels; query minus key
    positions (normalised, in $[-2, 2]$) are halved to $[-1, 1]$ and the table is read bilinearly there.

    Args:
        table: `(h, Th, Tw)`, heads ordered group-major.
        queries: `(N, 2)` query points.
        pos: `(B*g, Ns, 2)` key points.
        batch: B.
        groups: g.

    Returns:
        `(B, h, N, Ns)`.
    """
    heads, th, tw = table.shape
    n, ns = queries.shape[0], pos.shape[1]
    disp = (queries[None, :, None, :] - pos[:, None, :, :]) * 0.5  # (B*g, N, Ns, 2)
    per_group = table.reshape(1, groups, heads // groups, th, tw).expand(batch, -1, -1, -1, -1)
    per_group = per_group.reshape(batch * groups, heads // groups, th, tw)  # (B*g, h/g, Th, Tw)
    bias = bilinear_sample(per_group, disp.to(table.dtype))
    return bias.reshape(batch, heads, n, ns)  # (B*g, h/g, N, Ns) -> (B, h, N, Ns)


def spread_rows(weights: Tensor, pos: Tensor, size: tuple[int, int], groups: int) -> Tensor:
    """Attention rows over the sampled keys -> rows over the input map's pixels.

    Each key is a bilinear mix of up to four pixels; its weight is shared among them in the same
    proportions (points outside the map drop their outside share, as zero padding does).

    Args:
        weights: `(B, h, Q, Ns)`.
        pos: `(B*g, Ns, 2)` key points.
        size: `(H, W)` of the input.
        groups: g.

    Returns:
        `(B, h, Q, H*W)`.
    """
    height, width = size
    b, heads, q, ns = weights.shape
    px = (pos[..., 0] + 1) * 0.5 * (width - 1)  # (B*g, Ns) pixel columns
    py = (pos[..., 1] + 1) * 0.5 * (height - 1)  # (B*g, Ns) pixel rows
    x0, y0 = px.floor(), py.floor()
    targets, shares = [], []
    for cy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for cx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            inside = (cx >= 0) & (cx <= width - 1) & (cy >= 0) & (cy <= height - 1)
            shares.append(wx * wy * inside)
            targets.append((cy.clamp(0, height - 1) * width + cx.clamp(0, width - 1)).long())
    share = torch.stack(shares, -1).reshape(b, groups, 1, 1, ns * 4)  # (B, g, 1, 1, 4 Ns)
    target = torch.stack(targets, -1).reshape(b, groups, 1, 1, ns * 4)  # (B, g, 1, 1, 4 Ns)
    w = weights.reshape(b, groups, heads // groups, q, ns, 1)  # (B, g, h/g, Q, Ns, 1)
    parts = (w * share.reshape(b, groups, 1, 1, ns, 4).to(w.dtype)).reshape(b, groups, heads // groups, q, -1)
    rows = weights.new_zeros(b, groups, heads // groups, q, height * width)
    rows.scatter_add_(-1, target.expand_as(parts), parts)
    return rows.reshape(b, heads, q, height * width)  # (B, g, h/g, Q, HW) -> (B, h, Q, HW)
