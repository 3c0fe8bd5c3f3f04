"""OverlappedAttention (MOA) against a direct, loop-based reading of the paper, its official-order twin
(LegacyOverlappedAttention) on one-window maps, and its argument and input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo import OverlappedAttention
from attnzoo.mechanisms.moa import LegacyOverlappedAttention

D = torch.float64
TOL = {"atol": 1e-10, "rtol": 1e-10}


def randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    module = module.to(D)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=D) * 0.5)
    return module.eval()


def reference(m: OverlappedAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper, window by window: flattened window / grown-window patches, biased softmax attention."""
    b, height, width, c = x.shape
    w, heads = m.window_size, m.num_heads
    gh, gw = height // w, width // w
    r = F.conv2d(x.permute(0, 3, 1, 2), m.pre_conv.weight, m.pre_conv.bias)  # (B, r, H, W)
    padded = F.pad(r, (1, 1, 1, 1))
    queries, keys, cells = [], [], []
    for i in range(gh):
        for j in range(gw):
            patch = r[:, :, i * w:(i + 1) * w, j * w:(j + 1) * w]  # (B, r, w, w)
            queries.append(patch.permute(0, 2, 3, 1).reshape(b, -1))  # (row, column, channel)
            grown = padded[:, :, i * w:i * w + w + 2, j * w:j * w + w + 2]  # (B, r, w+2, w+2)
            keys.append(grown.reshape(b, -1))  # (channel, row, column)
            cells.append((i, j))
    q = m.q(torch.stack(queries, 1)).reshape(b, gh * gw, heads, -1).transpose(1, 2)
    k, v = m.kv(torch.stack(keys, 1)).reshape(b, gh * gw, 2, heads, -1).permute(2, 0, 3, 1, 4)
    table = m.relative_position_bias_table
    bias = torch.empty(heads, gh * gw, gh * gw, dtype=D)
    for a, (ia, ja) in enumerate(cells):
        for z, (iz, jz) in enumerate(cells):
            bias[:, a, z] = table[(ia - iz + gh - 1) * (2 * gw - 1) + (ja - jz + gw - 1)]
    weights = torch.softmax(q @ k.transpose(-1, -2) * (c // heads) ** -0.5 + bias, -1)
    tokens = m.proj((weights @ v).transpose(1, 2).reshape(b, gh * gw, c))  # (B, n, C)
    out = tokens.reshape(b, gh, gw, c).repeat_interleave(w, 1).repeat_interleave(w, 2)
    return out, weights


@pytest.mark.parametrize(
    ("dim", "window", "heads", "size", "reduction", "qkv_bias"),
    [(64, 7, 4, (14, 21), 32, True), (32, 2, 2, (6, 4), 8, False), (8, 3, 1, (3, 9), 4, True),
     (96, 5, 3, (5, 5), 32, True), (24, 1, 2, (3, 2), 3, True)],
)
def test_matches_the_paper(dim, window, heads, size, reduction, qkv_bias):
    m = randomized(OverlappedAttention(dim, window, heads, size, reduction, qkv_bias))
    x = torch.randn(2, *size, dim, dtype=D)
    out, weights = m(x, need_weights=True)
    expected, expected_weights = reference(m, x)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(weights, expected_weights, **TOL)
    torch.testing.assert_close(m(x), expected, **TOL)


def test_one_window_equals_the_official_order():
    """On a one-window map the official views change nothing: canonical == legacy."""
    ours = randomized(OverlappedAttention(64, 7, 4, 7))
    legacy = randomized(LegacyOverlappedAttention(64, 7, 4, 7))
    legacy.load_state_dict(ours.state_dict())
    tokens = torch.randn(2, 49, 64, dtype=D)
    as_map = tokens.reshape(2, 64, 7, 7).permute(0, 2, 3, 1)  # the official reading: (B, C, H, W)
    torch.testing.assert_close(ours(as_map)[:, 0, 0], legacy(tokens, 7, 7)[:, 0], **TOL)


def test_official_order_differs_on_several_windows():
    ours = randomized(OverlappedAttention(64, 2, 2, 4))
    legacy = randomized(LegacyOverlappedAttention(64, 2, 2, 4))
    legacy.load_state_dict(ours.state_dict())
    tokens = torch.randn(2, 16, 64, dtype=D)
    as_map = tokens.reshape(2, 64, 4, 4).permute(0, 2, 3, 1)
    assert not torch.allclose(ours(as_map)[:, ::2, ::2].reshape(2, 4, 64), legacy(tokens, 4, 4))


def test_create_defaults_and_factory_kwargs():
    m = attnzoo.create("moa", 64)
    assert type(m) is OverlappedAttention and m.rd_channels == 2 and m.grid == (2, 2)
    assert m(torch.randn(1, 14, 14, 64)).shape == (1, 14, 14, 64)
    meta = OverlappedAttention(64, device="meta")
    assert all(t.device.type == "meta" for t in [*meta.parameters(), *meta.buffers()])
    f64 = OverlappedAttention(64, dtype=D)
    assert all(p.dtype == D for p in f64.parameters())
    assert "relative_position_index" not in f64.state_dict()
    assert OverlappedAttention(16).rd_channels == 1  # at least one reduced channel
    with pytest.raises(ValueError, match="unknown attention 'moat'"):
        attnzoo.create("moat", 64)  # MOAT (Yang et al., 2022) is another paper


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dim": 64, "feat_size": (14, 15)}, ValueError, r"feat_size=\(14, 15\) must be divisible"),
        ({"dim": 64, "reduction": 0}, ValueError, "reduction"),
        ({"dim": 64, "num_heads": 5}, ValueError, "dim=64 must be divisible by num_heads=5"),
        ({"dim": 64, "window_size": 0}, ValueError, "window_size"),
        ({"dim": 64, "feat_size": (14, 14, 14)}, ValueError, "feat_size must be an int or a pair"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        OverlappedAttention(**kwargs)


def test_bad_inputs():
    m = OverlappedAttention(64, 7, 4, (14, 21))
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 14, 21, 64\)"):
        m(torch.randn(2, 21, 14, 64))
    with pytest.raises(ValueError, match="C"):
        m(torch.randn(2, 14, 21, 32))
    with pytest.raises(TypeError):
        m(torch.ones(2, 14, 21, 64, dtype=torch.long))


def test_capture_records_window_rows():
    m = OverlappedAttention(32, 2, 2, (4, 6), reduction=8).eval()
    x = torch.randn(1, 4, 6, 32)
    with attnzoo.capture_maps(m) as maps:
        m(x)
    (record,) = [r for records in maps.values() for r in records]
    assert record.kind == "rows" and record.grid == (2, 3)
    _, weights = m(x, need_weights=True)
    torch.testing.assert_close(record.data, weights[:, :, record.queries], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("legacy", [False, True])
def test_reduction_product_equals_the_convolution_a_hook_forces(legacy: bool):
    # pre_conv runs as a matrix product on the tokens' layout; a hooked pre_conv is called as a module
    cls = LegacyOverlappedAttention if legacy else OverlappedAttention
    m = randomized(cls(16, window_size=2, num_heads=2, feat_size=(4, 6))).train()
    x = torch.randn(2, 24, 16, dtype=D) if legacy else torch.randn(2, 4, 6, 16, dtype=D)
    x.requires_grad_()
    call = (lambda: m(x, 4, 6)) if legacy else (lambda: m(x))
    fast = call()
    grads = torch.autograd.grad(fast.square().sum(), [x, *m.parameters()])
    seen = []
    m.pre_conv.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    slow = call()
    slow_grads = torch.autograd.grad(slow.square().sum(), [x, *m.parameters()])
    assert seen == [torch.Size([2, m.rd_channels, 4, 6])]
    torch.testing.assert_close(fast, slow, **TOL)
    for g, r in zip(grads, slow_grads, strict=True):
        torch.testing.assert_close(g, r, **TOL)
