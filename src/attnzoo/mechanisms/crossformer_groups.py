"""CrossFormer's grouping of a map: short distance groups (adjacent G x G tokens) and long distance
groups (tokens I apart), their inverse, the relative offsets the dynamic position bias is evaluated at,
and map capture over the groups. Used by `attnzoo.mechanisms.crossformer`, which re-exports them.

Shape letters: B batch, Hp/Wp padded map size, C channels, (Gh, Gw) group, (Ih, Iw) interval,
N = Gh*Gw tokens per group, nG groups per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from attnzoo.maps.capture import _name, _session, query_indices, record

__all__ = ["group_partition", "group_reverse", "groups_to_image", "relative_offsets"]


def relative_offsets(group: tuple[int, int], device: torch.device | None, dtype: torch.dtype) -> Tensor:
    """Every offset `(dh, dw)` inside a `(Gh, Gw)` group, row-major (the official `biases`).

    Shape:
        - Output: `((2Gh-1)(2Gw-1), 2)`.
    """
    rows = torch.arange(1 - group[0], group[0], device=device, dtype=dtype)
    cols = torch.arange(1 - group[1], group[1], device=device, dtype=dtype)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)  # (T, 2)


def group_partition(x: Tensor, group: tuple[int, int], interval: tuple[int, int]) -> Tensor:
    """Cut a padded `(B, Hp, Wp, C)` map into groups: with interval 1 adjacent `Gh x Gw` tokens (SDA),
    else the tokens `I` apart inside each `Gh*Ih x Gw*Iw` region (LDA). Groups are image-major, then
    region row-major, then the offset inside the interval (the official order).

    Shape:
        - x: `(B, Hp, Wp, C)` with `Gh*Ih | Hp` and `Gw*Iw | Wp`.
        - Output: `(B * nG, Gh*Gw, C)`.
    """
    (gh, gw), (ih, iw) = group, interval
    b, hp, wp, c = x.shape
    x = x.reshape(b, hp // (gh * ih), gh, ih, wp // (gw * iw), gw, iw, c)  # (B, Rh, Gh, Ih, Rw, Gw, Iw, C)
    return x.permute(0, 1, 4, 3, 6, 2, 5, 7).reshape(-1, gh * gw, c)  # (B*Rh*Rw*Ih*Iw, Gh*Gw, C)


def group_reverse(
    groups: Tensor, group: tuple[int, int], interval: tuple[int, int], size: Sequence[int]
) -> Tensor:
    """Undo `group_partition`: `(B * nG, Gh*Gw, C)` back to the `(B, Hp, Wp, C)` map of `size = (Hp, Wp)`."""
    (gh, gw), (ih, iw), (hp, wp) = group, interval, size
    rh, rw, c = hp // (gh * ih), wp // (gw * iw), groups.shape[-1]
    x = groups.reshape(-1, rh, rw, ih, iw, gh, gw, c)  # (B, Rh, Rw, Ih, Iw, Gh, Gw, C)
    return x.permute(0, 1, 5, 3, 2, 6, 4, 7).reshape(-1, hp, wp, c)  # (B, Hp, Wp, C)


def groups_to_image(
    module: nn.Module, inner: nn.Module, size: tuple[int, int], padded: tuple[int, int], g: int,
    interval: tuple[int, int],
) -> None:
    """Replace the group rows `inner` just recorded (every query's row per group, `(B*nG, h, N, N)`)
    by rows over the `(H, W)` map for the capture's query points, `(B, h, Q, H*W)`, recorded for `module`;
    `padded` is the map size after padding, `g` the group side, `interval` as `group_partition`'s."""
    session = _session()
    records = None if session is None else session.maps.get(_name(session, inner))
    if session is None or not records or records[-1].kind != "rows":
        return
    weights = records.pop().data  # (B*nG, h, N, N)
    if not records:
        del session.maps[_name(session, inner)]
    (height, width), (hp, wp), n = size, padded, g * g
    place = torch.arange(hp * wp, device=weights.device).reshape(1, hp, wp, 1)
    place = group_partition(place, (g, g), interval).reshape(-1)  # (nG*N,): padded-map index of each slot
    slot = torch.empty_like(place)
    slot[place] = torch.arange(place.numel(), device=place.device)  # padded-map index -> slot
    idx = query_indices((height, width), weights.device)
    where = slot[(idx // width) * wp + idx % width]  # (Q,)
    grp, local = where // n, where % n
    per_image, heads = place.numel() // n, weights.shape[1]
    batch = weights.shape[0] // per_image
    by_group = weights.reshape(batch, per_image, heads, n, n).permute(1, 3, 0, 2, 4)  # (nG, N, B, h, N)
    rows = by_group[grp, local].permute(1, 2, 0, 3)  # (Q, B, h, N) -> (B, h, Q, N)
    keys = place.reshape(-1, n)[grp]  # (Q, N): padded-map index of each key
    ky, kx = keys // wp, keys % wp
    target = torch.where((ky < height) & (kx < width), ky * width + kx, height * width)  # padding: spare
    out = weights.new_zeros(batch, heads, len(idx), height * width + 1)
    out.scatter_(3, target.expand(batch, heads, -1, -1), rows)
    record(module, "rows", out[..., : height * width], grid=size, queries=idx, query_grid=size,
           group_size=g, interval=interval)
