"""MultiHeadAttention: seed golden files, equality with torch.nn.MultiheadAttention, masks, dropout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import golden_files
from torch import nn

import attnzoo
import attnzoo.compat
from attnzoo import MultiHeadAttention
from attnzoo.compat import MultiHeadAttention as SeedMHA

F64 = dict(atol=1e-10, rtol=1e-10)


def seed_reference(m: nn.Module, Q, K, V, mask=None):  # noqa: N803
    """The seed's forward, step by step (float64)."""
    b, h = Q.shape[0], m.num_heads

    def split(x):
        return x.view(b, -1, h, m.depth).permute(0, 2, 1, 3)

    q, k, v = split(m.Wq(Q)), split(m.Wk(K)), split(m.Wv(V))
    scores = q @ k.transpose(-1, -2) / torch.sqrt(torch.tensor(m.depth, dtype=torch.float32))
    if mask is not None:
        scores = scores.masked_fill(mask == 0, -1e9)
    attention = torch.softmax(scores, dim=-1)
    out = (attention @ v).permute(0, 2, 1, 3).reshape(b, -1, m.d_model)
    return m.fc(out), attention


def torch_mha_from(m: MultiHeadAttention, dropout: float = 0.0) -> nn.MultiheadAttention:
    """An nn.MultiheadAttention holding the same weights (in_proj = [Wq; Wk; Wv], out_proj = fc)."""
    ref = nn.MultiheadAttention(m.dim, m.num_heads, dropout=dropout, batch_first=True).to(
        m.fc.weight.dtype
    )
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([m.Wq.weight, m.Wk.weight, m.Wv.weight]))
        ref.in_proj_bias.copy_(torch.cat([m.Wq.bias, m.Wk.bias, m.Wv.bias]))
        ref.out_proj.weight.copy_(m.fc.weight)
        ref.out_proj.bias.copy_(m.fc.bias)
    return ref


@pytest.mark.parametrize("path", golden_files("seed/MultiHeadAttention__*.pt"), ids=lambda p: p.name)
def test_seed_golden(path):
    g = torch.load(path, weights_only=True)
    m = SeedMHA(**g["kwargs"]).double().eval()
    m.load_state_dict(g["state_dict"], strict=True)
    assert list(m.state_dict()) == list(g["state_dict"])
    args = [g["inputs"][k] for k in g["args_order"]]
    out, attention = m(*args)
    torch.testing.assert_close(out, g["output"][0], **F64)
    torch.testing.assert_close(attention, g["output"][1], **F64)
    # The canonical class shares the layout and, for a head width whose sqrt is exact in float32
    # (the recorded case), the numbers.
    canon = MultiHeadAttention(g["kwargs"]["d_model"], g["kwargs"]["num_heads"]).double().eval()
    canon.load_state_dict(g["state_dict"], strict=True)
    if math.isqrt(canon.head_dim) ** 2 == canon.head_dim:
        torch.testing.assert_close(canon(*args), g["output"][0], **F64)


@pytest.mark.parametrize("fused", [True, False])
def test_seed_matches_plain_seed_code_with_masks_and_float32_scale(fused):
    torch.manual_seed(0)
    m = SeedMHA(12, 2).double()  # depth 6: sqrt(6) is not exact in float32
    Q, K = torch.randn(3, 4, 12, dtype=torch.float64), torch.randn(3, 6, 12, dtype=torch.float64)  # noqa: N806
    V = torch.randn(3, 6, 12, dtype=torch.float64)  # noqa: N806
    mask = (torch.rand(3, 1, 4, 6) > 0.4).long()  # integer mask, 0 = masked, as the seed allows
    mask[0, 0, 1] = 0  # a query with every key masked: the seed averages all values
    for msk in (None, mask, mask.bool(), mask.double()):
        with attnzoo.fused_attn(fused):  # the fully masked row on both paths
            out, attention = m(Q, K, V, msk)
        ref_out, ref_attention = seed_reference(m, Q, K, V, msk)
        torch.testing.assert_close(out, ref_out, **F64)
        torch.testing.assert_close(attention, ref_attention, **F64)
    scale_f64 = MultiHeadAttention(12, 2).double()
    scale_f64.load_state_dict(m.state_dict())
    assert (scale_f64(Q, K, V) - m(Q, K, V)[0]).abs().max() > 1e-12  # the float32 scale matters


def test_seed_and_canonical_share_state_dict_and_create_names():
    seed, canon = SeedMHA(16, 4), MultiHeadAttention(16, 4)
    assert (
        list(seed.state_dict())
        == list(canon.state_dict())
        == [f"{n}.{p}" for n in ("Wq", "Wk", "Wv", "fc") for p in ("weight", "bias")]
    )
    canon.load_state_dict(seed.state_dict(), strict=True)
    assert type(attnzoo.create("mha", dim=16, num_heads=4)) is MultiHeadAttention
    assert type(attnzoo.create("MultiHeadAttention", 16, num_heads=4)) is MultiHeadAttention
    built = attnzoo.create("mha", 64)
    assert (built.dim, built.num_heads, built.head_dim) == (64, 8, 8)  # num_heads defaults to 8
    assert (seed.d_model, seed.depth) == (16, 4)  # the seed's attribute names
    assert attnzoo.compat.MultiHeadAttention is SeedMHA and "MultiHeadAttention" in attnzoo.compat.__all__


def _inputs(batch=2, lq=5, lk=7, dim=16, dtype=torch.float64):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(batch, lq, dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, lk, dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, lk, dim, generator=gen, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("fused", [True, False])
def test_equals_torch_multihead_attention(fused):
    torch.manual_seed(1)
    m = MultiHeadAttention(16, 4).double().eval()
    ref = torch_mha_from(m).eval()
    q, k, v = _inputs()
    length_q, length_k = q.shape[1], k.shape[1]
    padding = torch.zeros(2, length_k, dtype=torch.bool)
    padding[0, -3:] = True  # torch: True = ignore this key
    causal_blocked = torch.ones(length_q, length_k, dtype=torch.bool).triu(1)  # torch: True = blocked
    float_mask = torch.randn(length_q, length_k, dtype=torch.float64)
    with attnzoo.fused_attn(fused):
        # self-attention (one fused projection), cross-attention (Lq != Lk), key is value
        torch.testing.assert_close(m(q), ref(q, q, q, need_weights=False)[0], **F64)
        torch.testing.assert_close(m(q, k, v), ref(q, k, v, need_weights=False)[0], **F64)
        torch.testing.assert_close(m(q, k), ref(q, k, k, need_weights=False)[0], **F64)
        # key padding: attnzoo's key_mask is True for real keys
        want = ref(q, k, v, key_padding_mask=padding, need_weights=False)[0]
        torch.testing.assert_close(m(q, k, v, key_mask=~padding), want, **F64)
        # causal (top-left aligned), as a flag and as a bool mask; bool True = may attend here
        want = ref(q, k, v, attn_mask=causal_blocked, need_weights=False)[0]
        torch.testing.assert_close(m(q, k, v, causal=True), want, **F64)
        torch.testing.assert_close(m(q, k, v, ~causal_blocked), want, **F64)
        # additive float mask plus key padding
        float_padding = torch.zeros(padding.shape, dtype=torch.float64).masked_fill(padding, float("-inf"))
        want = ref(q, k, v, attn_mask=float_mask, key_padding_mask=float_padding, need_weights=False)[0]
        torch.testing.assert_close(m(q, k, v, float_mask, key_mask=~padding), want, **F64)
        # a per-batch 3-D mask (B, L, S) applies to every head; torch takes (B*h, L, S)
        mask3 = torch.rand(2, length_q, length_k, generator=torch.Generator().manual_seed(0)) > 0.3
        mask3[..., 0] = True
        want = ref(q, k, v, attn_mask=(~mask3).repeat_interleave(4, dim=0), need_weights=False)[0]
        torch.testing.assert_close(m(q, k, v, mask3), want, **F64)
    # weights: torch averages the heads, attnzoo returns them per head
    out, weights = m(q, k, v, key_mask=~padding, need_weights=True)
    ref_out, ref_weights = ref(q, k, v, key_padding_mask=padding)
    torch.testing.assert_close(out, ref_out, **F64)
    torch.testing.assert_close(weights.mean(1), ref_weights, **F64)
    assert weights.shape == (2, 4, 5, 7) and torch.all(weights[0, :, :, -3:] == 0)


def test_gradients_equal_torch_multihead_attention():
    torch.manual_seed(2)
    m = MultiHeadAttention(16, 4).double().train()
    ref = torch_mha_from(m).train()
    q, k, v = (t.requires_grad_() for t in _inputs())
    out = m(q, k, v, causal=True)
    want = ref(
        q, k, v, is_causal=True, attn_mask=torch.ones(5, 7, dtype=torch.bool).triu(1), need_weights=False
    )[0]
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, m.Wq.weight, m.Wv.bias, m.fc.weight))
    ref_grads = torch.autograd.grad(
        want.square().sum(), (q, k, v, ref.in_proj_weight, ref.in_proj_bias, ref.out_proj.weight)
    )
    for g, r in zip(grads[:3], ref_grads[:3], strict=False):
        torch.testing.assert_close(g, r, **F64)
    torch.testing.assert_close(grads[3], ref_grads[3][:16], **F64)
    torch.testing.assert_close(grads[4], ref_grads[4][32:], **F64)
    torch.testing.assert_close(grads[5], ref_grads[5], **F64)


@pytest.mark.parametrize("fused", [True, False])
def test_fully_masked_query_gives_zeros_not_nan(fused):
    m = MultiHeadAttention(8, 2).double().eval()
    q, k, v = (t.requires_grad_() for t in _inputs(dim=8))
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[2] = False  # query 2 may attend to nothing
    key_mask = torch.ones(2, 7, dtype=torch.bool)
    key_mask[1] = False  # in batch element 1 every key is padding
    with attnzoo.fused_attn(fused):
        out, weights = m(q, k, v, mask, need_weights=True)
        plain = m(q, k, v, mask)
        padded = m(q, k, v, key_mask=key_mask)
        additive = m(q, k, v, torch.zeros(5, 7, dtype=torch.float64), key_mask=key_mask)
    torch.testing.assert_close(out[:, 2], m.fc.bias.expand(2, 8), **F64)  # fc(0) = bias
    assert torch.all(weights[:, :, 2] == 0) and torch.isfinite(out).all()
    torch.testing.assert_close(plain, out, **F64)
    torch.testing.assert_close(padded[1], m.fc.bias.expand(5, 8), **F64)
    torch.testing.assert_close(additive[1], m.fc.bias.expand(5, 8), **F64)
    # the other rows are untouched: they equal attention over their allowed keys only
    keep = mask.clone()
    keep[2] = True
    torch.testing.assert_close(out[:, [0, 1, 3, 4]], m(q, k, v, keep)[:, [0, 1, 3, 4]], **F64)
    grads = torch.autograd.grad((plain.sum() + padded.sum() + additive.sum()), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


def test_dropout_training_only_and_equal_to_a_plain_reference():
    torch.manual_seed(4)
    m = MultiHeadAttention(16, 4, attn_drop=0.5).double()
    q, k, v = _inputs()
    m.eval()
    plain = MultiHeadAttention(16, 4).double().eval()
    plain.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(q, k, v), plain(q, k, v), **F64)  # eval: no dropout
    m.train()
    assert not torch.allclose(m(q, k, v), plain(q, k, v))
    with attnzoo.fused_attn(False):  # math path: dropout on the weights, as F.dropout draws it
        torch.manual_seed(7)
        out = m(q, k, v)
        _, weights = plain(q, k, v, need_weights=True)
        torch.manual_seed(7)
        dropped = F.dropout(weights, p=0.5)
    heads = plain.Wv(v).view(2, 7, 4, 4).transpose(1, 2)
    want = plain.fc((dropped @ heads).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(out, want, **F64)


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="dim=10 must be divisible by num_heads=4"):
        MultiHeadAttention(10, 4)
    with pytest.raises(ValueError, match="dim=12 must be divisible by num_heads=8"):
        MultiHeadAttention(12)  # the default 8 heads
    with pytest.raises(ValueError, match="d_model=10 must be divisible by num_heads=4"):
        SeedMHA(10, 4)  # the seed's argument name
    with pytest.raises(TypeError, match="d_model must be an int"):
        SeedMHA(8.0, 2)
    with pytest.raises(TypeError, match="dim must be an int"):
        MultiHeadAttention(8.0, 2)
    with pytest.raises(ValueError, match="attn_drop"):
        MultiHeadAttention(8, 2, attn_drop=1.5)
    m = MultiHeadAttention(8, 2)
    q, k, v = _inputs(dim=8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"expects query of shape \(B, L, 8\)"):
        m(torch.randn(2, 5, 9), k, v)
    with pytest.raises(ValueError, match="expects key"):
        m(q, torch.randn(2, 7, 9), v)
    with pytest.raises(ValueError, match="expects value"):
        m(q, k, torch.randn(2, 6, 8))
    with pytest.raises(ValueError, match="expects key of shape .* with B=2"):
        m(q, torch.randn(3, 7, 8), torch.randn(3, 7, 8))
    with pytest.raises(ValueError, match=r"expects mask broadcastable to \(2, 2, 5, 7\), got \(5, 6\)"):
        m(q, k, v, torch.ones(5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="expects mask broadcastable"):
        m(q, k, v, torch.ones(3, 5, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expects key_mask of shape \(2, 7\)"):
        m(q, k, v, key_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="dtype"):
        m(q.long(), k, v)
    with pytest.raises(TypeError, match=r"key of dtype torch.float32 .*got torch.float64"):
        m(q, k.double(), v.double())  # the shared input check: the parameters' dtype, named per argument
    with pytest.raises(ValueError, match="expects mask broadcastable"):
        SeedMHA(8, 2)(q, k, v, torch.ones(3, 1, 5, 7))


def test_without_input_projections_splits_the_inputs_into_heads():
    m = MultiHeadAttention(8, 2, in_proj=False).double()
    q, k, v = (torch.randn(2, n, 8, dtype=torch.float64) for n in (5, 7, 7))
    heads = [t.view(2, -1, 2, 4).transpose(1, 2) for t in (q, k, v)]  # (B, h, n, d)
    probs = (heads[0] @ heads[1].transpose(-1, -2) / 2.0).softmax(-1)
    expected = m.fc((probs @ heads[2]).transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(m(q, k, v), expected, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match=r"in_proj=False .* must equal dim=8, got 12 and 12"):
        MultiHeadAttention(8, 2, head_dim=6, in_proj=False)
