"""Local neighbourhood attention over a reflection-padded map, as ACmix's attention branch needs it.

Each query attends to its ``kernel x kernel`` neighbours (spaced by ``dilation``, queries taken every
``stride``) without ``unfold``: the kernel walks the neighbour offsets over shifted slices in forward
and backward, so nothing ``kernel**2`` times the input is kept. `neighbourhood_attention` falls
back to the plain unfold formulation (``_plain_neighbourhood_attention``) when fused attention is off.
Tested against `attnzoo.functional.attend`'s float64 math path in ``tests/kernels``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

from attnzoo.kernels.route import composite_required, own_nodes

__all__ = ["neighbourhood_attention", "reflect_pad"]


def _reflect_index(size: int, pad: int, device: torch.device) -> Tensor:
    """Source index of every padded position under repeated reflection (period ``2 * (size - 1)``)."""
    idx = torch.arange(-pad, size + pad, device=device)
    if size == 1:
        return torch.zeros_like(idx)
    period = 2 * (size - 1)
    idx = idx.remainder(period)
    return torch.where(idx >= size, period - idx, idx)


def reflect_pad(x: Tensor, pad: int) -> Tensor:
    """Reflection-pad the last two dims by ``pad``; repeats the reflection when ``pad >= H or W``.

    Equals ``F.pad(x, (pad,) * 4, mode="reflect")`` where that works, and ``numpy.pad(...,
    mode="reflect")`` always (a 1-pixel side repeats its only value).

    Shape:
        - Input: ``(N, C, H, W)``; Output: ``(N, C, H + 2*pad, W + 2*pad)``.
    """
    height, width = x.shape[-2:]
    if pad == 0:
        return x
    if pad < height and pad < width:
        return F.pad(x, (pad, pad, pad, pad), mode="reflect")
    rows, cols = _reflect_index(height, pad, x.device), _reflect_index(width, pad, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def _plan(
    kernel: int, dilation: int, stride: int, out_h: int, out_w: int
) -> tuple[int, int, list[tuple[int, int]]]:
    """Row width, row count and, per neighbour, (phase, flat shift) of the phase-split key layout.

    The padded map is split into ``stride**2`` phases ``t[a::stride, b::stride]``, each stored with
    row width ``wr = out_w + reach`` (``reach = dilation*(kernel-1)//stride``) and flattened. The
    neighbour ``(i, j)`` of query ``(y, x)`` sits at ``k_pad[stride*y + dilation*i, stride*x +
    dilation*j]``: in phase ``(dilation*i % stride, dilation*j % stride)`` at flat index
    ``y*wr + x + shift``, so every neighbour is a contiguous slice of one flat phase.
    """
    reach = (kernel - 1) * dilation // stride
    wr = out_w + reach
    offsets = []
    for i in range(kernel):
        for j in range(kernel):
            ui, a = divmod(i * dilation, stride)
            uj, b = divmod(j * dilation, stride)
            offsets.append((a * stride + b, ui * wr + uj))
    return wr, out_h + reach + 1, offsets


def _phase_pairs(t: Tensor, buf: Tensor, stride: int) -> list[tuple[Tensor, Tensor]]:
    # (view of t[:, :, a::s, b::s], matching view of phase a*s+b of buf (N, s*s, d, rows, wr)).
    pairs = []
    for a in range(stride):
        for b in range(stride):
            src = t[:, :, a::stride, b::stride][:, :, : buf.shape[3], : buf.shape[4]]
            pairs.append((src, buf[:, a * stride + b, :, : src.shape[2], : src.shape[3]]))
    return pairs


def _to_phases(t: Tensor, stride: int, rows: int, wr: int) -> Tensor:
    # (N, d, Hp, Wp) -> (N, s*s, d, rows*wr); entries no window reads stay zero.
    buf = t.new_zeros(t.shape[0], stride * stride, t.shape[1], rows, wr)
    for src, dst in _phase_pairs(t, buf, stride):
        dst.copy_(src)
    return buf.view(t.shape[0], stride * stride, t.shape[1], rows * wr)


def _from_phases(buf: Tensor, shape: torch.Size, stride: int, rows: int, wr: int) -> Tensor:
    # Inverse of _to_phases, for gradients (entries never read get zero).
    out = buf.new_zeros(shape)
    for dst, src in _phase_pairs(out, buf.view(shape[0], stride * stride, shape[1], rows, wr), stride):
        dst.copy_(src)
    return out


def _plain_neighbourhood_attention(
    q: Tensor, k_pad: Tensor, v_pad: Tensor, kernel: int, dilation: int, stride: int
) -> Tensor:
    """The same attention with ordinary differentiable ops on strided views (for double backward)."""
    out_h, out_w = q.shape[-2:]

    def window(t: Tensor, i: int, j: int) -> Tensor:  # (N, d, Ho, Wo) view of neighbour (i, j)
        dy, dx, end_y, end_x = i * dilation, j * dilation, stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
        return t[..., dy : dy + end_y : stride, dx : dx + end_x : stride]

    pairs = [(i, j) for i in range(kernel) for j in range(kernel)]
    logits = torch.stack([(q * window(k_pad, i, j)).sum(1) for i, j in pairs], 1)  # (N, K2, Ho, Wo)
    weights = logits.softmax(1)
    terms = [weights[:, m : m + 1] * window(v_pad, i, j) for m, (i, j) in enumerate(pairs)]
    return torch.stack(terms).sum(0)


class _NeighbourhoodAttention(torch.autograd.Function):
    """Softmax attention of each query over its ``kernel**2`` neighbours, one offset at a time.

    Queries, keys and values live in a flat layout with a common row width (``_plan``), so each
    neighbour is a contiguous shifted slice and every step is a vectorised whole-tensor operation.
    Saved for backward: q, k, v as given and in the flat layout, the output and the
    ``(N, kernel**2, Ho*wr)`` weights (``kernel**2 / d`` times the size of k; the official keeps three
    ``kernel**2``-fold copies). Under ``create_graph=True`` the backward differentiates
    `_plain_neighbourhood_attention` instead, so double backward works (slowly).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, q: Tensor, k_pad: Tensor, v_pad: Tensor, kernel: int, dilation: int, stride: int
    ) -> Tensor:
        n, d, out_h, out_w = q.shape
        wr, rows, offsets = _plan(kernel, dilation, stride, out_h, out_w)
        span = out_h * wr
        qf = q.new_zeros(n, d, out_h, wr)
        qf[..., :out_w] = q
        qf = qf.view(n, d, span)  # (N, d, Ho*wr), columns >= Wo are zero padding
        kf = _to_phases(k_pad, stride, rows, wr)  # (N, s*s, d, rows*wr)
        vf = _to_phases(v_pad, stride, rows, wr)
        logits = q.new_empty(n, len(offsets), span)  # (N, K2, Ho*wr)
        for m, (phase, shift) in enumerate(offsets):
            torch.sum(qf * kf[:, phase, :, shift : shift + span], dim=1, out=logits[:, m])
        low = q.dtype in (torch.float16, torch.bfloat16)
        weights = logits.softmax(1, dtype=torch.float32 if low else None).to(q.dtype)  # over neighbours
        out = torch.zeros_like(qf)
        for m, (phase, shift) in enumerate(offsets):
            out.addcmul_(weights[:, m].unsqueeze(1), vf[:, phase, :, shift : shift + span])
        ctx.save_for_backward(q, k_pad, v_pad, qf, kf, vf, weights, out)
        ctx.config = (kernel, dilation, stride)  # type: ignore[attr-defined]
        return out.view(n, d, out_h, wr)[..., :out_w]

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, k_pad, v_pad, qf, kf, vf, weights, out = ctx.saved_tensors  # type: ignore[attr-defined]
        kernel, dilation, stride = ctx.config  # type: ignore[attr-defined]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain version instead
            nodes = own_nodes((q, k_pad, v_pad))  # partial derivatives, also for attention(x, x, x)
            plain = _plain_neighbourhood_attention(nodes[0], nodes[1], nodes[2], kernel, dilation, stride)
            wanted = [t for t in nodes if t.requires_grad]
            grads = iter(torch.autograd.grad(plain, wanted, grad, create_graph=True))
            found = [next(grads) if t.requires_grad else None for t in nodes]
            return (*found, None, None, None)
        n, d, out_h, out_w = q.shape
        wr, rows, offsets = _plan(kernel, dilation, stride, out_h, out_w)
        span = out_h * wr
        gf = grad.new_zeros(n, d, span // wr, wr)
        gf[..., :out_w] = grad
        gf = gf.view(n, d, span)  # zero on the padding columns, so they contribute nothing
        grad_logits = torch.empty_like(weights)  # (N, K2, Ho*wr)
        for m, (phase, shift) in enumerate(offsets):
            torch.sum(gf * vf[:, phase, :, shift : shift + span], dim=1, out=grad_logits[:, m])
        # Softmax backward; sum_m w_m * dL/dw_m equals grad . out, computed without the K2 axis.
        grad_logits.sub_((gf * out).sum(1, keepdim=True)).mul_(weights)
        grad_q, grad_k, grad_v = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
        for m, (phase, shift) in enumerate(offsets):
            g_m = grad_logits[:, m].unsqueeze(1)  # (N, 1, Ho*wr)
            grad_q.addcmul_(g_m, kf[:, phase, :, shift : shift + span])
            grad_k[:, phase, :, shift : shift + span].addcmul_(g_m, qf)
            grad_v[:, phase, :, shift : shift + span].addcmul_(weights[:, m].unsqueeze(1), gf)
        grad_k = _from_phases(grad_k, k_pad.shape, stride, rows, wr)
        grad_v = _from_phases(grad_v, v_pad.shape, stride, rows, wr)
        return grad_q.view(n, d, out_h, wr)[..., :out_w], grad_k, grad_v, None, None, None


def neighbourhood_attention(
    q: Tensor, k_pad: Tensor, v_pad: Tensor, kernel: int, dilation: int = 1, stride: int = 1
) -> Tensor:
    """Local attention: query ``(y, x)`` attends ``k_pad[..., stride*y + dilation*i, stride*x + dilation*j]``.

    Unscaled logits ``q . k`` over the ``kernel**2`` offsets ``(i, j)``, softmax over them, weighted
    sum of the values at the same offsets. Pad k and v first (ACmix: reflection). Never unfolds the
    neighbourhoods; double backward and functorch transforms run a
    slower plain version.

    Shape:
        - q: ``(N, d, Ho, Wo)``; k_pad, v_pad: ``(N, d, Hp, Wp)`` with
          ``Hp >= stride*(Ho-1) + dilation*(kernel-1) + 1`` (the same for W).
        - Output: ``(N, d, Ho, Wo)`` (a strided view; call ``.contiguous()`` if needed).
    """
    need_h = stride * (q.shape[-2] - 1) + dilation * (kernel - 1) + 1
    need_w = stride * (q.shape[-1] - 1) + dilation * (kernel - 1) + 1
    if k_pad.shape[-2] < need_h or k_pad.shape[-1] < need_w or v_pad.shape != k_pad.shape:
        raise ValueError(
            f"neighbourhood_attention expects k_pad and v_pad of one shape, H >= {need_h}, W >= {need_w}, "
            f"got {tuple(k_pad.shape)} and {tuple(v_pad.shape)}"
        )
    if q.shape[-2] == 1 and q.shape[-1] == 1:  # one query: the stride spaces nothing (the kernel runs
        stride = 1  # stride**2 phases: a stride of 1001 on a 5 x 6 map took 47 s and 2 GB)
    if composite_required(tracing=False):  # functorch transforms
        return _plain_neighbourhood_attention(q, k_pad, v_pad, kernel, dilation, stride)
    return _NeighbourhoodAttention.apply(q, k_pad, v_pad, kernel, dilation, stride)
