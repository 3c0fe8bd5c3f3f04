"""Sequence attention (issue 8): every scoring rule against a plain float64 reference, masks, errors,
the seed's Attn against its recorded outputs and against the seed's algorithm written out here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import golden_files
from torch.utils._python_dispatch import TorchDispatchMode

import attnzoo
import attnzoo.compat
from attnzoo import (
    AdditiveAttention,
    ConcatAttention,
    DotProductAttention,
    GeneralAttention,
    LocationAttention,
)
from attnzoo.compat import Attn

B, LQ, LK, DQ, DK, DV = 3, 4, 6, 5, 7, 2
F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Plain references (float64, loops over queries and keys, the concatenation built explicitly)


def ref_softmax(scores, keep):
    """Softmax over the last dim where ``keep``; 0 elsewhere; rows with nothing kept are all 0."""
    scores = scores.masked_fill(~keep, -1e300)
    e = torch.exp(scores - scores.amax(-1, keepdim=True)) * keep
    total = e.sum(-1, keepdim=True)
    return torch.where(total > 0, e / total.clamp_min(1e-300), torch.zeros_like(e))


def ref_scores(module, q, k):
    """``(B, Lq, Lk)`` scores of each rule, written out one (query, key) pair at a time."""
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    s = torch.zeros(b, lq, lk, dtype=q.dtype)
    for n in range(b):
        for i in range(lq):
            for j in range(lk):
                qi, kj = q[n, i], k[n, j]
                if isinstance(module, ConcatAttention):
                    s[n, i, j] = module.attn.weight[0] @ torch.cat([qi, kj]) + module.attn.bias[0]
                elif isinstance(module, AdditiveAttention):
                    h = torch.tanh(module.attn.weight @ torch.cat([qi, kj]) + module.attn.bias)
                    s[n, i, j] = module.v.weight[0] @ h
                elif isinstance(module, GeneralAttention):
                    s[n, i, j] = qi @ module.attn.weight.T @ kj  # Luong: h_t^T W_a h_s, W_a = attn.weight^T
                else:
                    s[n, i, j] = qi @ kj / (math.sqrt(q.shape[-1]) if module.qk_scale != 1.0 else 1.0)
    return s


def reference(module, q, k, v, mask=None):
    keep = torch.ones(q.shape[0], q.shape[1], k.shape[1], dtype=torch.bool)
    if mask is not None:
        keep = keep & (mask[:, None, :] if mask.ndim == 2 else mask)
    w = ref_softmax(ref_scores(module, q, k), keep)
    return torch.einsum("bij,bjd->bid", w, v), w


def make_rule(name):
    torch.manual_seed(0)
    if name == "concat":
        m = ConcatAttention(DQ, DK)
    elif name == "additive":
        m = AdditiveAttention(DQ, DK, hidden_dim=8)
    elif name == "general":
        m = GeneralAttention(DQ, DK)
    elif name == "dot":
        m = DotProductAttention(DK)
    else:
        m = DotProductAttention(DK, qk_scale=1.0)
    for p in m.parameters():  # larger weights than the default init, so the scores vary
        torch.nn.init.normal_(p, std=0.7)
    return m.double().eval()


def make_inputs(rule, requires_grad=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    dq = DK if rule.startswith("dot") else DQ
    q = torch.randn(B, LQ, dq, generator=g, dtype=F64)
    k = torch.randn(B, LK, DK, generator=g, dtype=F64)
    v = torch.randn(B, LK, DV, generator=g, dtype=F64)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def padding_mask():
    lengths = torch.tensor([LK, 3, 1])
    return torch.arange(LK)[None, :] < lengths[:, None]  # (B, Lk)


def full_mask():
    g = torch.Generator().manual_seed(5)
    m = torch.rand(B, LQ, LK, generator=g) > 0.5
    m[1, 2] = False  # one query that may attend to nothing
    m[0, 0] = True
    return m


RULES = ["concat", "additive", "dot", "dot_unscaled", "general"]
MASKS = {"none": lambda: None, "padding": padding_mask, "full": full_mask}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "math"])
@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("rule", RULES)
def test_rule_matches_reference(rule, mask_kind, fused):
    module = make_rule(rule)
    q, k, v = make_inputs(rule)
    mask = MASKS[mask_kind]()
    ref_out, ref_w = reference(module, q, k, v, mask)
    with attnzoo.fused_attn(fused):
        out = module(q, k, v, mask)
        out_w, w = module(q, k, v, mask, need_weights=True)
    assert isinstance(out, torch.Tensor) and out.shape == (B, LQ, DV)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out_w, ref_out, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(w, ref_w, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("rule", RULES)
def test_gradients_match_reference(rule):
    module = make_rule(rule)
    mask = full_mask()
    xs = make_inputs(rule, requires_grad=True)
    grad_out = torch.randn(B, LQ, DV, dtype=F64)
    (module(*xs, mask) * grad_out).sum().backward()
    ours = [x.grad.clone() for x in xs] + [p.grad.clone() for p in module.parameters()]
    for t in [*xs, *module.parameters()]:
        t.grad = None
    (reference(module, *xs, mask)[0] * grad_out).sum().backward()
    theirs = [x.grad for x in xs] + [p.grad for p in module.parameters()]
    for a, b in zip(ours, theirs, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("rule", RULES)
def test_weights_sum_to_one_zero_where_masked_and_dead_rows_are_zero(rule):
    module = make_rule(rule)
    q, k, v = make_inputs(rule)
    mask = full_mask()
    out, w = module(q, k, v, mask, need_weights=True)
    alive = mask.any(-1)
    torch.testing.assert_close(w.sum(-1)[alive], torch.ones(int(alive.sum()), dtype=F64))
    assert (w[~mask] == 0).all()
    assert (w[1, 2] == 0).all() and (out[1, 2] == 0).all()
    assert not alive[1, 2]


@pytest.mark.parametrize("rule", RULES)
def test_padding_does_not_change_the_result(rule):
    """Keys beyond a sequence's length, masked, change nothing: same as cutting them off."""
    module = make_rule(rule)
    q, k, v = make_inputs(rule)
    mask = padding_mask()
    out = module(q, k, v, mask)
    for n, length in enumerate(mask.sum(-1).tolist()):
        alone = module(q[n : n + 1], k[n : n + 1, :length], v[n : n + 1, :length])
        torch.testing.assert_close(out[n : n + 1], alone, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("rule", ["concat", "additive", "general"])
def test_bfloat16_scores_take_their_softmax_in_float32(rule):
    module = make_rule(rule).float()
    q, k, v = (t.float() for t in make_inputs(rule))
    ref = module(q, k, v, padding_mask())
    low = module.to(torch.bfloat16)(*(t.bfloat16() for t in (q, k, v)), padding_mask())
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).norm() / ref.norm() < 0.05


def test_concat_weights_do_not_depend_on_the_query():
    """Rule 1 applied key by key: the query's part of the score is the same for every key and cancels."""
    module = make_rule("concat")
    q, k, v = make_inputs("concat")
    _, w1 = module(q, k, v, need_weights=True)
    _, w2 = module(torch.randn_like(q) * 10, k, v, need_weights=True)
    torch.testing.assert_close(w1, w2, atol=1e-12, rtol=1e-10)
    assert w1.std() > 0.01  # ... but they do depend on the keys


class _RecordShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("rule", ["concat", "additive"])
def test_rules_on_the_concatenation_never_build_it(rule):
    module = make_rule(rule).train()
    xs = make_inputs(rule, requires_grad=True)
    with _RecordShapes() as rec:
        module(*xs, padding_mask()).sum().backward()
    concat = (B, LQ, LK, DQ + DK)
    assert rec.shapes and concat not in rec.shapes
    assert not any(len(s) >= 3 and s[-1] == DQ + DK for s in rec.shapes), rec.shapes


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("rule", RULES)
def test_bad_inputs_name_expected_and_given(rule):
    module = make_rule(rule)
    q, k, v = make_inputs(rule)
    with pytest.raises(ValueError, match=r"keys of shape \(3, Lk, 7\) with B=3, got \(2, 6, 7\)"):
        module(q, k[:2], v)
    with pytest.raises(ValueError, match=r"values of shape \(3, 6, dv\) with B=3, got \(2, 6, 2\)"):
        module(q, k, v[:2])
    with pytest.raises(ValueError, match=r"values of shape \(3, 6, dv\) with Lk=6, got \(3, 5, 2\)"):
        module(q, k, v[:, :5])
    with pytest.raises(ValueError, match=r"keys of shape \(3, Lk, \d\) with dk=\d, got \(3, 6, 8\)"):
        module(q, torch.cat([k, k[..., :1]], -1), v)
    with pytest.raises(ValueError, match=r"expects mask of shape \(B, Lk\) = \(3, 6\) or \(B, Lq, Lk\) = "
                                         r"\(3, 4, 6\), got \(3, 5\)"):
        module(q, k, v, padding_mask()[:, :5])
    with pytest.raises(ValueError, match=r"got \(3, 1, 6\)"):
        module(q, k, v, padding_mask()[:, None])
    with pytest.raises(TypeError, match="bool tensor .True = may attend., got torch.float64"):
        module(q, k, v, padding_mask().double())
    # parameter-less modules compare the inputs; the others name the parameters' dtype (shared check)
    with pytest.raises(TypeError, match=r"one dtype, got torch.float64, torch.float32|"
                                        r"keys of dtype torch.float64 \(the dtype of its parameters\), "
                                        r"got torch.float32"):
        module(q, k.float(), v)
    with pytest.raises(ValueError, match=r"query of shape \(B, Lq, \w+\) \(3-D\), got \(3, \d\) \(2-D\)"):
        module(q[:, 0], k, v)


@pytest.mark.parametrize("rule", ["concat", "additive", "general"])
def test_wrong_query_features_name_expected(rule):
    module = make_rule(rule)
    q, k, v = make_inputs(rule)
    with pytest.raises(ValueError, match=r"query of shape \(B, Lq, 5\) with dq=5, got \(3, 4, 4\)"):
        module(q[..., :4], k, v)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="query_dim must be >= 1, got 0"):
        ConcatAttention(0, 3)
    with pytest.raises(TypeError, match="key_dim must be an int"):
        AdditiveAttention(3, 2.5)
    with pytest.raises(ValueError, match="hidden_dim must be >= 1, got -1"):
        AdditiveAttention(3, 3, hidden_dim=-1)
    with pytest.raises(TypeError, match="qk_scale must be a number"):
        DotProductAttention(4, qk_scale="yes")
    with pytest.raises(ValueError, match="qk_scale must be a finite number > 0, got 0"):
        DotProductAttention(4, qk_scale=0)
    with pytest.raises(TypeError, match="DotProductAttention: query_dim must be an int"):
        DotProductAttention(None)
    with pytest.raises(TypeError, match="output_dim must be an int"):
        LocationAttention(2, 2, 3, 4, 2.0)
    with pytest.raises(TypeError, match="Attn: value_size1 must be an int"):
        Attn(2, 2, "3", 4, 5)
    with pytest.raises(ValueError, match="Attn: query_size must be >= 1, got 0"):  # the seed's name
        Attn(query_size=0, key_size=2, value_size1=3, value_size2=4, output_size=5)
    with pytest.raises(ValueError, match="Attn: output_size must be >= 1, got 0"):
        Attn(2, 2, 3, 4, 0)


def test_defaults_device_and_dtype():
    assert ConcatAttention(6).key_dim == 6 and GeneralAttention(6).attn.weight.shape == (6, 6)
    assert AdditiveAttention(6, 4).hidden_dim == 4 and AdditiveAttention(6).hidden_dim == 6
    dot = DotProductAttention(16)
    assert dot.qk_scale == 0.25 and DotProductAttention(16, qk_scale=1.0).qk_scale == 1.0
    with pytest.raises(ValueError, match=r"keys of shape \(2, Lk, 16\) with dk=16, got \(2, 5, 8\)"):
        dot(torch.randn(2, 3, 16), torch.randn(2, 5, 8), torch.randn(2, 5, 8))  # the width is checked
    loc = LocationAttention(6)
    assert (loc.key_dim, loc.num_positions, loc.value_dim, loc.output_dim) == (6, 10, 6, 6)
    for cls in (ConcatAttention, AdditiveAttention, GeneralAttention, LocationAttention):
        meta = cls(6, device="meta")
        assert all(p.device.type == "meta" for p in meta.parameters())
        assert all(p.dtype == F64 for p in cls(6, dtype=F64).parameters())


# ---------------------------------------------------------------------------------------------
# The seed's Attn and its batched form


def seed_attn_reference(m, Q, K, V):  # noqa: N803
    """The seed's forward, step by step (cat, linear, softmax, bmm, cat, linear)."""
    w = F.softmax(F.linear(torch.cat((Q[0], K[0]), 1), m.attn.weight, m.attn.bias), dim=1)
    applied = torch.bmm(w.unsqueeze(0), V)
    out = F.linear(torch.cat((Q[0], applied[0]), 1), m.attn_combine.weight, m.attn_combine.bias).unsqueeze(0)
    return out, w


GOLDEN = golden_files("seed/Attn__*.pt")


@pytest.mark.parametrize("path", GOLDEN, ids=[p.name for p in GOLDEN])
@pytest.mark.parametrize("by_name", [False, True], ids=["class", "create"])
def test_attn_equals_golden(path, by_name):
    g = torch.load(path, weights_only=True)
    m = attnzoo.create("Attn", **g["kwargs"]) if by_name else Attn(**g["kwargs"])
    assert type(m) is Attn
    m = m.double().eval()
    m.load_state_dict(g["state_dict"], strict=True)
    with torch.no_grad():
        out = m(*[g["inputs"][k] for k in g["args_order"]])
    assert isinstance(out, tuple) and len(out) == len(g["output"]) == 2
    for ours, recorded in zip(out, g["output"], strict=True):
        assert ours.shape == recorded.shape and ours.dtype == recorded.dtype
        torch.testing.assert_close(ours, recorded, atol=1e-10, rtol=1e-10)


def test_golden_files_are_present():
    if not GOLDEN:
        pytest.skip("no golden directory (shared/golden/seed/Attn__*.pt)")
    assert len(GOLDEN) >= 1


@pytest.mark.parametrize("n,sizes", [(1, (3, 5, 4, 6, 2)), (4, (8, 2, 7, 3, 5)), (2, (1, 1, 1, 1, 1))])
def test_attn_other_configurations_equal_the_seed_algorithm(n, sizes):
    torch.manual_seed(3)
    m = Attn(*sizes).double()
    for p in m.parameters():
        torch.nn.init.normal_(p)
    qs, ks, l, dv, _ = sizes
    Q, K, V = (torch.randn(1, *s, dtype=F64) for s in ((n, qs), (n, ks), (l, dv)))  # noqa: N806
    out, w = m(Q, K, V)
    ref_out, ref_w = seed_attn_reference(m, Q, K, V)
    assert out.shape == ref_out.shape and w.shape == ref_w.shape == (n, l)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(w, ref_w, atol=1e-12, rtol=1e-10)


def test_attn_rejects_a_leading_dim_other_than_one():
    m = Attn(4, 4, 5, 3, 2)
    with pytest.raises(ValueError, match=r"Attn expects Q with a leading dimension of 1 .*got \(2, 1, 4\)"):
        m(torch.randn(2, 1, 4), torch.randn(2, 1, 4), torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match=r"Attn expects V of shape \(1, 5, 3\) with value_size1=5, "
                                         r"got \(1, 6, 3\)"):
        m(torch.randn(1, 1, 4), torch.randn(1, 1, 4), torch.randn(1, 6, 3))


def test_location_attention_is_attn_over_a_batch_with_the_same_state_dict():
    torch.manual_seed(4)
    seed = Attn(query_size=5, key_size=3, value_size1=6, value_size2=4, output_size=7).double()
    batched = LocationAttention(query_dim=5, key_dim=3, num_positions=6, value_dim=4, output_dim=7).double()
    batched.load_state_dict(seed.state_dict(), strict=True)
    q, k, v = (torch.randn(3, *s, dtype=F64) for s in ((2, 5), (2, 3), (6, 4)))
    out, w = batched(q, k, v, need_weights=True)
    assert out.shape == (3, 2, 7) and w.shape == (3, 2, 6)
    for n in range(3):
        ref_out, ref_w = seed_attn_reference(seed, q[n : n + 1], k[n : n + 1], v[n : n + 1])
        torch.testing.assert_close(out[n : n + 1], ref_out, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(w[n], ref_w, atol=1e-12, rtol=1e-10)


def test_location_attention_mask():
    torch.manual_seed(4)
    m = LocationAttention(5, 3, 6, 4, 7).double()
    q, k, v = (torch.randn(2, *s, dtype=F64) for s in ((2, 5), (2, 3), (6, 4)))
    mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    _, w = m(q, k, v, mask, need_weights=True)
    assert (w[1, :, 2:] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, dtype=F64))
    scores = m.attn(torch.cat([q, k], -1))
    torch.testing.assert_close(w[1], ref_softmax(scores[1], mask[1].expand(2, 6)), atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match=r"key of shape \(2, 2, 3\) with Lq=2, got \(2, 3, 3\)"):
        m(q, torch.randn(2, 3, 3, dtype=F64), v)


def test_public_names():
    for name in ["concat", "additive", "dot", "general", "location"]:
        assert attnzoo.get_spec(name).layout == "SEQ2SEQ"
    assert attnzoo.get_spec("Attn").seed_cls is Attn and "Attn" in attnzoo.compat.__all__
    assert type(attnzoo.create("bahdanau", query_dim=2, key_dim=3)) is AdditiveAttention
    assert type(attnzoo.create("luong", query_dim=2, key_dim=3)) is GeneralAttention
