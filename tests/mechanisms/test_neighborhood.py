"""Neighbourhood attention (NAT / DiNAT) against a float64 loop written from the papers' definition
with NATTEN's border, dilation and causal rules (written here independently of the kernel's index
code: NATTEN's documented `get_window_start` formula on the full axis)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import attnzoo
from attnzoo.kernels.neighbourhood_nd import axis_window
from attnzoo.mechanisms.neighborhood import (
    NeighborhoodAttention1d,
    NeighborhoodAttention2d,
    NeighborhoodAttention3d,
)

CLASSES = {1: NeighborhoodAttention1d, 2: NeighborhoodAttention2d, 3: NeighborhoodAttention3d}


def window_start(index: int, length: int, kernel: int, dilation: int) -> int:
    """NATTEN's non-causal window start on the full axis (its documented formula)."""
    nh = kernel // 2
    if dilation <= 1:
        return max(index - nh, 0) + (index + nh >= length) * (length - index - nh - 1)
    if index - nh * dilation < 0:
        return index % dilation
    if index + nh * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * nh * dilation
        return a + imodd - kernel * dilation
    return index - nh * dilation


def axis_keys(index: int, length: int, kernel: int, dilation: int, causal: bool) -> list[int]:
    """Key positions of query `index` along one axis."""
    if causal:  # the k group members ending at the query, fewer at the start of the group
        return [index - j * dilation for j in range(kernel - 1, -1, -1) if index - j * dilation >= 0]
    if kernel % 2 == 0:  # NATTEN's legacy modules take odd kernels; attnzoo clamps k//2 back, k//2-1 on
        group = list(range(index % dilation, length, dilation))
        m = group.index(index)
        start = min(max(m - kernel // 2, 0), len(group) - kernel)
        return group[start : start + kernel]
    start = window_start(index, length, kernel, dilation)
    return [start + j * dilation for j in range(kernel)]


def reference(module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Loop over queries: softmax over the neighbourhood with the relative position bias."""
    sizes = tuple(x.shape[1:-1])
    b, c = x.shape[0], x.shape[-1]
    h, d = module.num_heads, module.head_dim
    ks, ds, cs = module.kernel_size, module.dilation, module.causal
    qkv = x.reshape(b, -1, c) @ module.qkv.weight.T
    if module.qkv.bias is not None:
        qkv = qkv + module.qkv.bias
    q, k, v = qkv.reshape(b, -1, 3, h, d).permute(2, 0, 3, 1, 4)  # (B, h, N, d) each
    out = torch.zeros(b, h, math.prod(sizes), d, dtype=x.dtype)
    weights = {}
    for pos in itertools.product(*(range(s) for s in sizes)):
        per_axis = [axis_keys(*a) for a in zip(pos, sizes, ks, ds, cs, strict=True)]
        keys = list(itertools.product(*per_axis))
        qi = sum(pos[a] * math.prod(sizes[a + 1 :]) for a in range(len(sizes)))
        kidx = [int(sum(kp[a] * math.prod(sizes[a + 1 :]) for a in range(len(sizes)))) for kp in keys]
        logits = module.scale * (q[:, :, qi, None, :] * k[:, :, kidx]).sum(-1)  # (B, h, n)
        if module.rpb is not None:
            rel = [tuple((kp[a] - pos[a]) // ds[a] + ks[a] - 1 for a in range(len(sizes))) for kp in keys]
            logits = logits + torch.stack([module.rpb[(slice(None), *r)] for r in rel], -1)
        w = logits.softmax(-1)
        out[:, :, qi] = (w[..., None] * v[:, :, kidx]).sum(-2)
        weights[qi] = (kidx, w)
    y = out.transpose(1, 2).reshape(x.shape) @ module.proj.weight.T + module.proj.bias
    return y, weights


CASES = [
    # (dims, sizes, kernel_size, dilation, causal)
    (1, (9,), 3, 2, False),
    (1, (7,), 7, 1, False),
    (1, (11,), 4, 2, False),
    (1, (10,), 3, 3, True),
    (1, (13,), 5, 1, True),
    (2, (5, 6), 3, 1, False),
    (2, (7, 9), 3, (2, 3), False),
    (2, (6, 5), (3, 5), 1, (True, False)),
    (2, (8, 9), 4, 2, True),
    (3, (3, 4, 5), 3, 1, False),
    (3, (4, 5, 7), (2, 3, 3), (2, 1, 2), False),
    (3, (4, 3, 5), 3, 1, (True, False, False)),
]


@pytest.mark.parametrize("rpb", [True, False])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}d-{c[1]}-k{c[2]}-d{c[3]}-c{c[4]}" for c in CASES])
def test_matches_the_float64_loop(case, rpb):
    dims, sizes, kernel, dilation, causal = case
    torch.manual_seed(0)
    module = CLASSES[dims](8, num_heads=2, kernel_size=kernel, dilation=dilation, causal=causal,
                           rel_pos_bias=rpb, dtype=torch.float64).eval()
    if module.rpb is not None:
        torch.nn.init.normal_(module.rpb, std=0.5)  # large enough to matter
    x = torch.randn(2, *sizes, 8, dtype=torch.float64)
    out, weights = module(x, need_weights=True)
    ref, ref_weights = reference(module, x)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    kk = math.prod(module.kernel_size)
    assert weights.shape == (2, 2, math.prod(sizes), kk)
    keys_of = _flat_keys(module, sizes)
    for qi, (kidx, w) in ref_weights.items():
        got = torch.zeros(2, 2, math.prod(sizes), dtype=torch.float64)
        got.index_add_(2, keys_of[qi], weights[:, :, qi])
        want = torch.zeros_like(got)
        want[:, :, kidx] = w
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, math.prod(sizes), dtype=torch.float64))


def _flat_keys(module, sizes):
    from attnzoo.kernels.neighbourhood_nd import neighbourhood_index

    keys, _, _ = neighbourhood_index(sizes, module.kernel_size, module.dilation, module.causal)
    return keys


def test_window_shifts_inward_at_the_borders():
    keys, rel, valid = axis_window(9, 3, 2, causal=False)
    # Query 0 (group 0: 0 2 4 6 8) keeps 3 keys from the border on; query 8 the last 3 of its group;
    # query 7 (group 1: 1 3 5 7) the last 3 of its group.
    assert keys[0].tolist() == [0, 2, 4] and keys[8].tolist() == [4, 6, 8] and keys[7].tolist() == [3, 5, 7]
    assert keys[4].tolist() == [2, 4, 6] and rel[4].tolist() == [1, 2, 3] and bool(valid.all())
    assert rel[0].tolist() == [2, 3, 4] and rel[8].tolist() == [0, 1, 2]
    for i in range(9):
        assert keys[i].tolist() == [window_start(i, 9, 3, 2) + 2 * j for j in range(3)]
    keys, _, valid = axis_window(7, 3, 1, causal=True)
    assert valid.sum(-1).tolist() == [1, 2, 3, 3, 3, 3, 3]
    assert keys[5][valid[5]].tolist() == [3, 4, 5]


@pytest.mark.parametrize(
    ("cls", "shape", "kwargs"),
    [
        (NeighborhoodAttention1d, (1, 5, 8), {"kernel_size": 3, "dilation": 2}),
        (NeighborhoodAttention2d, (1, 7, 6, 8), {"kernel_size": 7}),
        (NeighborhoodAttention3d, (1, 3, 8, 8, 8), {"kernel_size": (2, 4, 4), "dilation": (2, 1, 1)}),
    ],
)
def test_map_smaller_than_kernel_times_dilation_is_refused(cls, shape, kwargs):
    module = cls(8, num_heads=2, **kwargs)
    with pytest.raises(ValueError, match=r"kernel_size \* dilation"):
        module(torch.randn(shape))


def test_bad_per_axis_options_name_the_argument():
    with pytest.raises(ValueError, match="kernel_size"):
        NeighborhoodAttention2d(8, 2, kernel_size=(3, 3, 3))
    with pytest.raises(TypeError, match="causal"):
        NeighborhoodAttention2d(8, 2, causal=(True, 1))
    with pytest.raises(ValueError, match="dilation"):
        NeighborhoodAttention1d(8, 2, dilation=0)
    with pytest.raises(TypeError, match="kernel_size"):
        NeighborhoodAttention3d(8, 2, kernel_size=3.0)


def test_parameters_are_named_as_natten():
    module = NeighborhoodAttention2d(16, num_heads=4, kernel_size=5)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes == {"qkv.weight": (48, 16), "qkv.bias": (48,), "rpb": (4, 9, 9),
                      "proj.weight": (16, 16), "proj.bias": (16,)}
    assert NeighborhoodAttention3d(8, 2, kernel_size=3).rpb.shape == (2, 5, 5, 5)
    assert "rpb" not in NeighborhoodAttention1d(8, 2, rel_pos_bias=False).state_dict()


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_gradients_and_double_backward(dims):
    sizes = {1: (6,), 2: (6, 5), 3: (6, 3, 4)}[dims]
    torch.manual_seed(1)
    rest = (1,) * (dims - 1)
    module = CLASSES[dims](4, num_heads=2, kernel_size=3, dilation=(2, *rest),
                           causal=(True, *(False,) * (dims - 1)), dtype=torch.float64)
    x = torch.randn(1, *sizes, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,))
    assert torch.autograd.gradgradcheck(module, (x,))


def test_capture_records_rows_on_the_map():
    torch.manual_seed(0)
    module = NeighborhoodAttention2d(8, num_heads=2, kernel_size=3, dilation=2).eval()
    x = torch.randn(2, 7, 8, 8)
    with attnzoo.capture_maps(module, queries=[(0, 0), (6, 7), (3, 4)]) as maps:
        _, weights = module(x, need_weights=True)
    (rec,) = maps[""] if "" in maps else maps["NeighborhoodAttention2d"]
    assert rec.kind == "rows" and rec.grid == (7, 8) and rec.data.shape == (2, 2, 3, 56)
    assert rec.queries.tolist() == [0, 6 * 8 + 7, 3 * 8 + 4]
    torch.testing.assert_close(rec.data.sum(-1), torch.ones(2, 2, 3))
    # Query (0, 0): rows 0 2 4 and columns 0 2 4, NATTEN's window at the corner with dilation 2.
    support = rec.data[0, 0, 0].nonzero().flatten().tolist()
    assert support == [r * 8 + c for r in (0, 2, 4) for c in (0, 2, 4)]
    torch.testing.assert_close(rec.data[:, :, 0, support], weights[:, :, 0])


def test_large_map_memory_is_linear_in_tokens():
    """A 1-D sequence of 20k tokens runs (an N x N float32 map would take 1.6 GB per head)."""
    module = NeighborhoodAttention1d(8, num_heads=1, kernel_size=7, dilation=3)
    with torch.no_grad():
        out = module(torch.randn(1, 20_000, 8))
    assert out.shape == (1, 20_000, 8) and torch.isfinite(out).all()


def test_registered_names():
    assert type(attnzoo.create("neighborhood_2d", 16)) is NeighborhoodAttention2d
    assert type(attnzoo.create("na3d", 16)) is NeighborhoodAttention3d
    assert attnzoo.get_spec("neighborhood_3d").layout == "NTHWC"
