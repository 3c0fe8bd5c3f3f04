"""Linear attention against the plain float64 N x N formulation with the same feature map."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.mechanisms.linear import LinearAttention, linear_attention


def reference(module: LinearAttention, x: torch.Tensor, key_mask: torch.Tensor | None = None):
    """Katharopoulos et al. eq. 4 / 9 with an explicit L x L kernel matrix."""
    b, length, c = x.shape
    h, d = module.num_heads, module.head_dim
    qkv = F.linear(x, module.qkv.weight, module.qkv.bias).reshape(b, length, 3, h, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, h, L, d) each
    a = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1)  # (B, h, L, L)
    if key_mask is not None:
        a = a * key_mask[:, None, None, :]
    if module.causal:
        a = a * torch.ones(length, length, dtype=torch.bool).tril()
    weights = a / (a.sum(-1, keepdim=True) + module.eps)
    out = (weights @ v).transpose(1, 2).reshape(b, length, c)
    return F.linear(out, module.proj.weight, module.proj.bias), weights


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [1, 7, 128, 131, 300])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_the_n_by_n_formulation(causal, length, masked):
    torch.manual_seed(length)
    module = LinearAttention(12, num_heads=3, causal=causal, dtype=torch.float64)
    x = torch.randn(2, length, 12, dtype=torch.float64)
    key_mask = torch.rand(2, length) > 0.3 if masked else None
    out, weights = module(x, need_weights=True, key_mask=key_mask)
    ref, ref_weights = reference(module, x, key_mask)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(weights, ref_weights, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8, 64])
def test_causal_chunks_agree(chunk):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 13, 4, dtype=torch.float64) for _ in range(3))
    whole = linear_attention(q, k, v, causal=True, chunk_size=1000)
    torch.testing.assert_close(linear_attention(q, k, v, causal=True, chunk_size=chunk), whole)
    # the first query sees only the first key: its output is v_0 (up to eps)
    torch.testing.assert_close(whole[:, :, 0], v[:, :, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_and_double_backward(causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[True, True, False, True, True, False, True]])

    def f(q, k, v):
        return linear_attention(q, k, v, causal=causal, key_mask=mask, chunk_size=3)

    assert torch.autograd.gradcheck(f, (q, k, v))
    assert torch.autograd.gradgradcheck(f, (q, k, v))


def test_fully_masked_keys_give_zero_attention_and_finite_gradients():
    module = LinearAttention(8, num_heads=2)
    x = torch.randn(2, 5, 8, requires_grad=True)
    out = module(x, key_mask=torch.zeros(2, 5, dtype=torch.bool))
    torch.testing.assert_close(out, module.proj.bias.expand(2, 5, 8))  # zero attention, then proj
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_padding_keys_do_not_change_the_real_ones():
    torch.manual_seed(0)
    module = LinearAttention(8, num_heads=2).double()
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    padded = torch.cat([x, torch.randn(1, 3, 8, dtype=torch.float64)], 1)
    keep = torch.tensor([[True] * 6 + [False] * 3])
    torch.testing.assert_close(module(padded, key_mask=keep)[:, :6], module(x))


def test_key_mask_is_checked():
    module = LinearAttention(8, num_heads=2)
    x = torch.randn(2, 5, 8)
    with pytest.raises(TypeError, match="key_mask"):
        module(x, key_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="key_mask"):
        module(x, key_mask=torch.ones(2, 4, dtype=torch.bool))
    out = module(x, key_mask=torch.ones(1, dtype=torch.bool))  # broadcasts
    assert out.shape == (2, 5, 8)


def test_long_causal_sequence_runs_in_linear_memory():
    """16k tokens: an L x L float32 map per head would take 1 GB; chunks of 128 keep it small."""
    module = LinearAttention(8, num_heads=1, causal=True)
    with torch.no_grad():
        out = module(torch.randn(1, 16_384, 8))
    assert out.shape == (1, 16_384, 8) and torch.isfinite(out).all()


def test_capture_records_rows():
    torch.manual_seed(0)
    module = LinearAttention(8, num_heads=2, causal=True).eval()
    x = torch.randn(1, 10, 8)
    with attnzoo.capture_maps(module, queries=[3, 9]) as maps:
        _, weights = module(x, need_weights=True)
    (rec,) = next(iter(maps.values()))
    assert rec.kind == "rows" and rec.data.shape == (1, 2, 2, 10) and rec.queries.tolist() == [3, 9]
    torch.testing.assert_close(rec.data, weights[:, :, [3, 9]])
    assert (rec.data[:, :, 0, 4:] == 0).all()  # causal: query 3 sees keys 0..3


def test_bad_options_name_the_argument():
    with pytest.raises(ValueError, match="eps"):
        LinearAttention(8, eps=-1.0)
    with pytest.raises(ValueError, match="num_heads"):
        LinearAttention(8, num_heads=3)
    with pytest.raises(TypeError, match="causal"):
        LinearAttention(8, causal="yes")
