"""Dropout then the product with the values (`attnzoo.kernels.dropout`): the same generator draws and
the same numbers as ``F.dropout(w, p) @ v``, one (L, S) map fewer saved for backward, and the
fallbacks where the kernel steps aside."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.kernels.kernel_checks import Holder, assert_flop_counter, assert_gradgradcheck, assert_torch_func

from attnzoo.functional import attend
from attnzoo.kernels import dropout
from attnzoo.kernels.dropout import dropout_product

SHAPES = [
    ((5, 7), (7, 4)), ((2, 6, 6), (2, 6, 3)), ((2, 3, 5, 9), (2, 3, 9, 8)), ((1, 1, 1, 1), (1, 1, 1, 2)),
]


def _inputs(w_shape, v_shape, dtype=torch.float64):
    gen = torch.Generator().manual_seed(sum(w_shape) * 7 + sum(v_shape))
    w = torch.randn(w_shape, generator=gen, dtype=dtype).softmax(-1).requires_grad_()
    v = torch.randn(v_shape, generator=gen, dtype=dtype).requires_grad_()
    return w, v


def _seeded(fn, seed=11):
    """`fn` with the global generator reset before each call, so every call drops the same entries."""

    def run(*args):
        torch.manual_seed(seed)
        return fn(*args)

    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize(("w_shape", "v_shape"), SHAPES)
def test_same_draws_and_numbers_as_torch_dropout(w_shape, v_shape, p, dtype):
    w, v = _inputs(w_shape, v_shape, dtype)
    grad = torch.randn(*w_shape[:-1], v_shape[-1], dtype=dtype)
    torch.manual_seed(3)
    out = dropout_product(w, v, p)
    grads = torch.autograd.grad(out, (w, v), grad)
    after = torch.rand(4)
    torch.manual_seed(3)
    ref = F.dropout(w, p) @ v
    ref_grads = torch.autograd.grad(ref, (w, v), grad)
    # bit for bit: the same Bernoulli draws, the same rounding of 1 / (1 - p), the generator left alike
    assert torch.equal(out, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.equal(g, r)
    assert torch.equal(after, torch.rand(4))


def test_strided_weights_get_torch_dropout_mask():
    # torch's dropout draws in the memory order of its input: a transposed map gets another mask
    base, v = _inputs((2, 7, 5), (2, 5, 3))
    w = base.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # (2, 7, 5), strided
    torch.manual_seed(4)
    out = dropout_product(w, v, 0.5)
    torch.manual_seed(4)
    assert torch.equal(out, F.dropout(w, 0.5) @ v)


def _saved_bytes(fn, *args):
    """Bytes autograd keeps for backward over the whole graph of `fn(*args)` (distinct storages)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, sum(storages.values())


def test_keeps_one_map_fewer():
    w_leaf = torch.randn(4, 64, 64, requires_grad=True)
    v = torch.randn(4, 64, 16, requires_grad=True)

    def attention(kernel):
        return lambda a, b: kernel(a.softmax(-1), b, 0.2)

    _, ours = _saved_bytes(attention(dropout_product), w_leaf, v)
    _, plain = _saved_bytes(attention(lambda a, b, p: F.dropout(a, p) @ b), w_leaf, v)
    one_map = 4 * 64 * 64 * 4
    assert plain - ours == one_map
    # with only the values needing a gradient it never keeps more than torch's ops
    frozen = w_leaf.detach().softmax(-1)
    _, ours = _saved_bytes(lambda b: dropout_product(frozen, b, 0.2), v)
    _, plain = _saved_bytes(lambda b: F.dropout(frozen, 0.2) @ b, v)
    assert ours <= plain


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_edge_probabilities_are_torch_dropout(p):
    w, v = _inputs((3, 4, 5), (3, 5, 2))
    torch.manual_seed(0)
    out = dropout_product(w, v, p)
    torch.manual_seed(0)
    torch.testing.assert_close(out, F.dropout(w, p) @ v, atol=0, rtol=0)


def test_broadcast_batch_dims_no_grad_and_1d_take_the_plain_ops(monkeypatch):
    calls = []
    monkeypatch.setattr(dropout._DropoutProduct, "apply", lambda *a: calls.append(a) or a[0] @ a[1])
    w, v = _inputs((2, 3, 4, 5), (1, 3, 5, 2))
    dropout_product(w, v, 0.5)
    with torch.no_grad():
        dropout_product(*_inputs((3, 4, 5), (3, 5, 2)), 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dropout_product(*_inputs((3, 4, 5), (3, 5, 2), torch.float32), 0.5)
    assert calls == []
    w_only, v_only = _inputs((3, 4, 5), (3, 5, 2))
    dropout_product(w_only.detach(), v_only, 0.5)  # only v wants a gradient: torch keeps one map, less
    dropout_product(torch.ones(5, dtype=torch.float64, requires_grad=True), v_only[0], 0.5)  # 1-D
    assert calls == []
    dropout_product(*_inputs((3, 4, 5), (3, 5, 2)), 0.5)
    assert len(calls) == 1


def test_double_backward_flop_counter_and_torch_func():
    w, v = _inputs((2, 5, 6), (2, 6, 3))
    fn = _seeded(lambda a, b: dropout_product(a, b, 0.3))
    assert_gradgradcheck(fn, [w, v])
    assert_flop_counter(fn, [w, v])
    # torch.func steps aside to torch's dropout: same values as eager autograd with the same seed
    assert_torch_func(Holder(fn, [w, v]))


def test_attend_with_dropout_equals_the_plain_attention():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 7, 4, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    torch.manual_seed(9)
    out = attend(q, k, v, dropout_p=0.25)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    torch.manual_seed(9)
    ref = F.dropout((q @ k.transpose(-2, -1) / 2).softmax(-1), 0.25) @ v
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-12)
