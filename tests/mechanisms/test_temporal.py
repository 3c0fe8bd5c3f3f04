"""TemporalAttention / compat.Attention: golden files of the STG-CMA class and a plain reference."""

from __future__ import annotations

import pytest
import torch
from conftest import golden_files

import attnzoo
from attnzoo import TemporalAttention
from attnzoo.compat import Attention

F64 = dict(atol=1e-10, rtol=1e-10)


def reference(m: TemporalAttention, x: torch.Tensor) -> torch.Tensor:
    """The seed's forward, step by step: scale after q @ k^T, bias[h, i, j] = table[i - j + T - 1, h]."""
    b, t, c = x.shape
    h = m.num_heads
    if m.with_qkv:
        qkv = m.qkv(x).reshape(b, t, 3, h, c // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
    else:
        q = k = v = x.reshape(b, t, h, c // h).permute(0, 2, 1, 3)
    rows = torch.tensor([[i - j + t - 1 for j in range(t)] for i in range(t)])
    bias = m.relative_position_bias_table[rows].permute(2, 0, 1)  # (h, T, T)
    weights = ((q @ k.transpose(-2, -1)) * m.scale + bias).softmax(-1)
    out = (weights @ v).transpose(1, 2).reshape(b, t, c)
    return m.proj(out) if m.with_qkv else out


def reference_weights(m: TemporalAttention, x: torch.Tensor) -> torch.Tensor:
    """The softmax weights of `reference`, `(B, h, T, T)`."""
    b, t, c = x.shape
    h = m.num_heads
    if m.with_qkv:
        qkv = m.qkv(x).reshape(b, t, 3, h, c // h).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
    else:
        q = k = x.reshape(b, t, h, c // h).permute(0, 2, 1, 3)
    rows = torch.tensor([[i - j + t - 1 for j in range(t)] for i in range(t)])
    bias = m.relative_position_bias_table[rows].permute(2, 0, 1)  # (h, T, T)
    return ((q @ k.transpose(-2, -1)) * m.scale + bias).softmax(-1)


@pytest.mark.parametrize("path", golden_files("temporal_relpos_*.pt"), ids=lambda p: p.name)
@pytest.mark.parametrize("cls", [Attention, TemporalAttention])
def test_golden(path, cls):
    g = torch.load(path, weights_only=True)
    dtype = getattr(torch, g["dtype"])
    kwargs = dict(g["kwargs"])
    if cls is TemporalAttention:  # the canonical name of the seed's num_ttokens
        kwargs["num_frames"] = kwargs.pop("num_ttokens")
    m = cls(**kwargs).to(dtype)
    m.load_state_dict(g["state_dict"], strict=True)
    m.eval()
    assert list(m.state_dict()) == list(g["state_dict"])
    assert torch.equal(m.relative_coords, g["state_dict"]["relative_coords"])
    args = [g["inputs"][a] for a in g["forward_args"]]
    tol = 1e-8 if dtype == torch.float64 else 1e-4
    for fused in (True, False):
        with attnzoo.fused_attn(fused):
            torch.testing.assert_close(m(*args).detach(), g["output"], atol=tol, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dim": 12, "num_frames": 6, "num_heads": 3},
        {"dim": 12, "num_frames": 4, "num_heads": 2, "qkv_bias": True, "qk_scale": 0.7},
        {"dim": 8, "num_frames": 5, "num_heads": 4, "with_qkv": False},
        {"dim": 8, "num_frames": 1, "num_heads": 2},
    ],
)
def test_values_and_gradients_equal_reference(kwargs):
    torch.manual_seed(0)
    m = TemporalAttention(**kwargs).double()
    with torch.no_grad():
        m.relative_position_bias_table.normal_(0, 0.5)
    x = torch.randn(3, kwargs["num_frames"], kwargs["dim"], dtype=torch.float64, requires_grad=True)
    out, ref = m(x), reference(m, x)
    torch.testing.assert_close(out, ref, **F64)
    with_weights, weights = m(x, need_weights=True)  # the math path, and the weights it used
    torch.testing.assert_close(with_weights, ref, **F64)
    torch.testing.assert_close(weights, reference_weights(m, x), **F64)
    params = [x, *m.parameters()]
    grad_out = torch.randn_like(out)
    for a, b in zip(
        torch.autograd.grad(out, params, grad_out), torch.autograd.grad(ref, params, grad_out), strict=False
    ):
        torch.testing.assert_close(a, b, **F64)


def test_layout_without_qkv_and_seed_name():
    m = Attention(dim=16, num_ttokens=4, num_heads=4, with_qkv=False)
    assert list(m.state_dict()) == ["relative_position_bias_table", "relative_coords"]
    assert m.relative_position_bias_table.shape == (7, 4)
    seed = attnzoo.create("Attention", dim=16, num_ttokens=4)
    assert type(seed) is Attention and seed.num_heads == 8 and seed.qkv.bias is None
    assert (seed.num_ttokens, seed.num_frames) == (4, 4)
    canon = attnzoo.create("temporal", 16)
    assert type(canon) is TemporalAttention and (canon.num_frames, canon.num_heads) == (8, 8)
    seed8 = Attention(16, 8)
    canon.load_state_dict(seed8.state_dict(), strict=True)  # one layout for both
    assert list(canon.state_dict()) == list(seed8.state_dict())
    x = torch.randn(2, 8, 16)
    assert isinstance(Attention(16, 8)(x), torch.Tensor)  # the seed's forward: the output alone


def test_dropout_only_in_training():
    torch.manual_seed(0)
    m = TemporalAttention(8, 5, 2, attn_drop=0.5).double()
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    m.eval()
    torch.testing.assert_close(m(x), reference(m, x), **F64)
    m.train()
    assert not torch.allclose(m(x), reference(m, x))


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="dim=10 must be divisible by num_heads=4"):
        TemporalAttention(10, 4, 4)
    with pytest.raises(ValueError, match="num_frames must be >= 1"):
        TemporalAttention(8, 0, 2)
    with pytest.raises(ValueError, match="num_ttokens must be >= 1"):
        Attention(8, 0, 2)  # the seed's argument name
    m = TemporalAttention(8, 5, 2)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 5, 8\) with T=5, got \(2, 6, 8\)"):
        m(torch.randn(2, 6, 8))
    with pytest.raises(ValueError, match=r"with C=8"):
        m(torch.randn(2, 5, 7))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.randn(2, 5, 8).to(torch.complex64))
