"""Relative position helpers: Swin's 2-D index, the temporal 1-D index, and the table look-up.

Re-exported by `attnzoo.functional`, their public home.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnzoo._checks import check_length, check_tensor
from attnzoo.kernels.route import host_readable

__all__ = ["relative_position_index_1d", "relative_position_index_2d", "gather_relative_bias"]


def relative_position_index_1d(length: int, device: torch.device | None = None) -> Tensor:
    """Index into a `(2*length - 1, heads)` table: `index[i, j] = i - j + length - 1`.

    Shape:
        - Output: `(length, length)`, int64; query i, key j.
    """
    length = check_length(length, "length", "relative_position_index_1d")  # 2.5 would give a float index
    coords = torch.arange(length, device=device)
    return coords[:, None] - coords[None, :] + (length - 1)


def relative_position_index_2d(
    window_size: tuple[int, int], device: torch.device | str | None = None
) -> Tensor:
    """Index into a `((2*Wh-1)*(2*Ww-1), heads)` table, in Swin's order.

    `index[i, j] = (dh + Wh - 1) * (2*Ww - 1) + (dw + Ww - 1)` with `(dh, dw)` the offset of
    query token i minus key token j, tokens numbered row-major within the window.

    Shape:
        - Output: `(Wh*Ww, Wh*Ww)`, int64.
    """
    who = "relative_position_index_2d"
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"{who} expects window_size to be a pair (Wh, Ww), got {window_size!r}")
    wh, ww = (check_length(n, "window_size", who) for n in window_size)
    rows, cols = torch.meshgrid(
        torch.arange(wh, device=device), torch.arange(ww, device=device), indexing="ij"
    )
    coords = torch.stack([rows.flatten(), cols.flatten()])  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N): query minus key
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def gather_relative_bias(table: Tensor, index: Tensor) -> Tensor:
    """Look a relative position table up: `(T, h)` table, `(L, S)` index -> `(h, L, S)` bias.

    The index must lie in `[0, T)`; a CPU index is checked (a negative one would count from the end).
    """
    who = "gather_relative_bias"
    check_tensor(table, who, "table", floating=False)
    if table.ndim != 2:
        raise ValueError(f"{who} expects table of shape (T, h), got {tuple(table.shape)}")
    check_tensor(index, who, "index", floating=False)
    if index.dtype not in (torch.int64, torch.int32):  # a bool or uint8 index would act as a mask
        raise TypeError(f"{who} expects an int64 (or int32) index, got {index.dtype}")
    if index.ndim != 2:
        raise ValueError(f"{who} expects index of shape (L, S), got {tuple(index.shape)}")
    # values are read on the CPU only: a GPU index would cost a device sync on every forward
    if index.numel() and index.device.type == "cpu" and host_readable(index):
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= table.shape[0]:
            raise ValueError(f"{who} expects index values in [0, {table.shape[0]}) (the table's T), "
                             f"got [{low}, {high}]")
    length_q, length_k = index.shape
    heads = table.shape[1]  # not -1: an empty index leaves -1 undetermined
    return table[index.reshape(-1)].reshape(length_q, length_k, heads).permute(2, 0, 1)  # (h, L, S)
