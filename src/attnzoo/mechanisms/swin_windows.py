"""Swin's window geometry: cutting a map into windows and back, the shifted-window mask, and the
small-map rule (a map side no larger than the window gets a clipped window and no shift).

Used by `attnzoo.mechanisms.swin`, which re-exports the public functions.

Shape letters: B batch, H/W map size, C channels, (Wh, Ww) window, (sh, sw) shift,
N = Wh*Ww tokens per window, nW windows per image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_float, check_length, check_shape
from attnzoo._geometry import int_pair

__all__ = [
    "check_saved_index",
    "index_mismatch",
    "map_window_mask",
    "set_relative_window",
    "shifted_window_mask", "small_map_window",
    "window_partition",
    "window_reverse",
]


def window_partition(x: Tensor, window_size: int | Sequence[int]) -> Tensor:
    """Cut a `(B, H, W, C)` map into non-overlapping windows, image-major then row-major.

    Args:
        x: The map.
        window_size: `(Wh, Ww)`, or an int for a square window.

    Shape:
        - x: `(B, H, W, C)` with `Wh | H` and `Ww | W`.
        - Output: `(B * nW, Wh, Ww, C)`.
    """
    wh, ww = int_pair(window_size, "window_size", "window_partition")
    dims = check_shape(x, "window_partition", "B H W C", floating=False)
    height, width = dims["H"], dims["W"]
    if height % wh or width % ww:
        raise ValueError(
            f"window_partition expects H, W divisible by the window {(wh, ww)}, got {(height, width)}"
        )
    x = x.reshape(dims["B"], height // wh, wh, width // ww, ww, dims["C"])  # (B, H/Wh, Wh, W/Ww, Ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh, ww, dims["C"])  # (B*nW, Wh, Ww, C)


def window_reverse(windows: Tensor, window_size: int | Sequence[int], H: int, W: int) -> Tensor:  # noqa: N803
    """Undo `window_partition`: `(B * nW, Wh, Ww, C)` windows back to `(B, H, W, C)`.

    Args:
        windows: The windows, in `window_partition` order.
        window_size: `(Wh, Ww)`, or an int for a square window.
        H: Map height.
        W: Map width.

    Shape:
        - windows: `(B * nW, Wh, Ww, C)` with `nW = (H / Wh) * (W / Ww)`.
        - Output: `(B, H, W, C)`.
    """
    wh, ww = int_pair(window_size, "window_size", "window_reverse")
    H, W = check_length(H, "H", "window_reverse"), check_length(W, "W", "window_reverse")  # noqa: N806
    dims = check_shape(windows, "window_reverse", "B Wh Ww C", "windows", floating=False, Wh=wh, Ww=ww)
    if H % wh or W % ww or dims["B"] % ((H // wh) * (W // ww)):
        raise ValueError(
            f"window_reverse expects H, W divisible by the window {(wh, ww)} and windows.shape[0] divisible "
            f"by the window count, got H, W = {(H, W)}, windows {tuple(windows.shape)}"
        )
    x = windows.reshape(-1, H // wh, W // ww, wh, ww, dims["C"])  # (B, H/Wh, W/Ww, Wh, Ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, dims["C"])  # (B, H, W, C)


def shifted_window_mask(
    H: int,  # noqa: N803
    W: int,  # noqa: N803
    window_size: int | Sequence[int],
    shift_size: int | Sequence[int],
    *,
    value: float = -100.0,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """The additive mask of shifted-window attention (SW-MSA) on an `H x W` map rolled by the shift.

    After `roll(x, (-sh, -sw))` a window can hold tokens from up to four image regions that were
    not adjacent; a query may attend only to keys of its own region. Regions follow the official
    slicing `[0, H-Wh), [H-Wh, H-sh), [H-sh, H)` per axis (the same for W), so for square windows
    this equals the official block's `attn_mask` (and `value=-100` is the official value).

    Args:
        H: Map height (a multiple of Wh).
        W: Map width (a multiple of Ww).
        window_size: `Wh` and `Ww` (an int for both).
        shift_size: `sh` and `sw`, each in `[0, window)`.
        value: Logit offset between different regions. Default: -100.0.
        device: Device of the mask. Default: the default device.
        dtype: Dtype of the mask. Default: the default dtype.

    Shape:
        - Output: `(nW, N, N)`, windows in `window_partition` order; 0 or `value`.
    """
    who = "shifted_window_mask"
    wh, ww = int_pair(window_size, "window_size", who)
    sh, sw = int_pair(shift_size, "shift_size", who, minimum=0)
    H, W = check_length(H, "H", who), check_length(W, "W", who)  # noqa: N806
    value = check_float(value, "value", who)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        # a bool mask means "True = may attend" in attend: 0 / value as bools would invert it
        raise TypeError(f"{who} expects dtype to be a floating torch.dtype (an additive mask), got {dtype!r}")
    if sh >= wh or sw >= ww:
        raise ValueError(f"{who}: shift_size must be smaller than window_size {(wh, ww)}, got {(sh, sw)}")
    if H % wh or W % ww:
        raise ValueError(f"{who} expects H, W divisible by the window {(wh, ww)}, got {(H, W)}")
    rows, cols = torch.arange(H, device=device), torch.arange(W, device=device)
    region_h = (rows >= H - wh).long() + (rows >= H - sh).long() * int(sh > 0)  # 0, 1, 2 per row
    region_w = (cols >= W - ww).long() + (cols >= W - sw).long() * int(sw > 0)
    region = (region_h[:, None] * 3 + region_w[None, :])[None, :, :, None]  # (1, H, W, 1)
    ids = window_partition(region, (wh, ww)).reshape(-1, wh * ww)  # (nW, N)
    different = ids[:, None, :] != ids[:, :, None]  # (nW, N, N)
    return torch.zeros(different.shape, device=device, dtype=dtype).masked_fill_(different, value)


def small_map_window(
    size: Sequence[int], window: Sequence[int], shift: Sequence[int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Swin's rule for maps no larger than the window, applied per dimension.

    Along a dimension where the map side is at most the window side, the window shrinks to the map
    side and the shift is 0 (one window covers the side: shifting would only wrap the map onto
    itself). This is timm's `SwinTransformerBlock._calc_window_shift` (per dimension); the official
    block's `if min(input_resolution) <= window_size: shift_size = 0; window_size =
    min(input_resolution)` is the same rule for square maps and windows (on a (4, 8) map with window
    4 the official drops the shift on both axes and shrinks nothing; this keeps the W shift); torchvision's
    `shifted_window_attention` drops the shift under the same condition but pads the map up to the
    window instead of shrinking the window.

    Args:
        size: `(H, W)` of the map.
        window: `(Wh, Ww)`, the window the module was built with.
        shift: `(sh, sw)`, the shift the module was built with.

    Returns:
        The `(Wh, Ww)` window and `(sh, sw)` shift to use on this map.

    Example:
        ```python
        >>> small_map_window((7, 14), (7, 7), (3, 3))  # a 7 x 14 map: no shift along H
        ((7, 7), (0, 3))
        >>> small_map_window((5, 5), (7, 7), (3, 3))  # Swin's stage 4 on a 160 x 160 image
        ((5, 5), (0, 0))

        ```
    """
    (height, width), (wh, ww), (sh, sw) = size, window, shift
    clipped = (min(height, wh), min(width, ww))
    shifts = (0 if height <= wh else sh, 0 if width <= ww else sw)
    return clipped, shifts


def map_window_mask(
    size: tuple[int, int],
    window: tuple[int, int],
    shift: tuple[int, int],
    *,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor | None:
    """The additive mask of window attention on an `H x W` map padded to window multiples and rolled.

    The shifted-window regions (`shifted_window_mask`) plus, when the map was padded at the
    bottom/right, a logit offset of `finfo.min / 2` on every padded key, so that padding never takes
    part in the attention of a real token.

    Args:
        size: `(H, W)` of the map before padding.
        window: `(Wh, Ww)`.
        shift: `(sh, sw)`, the roll by `-shift` applied after padding.
        device: Device of the mask. Default: the default device.
        dtype: Floating dtype of the mask. Default: the default dtype.

    Shape:
        - Output: `(nW, N, N)` over the padded map's windows in `window_partition` order, or None
          when there is neither a shift nor padding.
    """
    (height, width), (wh, ww), (sh, sw) = size, window, shift
    hp, wp = -(-height // wh) * wh, -(-width // ww) * ww
    dtype = torch.get_default_dtype() if dtype is None else dtype
    mask = None
    if sh or sw:
        mask = shifted_window_mask(hp, wp, window, shift, device=device, dtype=dtype)  # (nW, N, N)
    if (hp, wp) != (height, width):
        rows = (torch.arange(hp, device=device) + sh) % hp >= height  # padded rows after the roll
        cols = (torch.arange(wp, device=device) + sw) % wp >= width
        pad = (rows[:, None] | cols[None, :])[None, :, :, None]  # (1, Hp, Wp, 1)
        pad = window_partition(pad, window).reshape(-1, 1, wh * ww)  # (nW, 1, N): padded keys
        offset = torch.zeros(pad.shape, device=device, dtype=dtype)
        offset = offset.masked_fill_(pad, torch.finfo(dtype).min / 2)  # (nW, 1, N)
        mask = offset if mask is None else mask + offset  # (nW, N, N) via (nW, 1, N) keys
        mask = mask.expand(-1, wh * ww, -1)  # (nW, N, N)
    return mask


def index_mismatch(given: object, own: Tensor, key: str, window: tuple[int, int]) -> str | None:
    """Why a checkpoint's `relative_position_index` cannot stand for `own`, or None when it matches.

    The index follows from the window alone. A checkpoint's copy (the official module saves it
    `(N, N)`, torchvision flattened `(N*N,)`) must hold the same values in row-major order; on the
    meta device only its size can be checked.
    """
    if not isinstance(given, Tensor):
        return f"{key}: expected the relative position index tensor, got {type(given).__name__}"
    same = given.numel() == own.numel()
    if same and "meta" not in (given.device.type, own.device.type):
        same = torch.equal(given.to(own.device).reshape(own.shape), own)
    if same:
        return None
    return (
        f"{key}: the checkpoint's relative position index {tuple(given.shape)} is not the one of a "
        f"{window} window {tuple(own.shape)}; was it saved for another window_size?"
    )


def check_saved_index(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, error_msgs: list[str]
) -> None:
    """From `_load_from_state_dict`: the official state_dict carries `relative_position_index`, which
    the module keeps non-persistent (it follows from the window); take a matching one out of the
    state_dict and report one that does not match (`index_mismatch`)."""
    key = prefix + "relative_position_index"
    if key in state_dict and "relative_position_index" in module._non_persistent_buffers_set:
        own: Tensor = module.relative_position_index  # type: ignore[assignment]  # a registered buffer
        problem = index_mismatch(state_dict.pop(key), own, key, module.window_size)  # type: ignore[arg-type]
        if problem is not None:
            error_msgs.append(problem)


def set_relative_window(
    module: Any, window_size: int | Sequence[int], index_of: Callable[[tuple[int, int]], Tensor],
    extra_rows: int = 0,
) -> None:
    """timm's `set_window_size` (what its `set_input_size` calls) for a module with a relative position
    table `((2Wh-1)(2Ww-1) + extra_rows, h)` over its `window_size` and a non-persistent
    `relative_position_index` (Swin's; BEiT's with its three class-token rows): the table resized by
    timm's own `resize_rel_pos_bias_table`, so the resized model keeps timm's numbers, and the index
    `index_of(window)` recomputed. timm calls it, so timm is installed; a missing timm is an ImportError."""
    who = f"{type(module).__name__}.set_window_size"
    new = int_pair(window_size, "window_size", who)
    old = tuple(module.window_size)
    if new == old:
        return
    try:
        from timm.layers import resize_rel_pos_bias_table
    except ImportError as error:
        raise ImportError(f"{who} resizes the position table as timm does, with timm's "
                          f"resize_rel_pos_bias_table: install timm") from error
    table: Tensor = module.relative_position_bias_table
    rows = (2 * new[0] - 1) * (2 * new[1] - 1) + extra_rows
    with torch.no_grad():
        resized = resize_rel_pos_bias_table(table, new_window_size=new, old_window_size=old,
                                            new_bias_shape=(rows, table.shape[-1]))
    module.window_size = new
    module.relative_position_bias_table = nn.Parameter(resized, requires_grad=table.requires_grad)
    module.register_buffer("relative_position_index", index_of(new).to(table.device), persistent=False)
