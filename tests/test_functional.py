"""attnzoo.functional.attend against a plain float64 reference, forward and backward, both paths."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.functional import (
    attend,
    gather_relative_bias,
    relative_position_index_1d,
    relative_position_index_2d,
)


def reference(q, k, v, *, bias=None, mask=None, causal=False, scale=None):
    """Textbook attention, written independently of attnzoo, with 'dead rows give zero'."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = torch.einsum("bhld,bhsd->bhls", q, k) * scale
    allowed = torch.ones_like(logits, dtype=torch.bool)
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            logits = logits + mask
    if causal:
        L, S = logits.shape[-2:]
        allowed = allowed & (torch.arange(S)[None, :] <= torch.arange(L)[:, None])
    allowed = allowed & torch.isfinite(logits)
    logits = logits.masked_fill(~allowed, -1e300)
    weights = torch.exp(logits - logits.amax(-1, keepdim=True)) * allowed
    total = weights.sum(-1, keepdim=True)
    weights = torch.where(total > 0, weights / total.clamp_min(1e-300), torch.zeros_like(weights))
    return torch.einsum("bhls,bhse->bhle", weights, v), weights


def make(B=2, h=3, L=5, S=7, d=4, e=6, dtype=torch.float64, grad=False):
    q = torch.randn(B, h, L, d, dtype=dtype, requires_grad=grad)
    k = torch.randn(B, h, S, d, dtype=dtype, requires_grad=grad)
    v = torch.randn(B, h, S, e, dtype=dtype, requires_grad=grad)
    return q, k, v


CASES = {
    "plain": {},
    "scale": {"scale": 0.37},
    "bool_mask": {"mask": lambda L, S: torch.rand(2, 1, L, S) > 0.3},
    "float_mask": {"mask": lambda L, S: torch.randn(1, 3, L, S, dtype=torch.float64)},
    "bias": {"bias": lambda L, S: torch.randn(3, L, S, dtype=torch.float64)},
    "bias_and_mask": {
        "bias": lambda L, S: torch.randn(3, L, S, dtype=torch.float64),
        "mask": lambda L, S: torch.rand(L, S) > 0.4,
    },
    "key_padding": {"mask": lambda L, S: (torch.arange(S) < torch.tensor([[4], [7]]))[:, None, None, :]},
    "causal": {"causal": True},
    "causal_and_mask": {"causal": True, "mask": lambda L, S: torch.rand(2, 3, L, S) > 0.3},
}


def _build(case, L, S):
    return {k: (v(L, S) if callable(v) else v) for k, v in CASES[case].items()}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "math"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lengths", [(5, 5), (5, 7), (7, 3)], ids=["self", "Lq<Lk", "Lq>Lk"])
def test_attend_matches_reference_forward_and_backward(case, lengths, fused):
    L, S = lengths
    q, k, v = make(L=L, S=S, grad=True)
    kwargs = _build(case, L, S)
    with attnzoo.fused_attn(fused):
        out = attend(q, k, v, **kwargs)
    ref, _ = reference(q, k, v, **kwargs)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("case", list(CASES))
def test_weights_match_reference(case):
    q, k, v = make(L=5, S=7)
    kwargs = _build(case, 5, 7)
    out, weights = attend(q, k, v, need_weights=True, **kwargs)
    ref, ref_w = reference(q, k, v, **kwargs)
    torch.testing.assert_close(weights, ref_w, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "math"])
@pytest.mark.parametrize("kind", ["bool", "float_inf"])
def test_fully_masked_row_gives_zeros_not_nan(fused, kind):
    q, k, v = make(L=4, S=6, grad=True)
    keep = torch.ones(4, 6, dtype=torch.bool)
    keep[1] = False  # query 1 may attend to nothing
    mask = (
        keep if kind == "bool" else torch.zeros(4, 6, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    )
    with attnzoo.fused_attn(fused):
        out = attend(q, k, v, mask=mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    ref, _ = reference(q, k, v, mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    _, weights = attend(q.detach(), k.detach(), v.detach(), mask=mask, need_weights=True)
    assert torch.equal(weights[:, :, 1], torch.zeros_like(weights[:, :, 1]))


def test_fused_and_math_paths_agree_float32():
    q, k, v = make(B=2, h=4, L=33, S=45, d=16, e=16, dtype=torch.float32)
    bias = torch.randn(4, 33, 45)
    with attnzoo.fused_attn(True):
        fused = attend(q, k, v, bias=bias, causal=True)
    with attnzoo.fused_attn(False):
        math_out = attend(q, k, v, bias=bias, causal=True)
    torch.testing.assert_close(fused, math_out, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_float32(dtype):
    q, k, v = make(B=2, h=2, L=16, S=16, d=8, e=8, dtype=torch.float32)
    ref = attend(q, k, v)
    for fused in (True, False):
        with attnzoo.fused_attn(fused):
            out = attend(q.to(dtype), k.to(dtype), v.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_dropout_only_in_effect_when_asked():
    q, k, v = make(dtype=torch.float32)
    torch.testing.assert_close(attend(q, k, v, dropout_p=0.0), attend(q, k, v))
    torch.manual_seed(1)
    dropped = attend(q, k, v, dropout_p=0.5)
    assert not torch.allclose(dropped, attend(q, k, v))


def test_env_var_switches_path(monkeypatch):
    monkeypatch.setenv("ATTNZOO_FUSED_ATTN", "0")
    assert not attnzoo.fused_enabled()
    with attnzoo.fused_attn(True):
        assert attnzoo.fused_enabled()
    monkeypatch.setenv("ATTNZOO_FUSED_ATTN", "1")
    assert attnzoo.fused_enabled()


def test_fused_path_keeps_no_quadratic_tensor_for_backward():
    """Without need_weights nothing of size L x S is saved for backward (fused SDPA kernel)."""
    B, h, L, d = 1, 1, 2048, 8
    q, k, v = make(B=B, h=h, L=L, S=L, d=d, e=d, dtype=torch.float32, grad=True)
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attend(q, k, v).sum()
    assert saved and max(saved) < L * L // 4
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), attnzoo.fused_attn(False):
        attend(q, k, v).sum()
    assert max(saved) >= L * L  # the math path does keep it: the check can fail


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((torch.randn(2, 5, 4),) * 3, {}, ValueError, r"q of shape \(B, h, L, d\)"),
        (
            (torch.randn(1, 2, 5, 4), torch.randn(1, 2, 6, 3), torch.randn(1, 2, 6, 4)),
            {},
            ValueError,
            "expects k",
        ),
        (
            (torch.randn(1, 2, 5, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 7, 4)),
            {},
            ValueError,
            "expects v",
        ),
        (
            (torch.randn(1, 2, 5, 4), torch.randn(1, 3, 6, 4), torch.randn(1, 3, 6, 4)),
            {},
            ValueError,
            r"\(B, h\)",
        ),
        (
            (torch.randn(1, 2, 5, 4),) * 3,
            {"mask": torch.ones(3, 5, dtype=torch.bool)},
            ValueError,
            "broadcastable",
        ),
        ((torch.randn(1, 2, 5, 4),) * 3, {"mask": torch.ones(5, 5, dtype=torch.int64)}, TypeError, "mask"),
        ((torch.randn(1, 2, 5, 4),) * 3, {"bias": torch.ones(5, 5, dtype=torch.bool)}, TypeError, "bias"),
        ((torch.randint(0, 3, (1, 2, 5, 4)),) * 3, {}, TypeError, "floating-point"),
        (
            (torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4).double(), torch.randn(1, 2, 5, 4)),
            {},
            TypeError,
            "dtype",
        ),
        ((torch.randn(1, 2, 5, 4),) * 3, {"dropout_p": 1.5}, ValueError, "dropout_p"),
        ((torch.randn(1, 2, 5, 4),) * 3, {"dropout_p": "0.1"}, TypeError, "dropout_p to be a number"),
        ((torch.randn(1, 2, 5, 4),) * 3, {"dropout_p": math.nan}, ValueError, "finite dropout_p"),
        ((torch.randn(1, 2, 5, 4),) * 3, {"scale": "0.5"}, TypeError, "scale to be a number, got str"),
        ((torch.randn(1, 2, 5, 4),) * 3, {"scale": torch.tensor(0.5)}, TypeError, "scale to be a number"),
        ((torch.randn(1, 2, 5, 4),) * 3, {"scale": math.inf}, ValueError, "finite scale, got inf"),
        ((torch.randn(1, 2, 5, 4),) * 3, {"causal": 1}, TypeError, "causal to be a bool, got int"),
        ((torch.randn(1, 2, 5, 4),) * 3, {"need_weights": "no"}, TypeError, "need_weights to be a bool"),
        ((torch.randn(1, 2, 5, 0),) * 3, {}, ValueError, "head width d >= 1"),
        (
            (torch.randn(1, 2, 5, 4, device="meta"), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)),
            {},
            ValueError,
            r"k on the device of q \(meta\), got cpu",
        ),
        (
            (torch.randn(1, 2, 5, 4),) * 3,
            {"mask": torch.ones(5, 5, dtype=torch.bool, device="meta")},
            ValueError,
            r"mask on the device of q \(cpu\), got meta",
        ),
        ((torch.randn(1, 2, 5, 4),) * 3, {"bias": torch.zeros(5, 5, device="meta")}, ValueError, "bias on"),
    ],
)
def test_bad_input_raises_clear_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        attend(*args, **kwargs)


def test_numpy_bools_are_taken_as_switches_as_torch_takes_them():
    np = pytest.importorskip("numpy")
    q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)
    torch.testing.assert_close(attend(q, k, v, causal=np.True_), attend(q, k, v, causal=True))
    out, weights = attend(q, k, v, need_weights=np.True_)
    assert weights.shape == (1, 2, 5, 5)
    module = attnzoo.create("se", 8).eval()
    x = torch.randn(2, 8, 3, 3)
    assert isinstance(module(x, need_weights=np.True_), tuple)
    with pytest.raises(TypeError, match="need_weights must be a bool, got numpy.float64"):
        module(x, need_weights=np.float64(1.0))


def test_relative_position_index_1d():
    idx = relative_position_index_1d(4)
    assert idx.shape == (4, 4)
    for i in range(4):
        for j in range(4):
            assert idx[i, j] == i - j + 3


def test_relative_position_index_2d_matches_swin_formula():
    wh, ww = 3, 4
    idx = relative_position_index_2d((wh, ww))
    assert idx.shape == (12, 12)
    for i in range(12):
        for j in range(12):
            dh, dw = i // ww - j // ww, i % ww - j % ww
            assert idx[i, j] == (dh + wh - 1) * (2 * ww - 1) + (dw + ww - 1)
    assert int(idx.max()) == (2 * wh - 1) * (2 * ww - 1) - 1


def test_gather_relative_bias():
    table = torch.randn(7, 2)
    idx = relative_position_index_1d(4)
    bias = gather_relative_bias(table, idx)
    assert bias.shape == (2, 4, 4)
    assert bias[1, 2, 0] == table[2 - 0 + 3, 1]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: relative_position_index_1d(2.5), TypeError, "length to be an int, got float 2.5"),
        (lambda: relative_position_index_1d(-1), ValueError, "length >= 1, got -1"),
        (lambda: relative_position_index_2d((2.0, 3)), TypeError, "window_size to be an int, got float"),
        (lambda: relative_position_index_2d((-1, 3)), ValueError, "window_size >= 1, got -1"),
        (lambda: relative_position_index_2d(3), TypeError, r"window_size to be a pair \(Wh, Ww\), got 3"),
    ],
)
def test_relative_position_index_refuses_bad_sizes(call, error, match):
    # 2.5 gave a float (3, 3) index, negative sizes a raw RuntimeError from torch.arange
    with pytest.raises(error, match=match):
        call()


def test_gather_relative_bias_refuses_an_index_outside_the_table():
    table, idx = torch.randn(7, 2), relative_position_index_1d(4)
    # a negative index silently counted from the table's end; too large a one raised a raw IndexError
    for bad, got in ((idx - 7, r"\[-7, -1\]"), (idx + 1, r"\[1, 7\]")):
        with pytest.raises(ValueError, match=rf"index values in \[0, 7\) \(the table's T\), got {got}"):
            gather_relative_bias(table, bad)
    with pytest.raises(TypeError, match="int64 \\(or int32\\) index, got torch.bool"):
        gather_relative_bias(table, torch.ones(4, 4, dtype=torch.bool))  # would index as a mask
    with pytest.raises(TypeError, match="index to be a torch.Tensor, got list"):
        gather_relative_bias(table, [[0]])
    assert gather_relative_bias(table, idx[:0, :0]).shape == (2, 0, 0)  # reshape(-1) failed on it


def test_autocast_mixed_dtypes_run_in_autocast_dtype():
    q = torch.randn(1, 2, 5, 4, dtype=torch.bfloat16)
    k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    with pytest.raises(TypeError, match="one dtype"):
        attend(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, k, v)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), attend(q.float(), k, v), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "math"])
def test_one_dimensional_mask_broadcasts(fused):
    q, k, v = make(L=5, S=7)
    keep = torch.rand(7) > 0.3
    keep[0] = True
    with attnzoo.fused_attn(fused):
        out = attend(q, k, v, mask=keep)
    ref, _ = reference(q, k, v, mask=keep.expand(5, 7))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "math"])
@pytest.mark.parametrize("lengths", [(0, 3), (3, 0), (0, 0)], ids=["L=0", "S=0", "both"])
def test_empty_query_or_key_lengths_run_on_both_paths(fused, lengths):
    """No query gives an empty output; no key is a fully masked row (zeros), on both paths alike."""
    length_q, length_k = lengths
    q, k, v = torch.randn(2, 2, length_q, 4), torch.randn(2, 2, length_k, 4), torch.randn(2, 2, length_k, 3)
    with attnzoo.fused_attn(fused):
        out = attend(q, k, v)
    assert out.shape == (2, 2, length_q, 3)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "math"])
def test_meta_inputs_give_meta_outputs(fused):
    """Shape inference on the meta device: no value is read (a dead-row test would call .item())."""
    q, k, v = (torch.randn(2, 2, 5, 4, device="meta") for _ in range(3))
    keep = torch.ones(5, 5, dtype=torch.bool, device="meta")
    with attnzoo.fused_attn(fused):
        out = attend(q, k, v, mask=keep)
    assert out.device.type == "meta" and out.shape == (2, 2, 5, 4)


@pytest.mark.parametrize("kind", ["bias", "mask"])
def test_torch_func_grad_of_the_queries_with_a_parameter_bias(kind):
    """torch.func.grad of q alone while a float bias or mask is built from a tensor that requires grad:
    the functorch level does not show that need, and the CPU flash kernel refused the bias."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 5, 4, generator=gen).unbind(0)
    table = torch.randn(5, 5, generator=gen, requires_grad=True)
    loss = lambda q_: attend(q_, k, v, **{kind: table * 2}).square().sum()  # noqa: E731
    eager = q.clone().requires_grad_()
    (ref,) = torch.autograd.grad(loss(eager), eager)
    torch.testing.assert_close(torch.func.grad(loss)(q), ref)


@pytest.mark.parametrize("kind", ["mask", "bias"])
def test_zero_and_one_dimensional_masks_broadcast_like_their_full_forms(kind):
    """A 0-d or 1-d mask or bias broadcasts as SDPA's does (it failed inside the dead-row search)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    terms = [torch.tensor(0.5, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64),
             torch.tensor(float("-inf"), dtype=torch.float64)]
    if kind == "mask":
        terms += [torch.tensor(True), torch.tensor([True, False, True, True])]
    for term in terms:
        got = attend(q, k, v, **{kind: term})
        want = attend(q, k, v, **{kind: term.expand(2, 3, 4, 4)})
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert attend(q, k, v, **{kind: terms[2]}).abs().max() == 0  # every key masked: zeros, not NaN


@pytest.mark.parametrize("value", ["False", 0, None, 1.0])
def test_fused_attn_takes_bools_only(value):
    with pytest.raises(TypeError, match="fused_attn expects enabled to be a bool"):
        with attnzoo.fused_attn(value):
            pass
    assert attnzoo.fused_enabled()  # nothing was pushed


def test_compiled_attend_takes_a_scale_that_changes_between_calls():
    """A float that changes between compiles of one frame becomes a SymFloat under torch.compile, and the
    finiteness check used math.isfinite, which cannot take one: the second scale failed with 'torch.* op
    returned non-Tensor' (two Next-ViT attentions of different head widths, compiled apart, hit it)."""
    f = torch.compile(lambda q, k, v, s: attend(q, k, v, scale=s), backend="eager", fullgraph=True)
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    for scale in (0.5, 0.25, 0.125):
        torch.testing.assert_close(f(q, q, q, scale), attend(q, q, q, scale=scale))
