"""When attnzoo's custom autograd kernels step aside for plain (composite) PyTorch ops.

Every kernel in `attnzoo.kernels` has a composite twin: the same function written with ordinary
differentiable ops. The fast kernel runs in ordinary eager training; the twin runs where a
hand-written ``autograd.Function`` cannot take part:

- under a functorch transform (``torch.func.grad``, ``vmap``, ``jvp``), which needs
  ``setup_context`` and vmap rules the kernels do not have, and inside a forward-mode AD level
  (``torch.autograd.forward_ad.dual_level``), where a dual tensor needs a ``jvp`` they do not have
  (`forward_ad_active` also sends `attnzoo.kernels.flash.sdpa` to SDPA's math decomposition: the CPU
  flash kernel has no forward derivative);
- under ``torch.compile``, ``torch.export`` and ``torch.jit.trace``, which trace the composite ops
  and fuse them;
- for the kernels whose backward runs a small autograd graph of its own (the gates, SK's selection),
  also under a ``TorchDispatchMode`` such as ``torch.utils.flop_counter.FlopCounterMode``, whose
  backward hooks refuse a nested ``torch.autograd.grad`` (`composite_required(dispatch=True)`).
  The other kernels run under dispatch modes as they are: the mode sees each of their ops.

A backward with ``create_graph=True`` (a gradient penalty, ``gradgradcheck``) runs the kernel's
forward as usual; its backward then recomputes the twin differentiably (`recompute_grads`),
so second derivatives are exact. First-order backward keeps the fast path, except where the logits
are so large (`large_logits`) that the saved log-sum-exp no longer reproduces the probabilities:
``exp(logit - lse)`` in a recomputing backward (CPU flash, the blocked kernel) is then off by up to
``exp(|lse| * eps)``, which gave gradients 1e28 times too large for inputs of size 1e3. Those
backwards then recompute the twin a block of query rows at a time, each with its own softmax
(`rowwise_grads`).

`sample_blocks` cuts a batch into blocks of a few samples, for the kernels that walk a large map a
block at a time so their temporaries stay small and in cache (SimAM, the split selection, the weighted
branch sum's weight gradients).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from attnzoo._checks import autocast_on

__all__ = [
    "autocast_state",
    "compile_fresh",
    "composite_required",
    "forward_ad_active",
    "grad_transform_active",
    "host_readable",
    "plain_module",
    "large_logits",
    "own_nodes",
    "rowwise_grads",
    "recompute_grads",
    "sample_blocks",
    "stale_closure",
    "swapped_parameters",
    "without_autocast",
]

F = TypeVar("F", bound=Callable[..., Any])
MaybeTensor = TypeVar("MaybeTensor", Tensor, Tensor | None)


def composite_required(dispatch: bool = False, tracing: bool = True) -> bool:
    """Whether a custom kernel must give way to its composite twin here (see the module docstring).

    Args:
        dispatch: Also when a ``TorchDispatchMode`` is active (for kernels whose backward calls
            ``torch.autograd.grad``). Default: False.
        tracing: Also under ``torch.compile``/``torch.export`` and ``torch.jit.trace``. ACmix's
            neighbourhood kernel passes False: its composite twin takes minutes to compile, the
            kernel (with a graph break) seconds. Default: True.
    """
    return bool(
        torch._C._are_functorch_transforms_active()
        or _dual_level_open()
        or (tracing and (torch.compiler.is_compiling() or torch.jit.is_tracing()))
        or (dispatch and torch._C._len_torch_dispatch_stack() > 0)
    )


def _dual_level_open() -> bool:
    """Whether a ``torch.autograd.forward_ad.dual_level`` is open (dual tensors may come in)."""
    return torch.autograd.forward_ad._current_level >= 0


def forward_ad_active() -> bool:
    """Whether forward-mode derivatives may be asked of the ops run now: inside a dual level, or under
    ``torch.func.jvp`` (also ``jacfwd``, ``hessian``), whose interpreter sits on functorch's stack."""
    return _dual_level_open() or _transform_active(torch._C._functorch.TransformType.Jvp)


def _transform_active(kind: Any) -> bool:
    """Whether a functorch transform of `kind` (a ``TransformType``) is on functorch's stack now."""
    if not torch._C._are_functorch_transforms_active():
        return False
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(level.key() == kind for level in retrieve_all_functorch_interpreters())


def compile_fresh(t: Tensor) -> Tensor:
    """``t`` itself, or under ``torch.compile`` a fresh contiguous copy of it (Inductor fuses the copy).

    For a view (a permuted or reshaped map) that an extern kernel (a convolution, SDPA) saves for
    backward: with dynamic shapes Inductor orders a saved view's symbolic strides by plain sympy
    comparison, which cannot decide ``24*s3 < 24`` and fails at the second input size
    (pytorch/pytorch#185510); a fresh tensor takes its exact strides instead."""
    return t.clone(memory_format=torch.contiguous_format) if torch.compiler.is_compiling() else t


def grad_transform_active() -> bool:
    """Whether a ``torch.func.grad`` (or ``vjp``, ``jacrev``) transform is active. Its backward may be
    differentiated again, and nothing here tells: by another grad transform (``grad(grad(f))``), by
    plain autograd over it (MAML's ``loss.backward()`` over an inner ``torch.func.grad``), or by an
    ``autograd.grad(create_graph=True)`` inside it. SDPA's fused CPU kernels have no differentiable
    backward, so attention takes the decomposition under any grad transform."""
    return _transform_active(torch._C._functorch.TransformType.Grad)


def host_readable(t: Tensor) -> bool:
    """Whether a shortcut may read ``t``'s values in Python (``bool(dead.any())``): not on the meta
    device (no values), not while ``torch.compile`` traces (a graph break), and not under a functorch
    transform, where ``torch.func.vmap`` gives each sample its own value and refuses to turn one into a
    Python bool. The caller then keeps the tensor and its masked fill, which is correct either way."""
    return not (t.device.type == "meta" or torch.compiler.is_compiling()
                or torch._C._are_functorch_transforms_active())


def swapped_parameters(fns: Sequence[Callable[..., Any] | None], params: Sequence[Tensor]) -> bool:
    """Whether a small function is a module (or its method) whose parameters were swapped in for this
    call: some of `params` are no ``nn.Parameter`` (``torch.func.functional_call``, MAML's fast weights
    ``p - lr * g``).

    The gates and SK's selection recompute such a function in a ``create_graph=True`` backward, which
    then reads the module's own parameters (the swap is undone by then): the swapped-in tensors got no
    gradient, or `stale_closure` refused. Such a call runs the composite twin, whose graph holds the
    tensors the forward used. (A function closing over bare tensors reads the same ones again.)
    """
    owners = [getattr(fn, "__self__", fn) for fn in fns if fn is not None]  # a bound method's module
    reads_module = any(isinstance(owner, torch.nn.Module) for owner in owners)
    return reads_module and any(not isinstance(p, torch.nn.Parameter) for p in params)


def plain_module(module: torch.nn.Module, cls: type) -> bool:
    """Whether ``module`` is exactly ``cls`` (``nn.Linear``, ``nn.Conv2d``) with no forward or backward
    hook, its own or a global one, so that a fused path may read its ``weight`` and ``bias`` instead of
    calling it: a subclass (a LoRA or quantised wrapper) or a hook must see the call."""
    hooks = torch.nn.modules.module
    hooked = (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
              or module._backward_pre_hooks or hooks._global_forward_hooks or hooks._global_forward_pre_hooks
              or hooks._global_backward_hooks or hooks._global_backward_pre_hooks)
    return type(module) is cls and not hooked


def autocast_state(t: Tensor) -> tuple[str, bool, torch.dtype]:
    """The autocast state for ``t``'s device, to rerun a forward under it (`recompute_grads`)."""
    device = t.device.type
    return device, autocast_on(device), (
        torch.get_autocast_dtype(device) if torch.amp.is_autocast_available(device) else t.dtype
    )


def recompute_grads(
    fn: Callable[..., Tensor],
    inputs: Sequence[Tensor | None],
    grad: Tensor,
    needs: Sequence[bool],
    autocast: tuple[str, bool, torch.dtype] | None = None,
    passed: int | None = None,
) -> tuple[Tensor | None, ...]:
    """Gradients of ``fn(*inputs)`` for the backward of a kernel called with ``create_graph=True``.

    ``inputs`` are the kernel's saved inputs (in backward under grad mode they carry their history),
    so the returned gradients are differentiable functions of them and of ``grad``. Each is the
    partial derivative for its argument (`own_nodes`), also where one input is another or derives
    from it. The gradient of each input comes back in that input's dtype (autocast may have mixed
    them).

    Args:
        fn: The composite twin of the kernel.
        inputs: Its tensor inputs (None for an absent optional one).
        grad: The gradient of the output.
        needs: Which inputs want a gradient (``ctx.needs_input_grad`` for them).
        autocast: The forward's `autocast_state`, to recompute in the same dtypes. Default:
            autocast as it is in backward.
        passed: How many leading inputs `fn` computes from (the rest, a module's parameters, it
            reads through its closure, so they are passed as they are). Default: all.

    Returns:
        One gradient or None per input.
    """
    with torch.enable_grad():
        count = len(inputs) if passed is None else passed
        inputs = [*own_nodes(inputs[:count]), *inputs[count:]]
        if autocast is None or not torch.amp.is_autocast_available(autocast[0]):  # meta: no autocast
            out = fn(*inputs)
        else:
            device, enabled, dtype = autocast
            with torch.autocast(device, dtype=dtype, enabled=enabled):
                out = fn(*inputs)
    wanted = [t for t, need in zip(inputs, needs, strict=True) if need and t is not None and t.requires_grad]
    found = torch.autograd.grad(out, wanted, grad.to(out.dtype), create_graph=True, allow_unused=True)
    by_input = iter(found)
    grads: list[Tensor | None] = []
    for t, need in zip(inputs, needs, strict=True):
        if need and t is not None and t.requires_grad:
            g = next(by_input)
            grads.append(g if g is None else g.to(t.dtype))
        else:
            grads.append(None)
    return tuple(grads)


def own_nodes(tensors: Sequence[MaybeTensor]) -> list[MaybeTensor]:
    """Each tensor that requires grad as its own node of the graph (a view of it), so that
    ``torch.autograd.grad`` of a recomputed output gives the partial derivative for each argument.

    A saved input keeps its history, and ``autograd.grad`` with respect to it sums every path: for
    ``attend(x, x, x)`` each of q, k and v got the whole derivative (three times too much), and for
    ``sum_gate(x, mean(x), ...)`` the gradient of ``x`` also held the path through the means, which
    the means' own backward adds again.
    """
    return [t.view_as(t) if t is not None and t.requires_grad else t for t in tensors]


def without_autocast(method: F) -> F:
    """Run a kernel's ``forward``/``backward`` with autocast off, in the dtype its tensors arrive in.

    Autocast would otherwise recast the kernel's own matrix products (``bmm``, some with ``out=``)
    to the low precision, mixing dtypes inside one hand-written computation.
    """

    @functools.wraps(method)
    def run(ctx: Any, *args: Any) -> Any:
        device = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        if not autocast_on(device):
            return method(ctx, *args)
        with torch.autocast(device, enabled=False):
            return method(ctx, *args)

    return run  # type: ignore[return-value]


# |lse| (float32) above which exp(logit - lse) in a recomputing backward may be off by more than about
# 1e-4 (relative; 1024 * eps): measured, CPU flash and blocked gradients were off by 2e-4 at |lse| = 2e3,
# by 7% at 2e5. Scaled by the dtype's precision for float64.
_LSE_LIMIT = 1024.0


def large_logits(lse: Tensor) -> bool:
    """Whether a saved log-sum-exp is too large for its backward to recompute the probabilities from it
    (fully masked rows, with an infinite lse, and NaN rows aside)."""
    if not lse.numel():
        return False
    limit = _LSE_LIMIT * torch.finfo(torch.float32).eps / torch.finfo(lse.dtype).eps
    return bool(lse.nan_to_num(0.0, 0.0, 0.0).abs().amax() > limit)


def rowwise_grads(
    fn: Callable[[Tensor, Tensor, Tensor, int, int], Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grad: Tensor,
    needs: Sequence[bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """First-order gradients of attention whose output rows depend on their own query rows alone,
    recomputed by ``fn(q[..., start:stop, :], k, v, start, stop)`` (the composite twin, its own
    softmax per row) a block of rows at a time, so at most about 2**20 logits are alive at once.

    Shape:
        - q: ``(..., L, d)``; k: ``(..., S, d)``; v: ``(..., S, e)``; grad: ``(..., L, e)``.
    """
    if not any(needs[:3]):
        return None, None, None
    length, keys = q.shape[-2], k.shape[-2]
    rows = max(1, min(length, (1 << 20) // max(1, q[..., :1, :1].numel() * keys)))
    grad_q = torch.empty_like(q) if needs[0] else None
    grad_k = torch.zeros_like(k) if needs[1] else None
    grad_v = torch.zeros_like(v) if needs[2] else None
    for start in range(0, length, rows):
        stop = min(start + rows, length)
        parts = (q[..., start:stop, :], k, v)
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(bool(n)) for t, n in zip(parts, needs[:3], strict=True)]
            out = fn(inputs[0], inputs[1], inputs[2], start, stop)
        wanted = [t for t in inputs if t.requires_grad]
        found = iter(torch.autograd.grad(out, wanted, grad[..., start:stop, :].to(out.dtype)))
        if grad_q is not None:
            grad_q[..., start:stop, :] = next(found)
        if grad_k is not None:
            grad_k += next(found)
        if grad_v is not None:
            grad_v += next(found)
    return grad_q, grad_k, grad_v


def stale_closure(who: str, kept: Tensor, again: Tensor) -> None:
    """Refuse a double backward whose small function no longer computes what it did in forward.

    The gates and SK's selection recompute their small learned function (a closure over a module)
    in a ``create_graph=True`` backward. If the module's parameters were swapped in between (a
    backward after ``torch.func.functional_call`` returned, a replaced parameter), the recomputed
    values differ from the forward's and the second derivatives would silently be wrong.
    """
    if not torch.equal(kept.to(again.dtype), again.detach()):
        raise RuntimeError(
            f"{who}: double backward recomputes the small learned function, which now gives other values "
            "than in forward (were the module's parameters swapped in between, e.g. a backward run after "
            "torch.func.functional_call returned?); run the backward while the same parameters are in "
            "place, or use torch.func.grad"
        )


def sample_blocks(t: Tensor, chunk: int = 1 << 20) -> list[slice]:
    """Slices along the batch (dim 0) of about ``chunk`` elements each, at least one sample each."""
    if t.shape[0] == 0:  # no samples, no blocks
        return []
    step = max(1, chunk // max(1, t[0].numel()))
    return [slice(i, i + step) for i in range(0, t.shape[0], step)]
