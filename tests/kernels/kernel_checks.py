"""Checks every custom kernel passes: exact against a plain reference, and usable by torch's own tools.

Each check takes ``fn(*tensors) -> Tensor`` (the kernel, as a caller uses it) and the tensors; the
tests in this folder give each kernel its reference (attend's float64 math path or plain ops).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

Fn = Callable[..., Tensor]


def leaves(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> list[Tensor]:
    """Fresh leaf copies (optionally cast) that require grad."""
    return [t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in tensors]


def value_and_grads(fn: Fn, tensors: Sequence[Tensor], weight: Tensor | None = None) -> tuple[Tensor, list]:
    """``fn``'s output and the gradients of ``sum(out * weight)`` w.r.t. ``tensors`` (by ``backward()``)."""
    xs = leaves(tensors)
    out = fn(*xs)
    w = torch.ones_like(out) if weight is None else weight.to(out.dtype)
    (out * w).sum().backward()
    return out.detach(), [torch.zeros_like(x) if x.grad is None else x.grad for x in xs]


def assert_matches(fn: Fn, ref: Fn, tensors: Sequence[Tensor], tol: float = 1e-10) -> None:
    """Values and gradients of ``fn`` equal those of ``ref`` (float64 inputs)."""
    out_ref = ref(*tensors)
    weight = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(7), dtype=out_ref.dtype)
    out, grads = value_and_grads(fn, tensors, weight)
    out_r, grads_r = value_and_grads(ref, tensors, weight)
    torch.testing.assert_close(out, out_r, atol=tol, rtol=tol)
    for g, r in zip(grads, grads_r, strict=True):
        torch.testing.assert_close(g, r, atol=tol, rtol=tol)


def assert_gradgradcheck(fn: Fn, tensors: Sequence[Tensor]) -> None:
    """Second derivatives (float64) by finite differences, and a gradient penalty that runs."""
    xs = leaves(tensors, torch.float64)
    assert torch.autograd.gradgradcheck(fn, tuple(xs), fast_mode=True)
    grads = torch.autograd.grad(fn(*xs).square().sum(), xs, create_graph=True)
    penalty = sum(g.norm() for g in grads)
    penalty.backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in xs)


def assert_flop_counter(fn: Fn, tensors: Sequence[Tensor], counted: bool | None = True) -> None:
    """Forward and backward under FlopCounterMode give the gradients they give outside it, and
    some FLOPs counted (``counted``), none (False: the mode counts matrix products and
    convolutions only) or either (None)."""
    with FlopCounterMode(display=False) as counter:
        out, grads = value_and_grads(fn, tensors)
    out_r, grads_r = value_and_grads(fn, tensors)
    if counted is not None:
        assert (counter.get_total_flops() > 0) == counted
    torch.testing.assert_close(out, out_r)
    for g, r in zip(grads, grads_r, strict=True):
        torch.testing.assert_close(g, r)


class Holder(nn.Module):
    """The kernel's tensors as parameters, so ``torch.func.functional_call`` can swap them."""

    def __init__(self, fn: Fn, tensors: Sequence[Tensor]) -> None:
        super().__init__()
        self.fn = fn
        self.args = nn.ParameterList([nn.Parameter(t.detach().clone()) for t in tensors])

    def forward(self) -> Tensor:
        return self.fn(*self.args)


def assert_torch_func(module: nn.Module, args: Sequence[Tensor] = ()) -> None:
    """``torch.func.grad`` over ``torch.func.functional_call(module, params, args)`` equals eager
    autograd, for the parameters and the arguments (wrap a functional kernel in :class:`Holder`)."""
    params = {n: p.detach() for n, p in module.named_parameters()}

    def loss(p: dict[str, Tensor], a: tuple[Tensor, ...]) -> Tensor:
        return torch.func.functional_call(module, p, a).square().sum()

    grad_p, grad_a = torch.func.grad(loss, argnums=(0, 1))(params, tuple(args))
    module.zero_grad(set_to_none=True)
    xs = leaves(args)
    module(*xs).square().sum().backward()
    for name, p in module.named_parameters():
        ref = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(grad_p[name], ref, atol=1e-5, rtol=1e-5)
    for g, x in zip(grad_a, xs, strict=True):
        torch.testing.assert_close(g, torch.zeros_like(x) if x.grad is None else x.grad, atol=1e-5, rtol=1e-5)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6))


def assert_autocast_bf16(fn: Fn, tensors: Sequence[Tensor], ref: Fn | None = None, tol: float = 0.1) -> None:
    """Forward and backward inside CPU bfloat16 autocast: finite, gradients in each input's dtype,
    within ``tol`` of float32 and, given the plain ops ``ref``, within 1% of ``ref`` under autocast."""
    out_32, grads_32 = value_and_grads(fn, tensors)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = value_and_grads(fn, tensors)
        if ref is not None:
            out_ref, grads_ref = value_and_grads(ref, tensors)
    assert torch.isfinite(out).all()
    assert _rel(out, out_32) < tol
    if ref is not None:
        assert _rel(out, out_ref) < 0.01
    for i, (g, g32) in enumerate(zip(grads, grads_32, strict=True)):
        assert g.dtype == g32.dtype and torch.isfinite(g).all()
        assert _rel(g, g32) < tol, f"gradient {i}: {_rel(g, g32):.3g} from float32"
        if ref is not None:
            rel = _rel(g, grads_ref[i])
            assert rel < 0.01, f"gradient {i}: {rel:.3g} from the plain ops"
