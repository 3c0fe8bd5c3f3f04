"""swin_v2_window (canonical Swin V2 window attention): against a per-window reference with padded keys
and other regions left out, against torchvision's numbers on maps that need no padding, and its
arguments, weights and maps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo import ShiftedWindowAttentionV2
from attnzoo.compat import ShiftedWindowAttentionV2 as TorchvisionV2
from attnzoo.mechanisms.swin_v2 import log_spaced_coords

F64 = dict(atol=1e-10, rtol=1e-10)


def randomised(module: torch.nn.Module, scale: float = 0.5) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, scale)
    return module


def reference(module: ShiftedWindowAttentionV2, x: torch.Tensor) -> torch.Tensor:
    """Loops over the windows of the padded, rolled map; each real query attends to the real keys of
    its window and region only (no mask values at all)."""
    b, height, width, c = x.shape
    (wh, ww), (sh, sw), h = module.window_size, module.shift_size, module.num_heads
    hp, wp = math.ceil(height / wh) * wh, math.ceil(width / ww) * ww
    sh, sw = (sh if hp > wh else 0), (sw if wp > ww else 0)
    bias = module.position_bias()  # (h, N, N)
    tau = module.logit_scale.clamp(max=math.log(100)).exp()  # (h, 1, 1)
    qkv_bias = torch.cat([module.q_bias, torch.zeros_like(module.q_bias), module.v_bias])
    out = torch.zeros_like(x)

    def region(p: int, size: int, win: int, step: int) -> int:
        return 0 if not step else int(p >= size - win) + int(p >= size - step)

    for top in range(0, hp, wh):
        for left in range(0, wp, ww):
            cells = [(top + i, left + j) for i in range(wh) for j in range(ww)]  # rolled, padded coords
            src = [((r + sh) % hp, (s + sw) % wp) for r, s in cells]  # where each came from
            real = [n for n, (r, s) in enumerate(src) if r < height and s < width]
            ids = [region(r, hp, wh, sh) * 3 + region(s, wp, ww, sw) for r, s in cells]
            tokens = torch.stack([x[:, src[n][0], src[n][1]] for n in real], 1)  # (B, R, C)
            q, k, v = F.linear(tokens, module.qkv.weight, qkv_bias).reshape(b, len(real), 3, h, -1).unbind(2)
            logits = torch.einsum("bqhd,bkhd->bhqk", F.normalize(q, dim=-1), F.normalize(k, dim=-1)) * tau
            logits = logits + bias[:, real][:, :, real]
            same = torch.tensor([[ids[i] == ids[j] for j in real] for i in real])
            weights = logits.masked_fill(~same, float("-inf")).softmax(-1)
            y = module.proj(torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, len(real), c))
            for m, n in enumerate(real):
                out[:, src[n][0], src[n][1]] = y[:, m]
    return out


CASES = [  # (window, shift, H, W)
    ((4, 4), (2, 2), 8, 8),  # shift on, no padding
    ((4, 4), (2, 2), 7, 9),  # shift on, padded
    ((4, 3), (2, 1), 5, 13),  # rectangular window
    ((4, 4), (2, 2), 4, 9),  # one window along H: no shift there
    ((7, 7), (3, 3), 5, 5),  # map smaller than the window
    ((4, 4), (0, 0), 6, 6),  # W-MSA
]


@pytest.mark.parametrize("window, shift, height, width", CASES)
def test_matches_the_per_window_reference(window, shift, height, width):
    torch.manual_seed(0)
    module = randomised(ShiftedWindowAttentionV2(8, window, 2, shift, dtype=torch.float64)).eval()
    x = torch.randn(2, height, width, 8, dtype=torch.float64)
    torch.testing.assert_close(module(x), reference(module, x), **F64)


def copy_into_torchvision(ours: ShiftedWindowAttentionV2) -> TorchvisionV2:
    theirs = TorchvisionV2(ours.dim, list(ours.window_size), list(ours.shift_size), ours.num_heads,
                           dtype=torch.float64)
    with torch.no_grad():
        theirs.qkv.weight.copy_(ours.qkv.weight)
        theirs.qkv.bias.copy_(torch.cat([ours.q_bias, torch.zeros_like(ours.q_bias), ours.v_bias]))
        for name in ("logit_scale", "proj.weight", "proj.bias", "cpb_mlp.0.weight", "cpb_mlp.0.bias",
                     "cpb_mlp.2.weight"):
            theirs.get_parameter(name).copy_(ours.get_parameter(name))
    return theirs


@pytest.mark.parametrize("window, shift, size", [((4, 4), (2, 2), (8, 12)), ((3, 5), (1, 2), (6, 10)),
                                                 ((4, 4), (0, 0), (8, 8))])
def test_equals_torchvision_where_nothing_is_padded(window, shift, size):
    torch.manual_seed(1)
    ours = randomised(ShiftedWindowAttentionV2(16, window, 4, shift, dtype=torch.float64)).eval()
    with torch.no_grad():
        ours.logit_scale.fill_(math.log(10))  # the -100 mask of torchvision then blocks completely
    theirs = copy_into_torchvision(ours).eval()
    x = torch.randn(2, *size, 16, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), **F64)


def test_padding_does_not_take_part_unlike_torchvision():
    torch.manual_seed(2)
    ours = randomised(ShiftedWindowAttentionV2(8, 4, 2, 2, dtype=torch.float64)).eval()
    theirs = copy_into_torchvision(ours).eval()
    x = torch.randn(1, 5, 7, 8, dtype=torch.float64)  # padded to 8 x 8 (with a shift of 2, a 6 x 6
    assert (ours(x) - theirs(x)).abs().max() > 1e-3  # map's padding is a region of its own anyway)


def test_other_regions_are_blocked_even_with_the_largest_temperature():
    """torchvision adds -100, which cosine logits (up to 100) plus the bias (up to 16) overcome."""
    torch.manual_seed(3)
    ours = randomised(ShiftedWindowAttentionV2(8, 4, 2, 2, dtype=torch.float64)).eval()
    with torch.no_grad():
        ours.logit_scale.fill_(10.0)  # clamped to log(100)
    x = torch.randn(1, 8, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(ours(x), reference(ours, x), **F64)
    assert (ours(x) - copy_into_torchvision(ours).eval()(x)).abs().max() > 1e-6


def test_weights_and_maps():
    torch.manual_seed(4)
    module = ShiftedWindowAttentionV2(8, (2, 3), 2, (1, 1)).eval()
    x = torch.randn(2, 5, 7, 8)
    out, weights = module(x, need_weights=True)
    torch.testing.assert_close(out, module(x))
    assert weights.shape == (2 * 3 * 3, 2, 6, 6)  # padded to 6 x 9: 3 x 3 windows per image
    real_rows = weights.sum(-1)
    assert ((real_rows - 1).abs() < 1e-5).logical_or(real_rows == 0).all()
    with attnzoo.capture_maps(module) as maps:
        module(x)
    (record,) = maps[next(iter(maps))]
    assert record.kind == "rows" and record.grid == (5, 7) and record.data.shape[:2] == (2, 2)
    torch.testing.assert_close(record.data.sum(-1), torch.ones(record.data.shape[:3]))


def test_coords_and_state_dict():
    coords = log_spaced_coords((3, 1), (3, 1))
    assert coords.shape == (1, 5, 1, 2) and torch.isfinite(coords).all()  # a side of 1: no 0 / 0
    torch.testing.assert_close(coords[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.0, 1.0, 2.0])
                               .mul(4).add(1).log2().div(3) * torch.tensor([-1, -1, 0, 1, 1.0]))
    big = ShiftedWindowAttentionV2(8, 8, 2, pretrained_window_size=4)
    corner = torch.full((2,), -math.log2(8 * 7 / 3 + 1) / 3)  # offset -7 over a pre-training window of 4
    torch.testing.assert_close(big.relative_coords_table[0, 0, 0], corner)
    keys = set(ShiftedWindowAttentionV2(8, 4, 2).state_dict())
    assert keys == {"qkv.weight", "q_bias", "v_bias", "logit_scale", "cpb_mlp.0.weight", "cpb_mlp.0.bias",
                    "cpb_mlp.2.weight", "proj.weight", "proj.bias"}
    assert "q_bias" not in dict(ShiftedWindowAttentionV2(8, 4, 2, qkv_bias=False).named_parameters())


@pytest.mark.parametrize("kwargs, message", [
    ({"shift_size": 4}, "shift_size must be smaller"),
    ({"num_heads": 3}, "divisible by num_heads"),
    ({"window_size": (2, 2, 2)}, "window_size"),
    ({"pretrained_window_size": -1}, "pretrained_window_size"),
])
def test_bad_arguments_name_themselves(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ShiftedWindowAttentionV2(8, **{"window_size": 4, "num_heads": 2, **kwargs})


def test_wrong_input_names_the_shape():
    with pytest.raises(ValueError, match=r"\(B, H, W, 8\)"):
        ShiftedWindowAttentionV2(8, 4, 2)(torch.randn(1, 8, 4, 4))
