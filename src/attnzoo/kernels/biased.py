"""Attention with an additive bias shared across the batch, on packed q/k/v: a fast kernel.

Used by Swin's `attnzoo.mechanisms.swin.WindowAttention` (bias = relative position bias + shift mask)
and `attnzoo.mechanisms.temporal.TemporalAttention` (1-D relative bias). Their bias comes from a
learnable table, so it requires grad, and ``scaled_dot_product_attention`` then silently runs its
generic math path; for tiny sequences (49-token windows, 8 frames) its fused kernels are also
slower than plain batched GEMMs in inference. `biased_attention` runs a small explicit kernel
instead (a custom autograd function):

- the scale is folded into the copy of q, and k is copied transposed, so both score GEMMs run with
  an untransposed second operand (about twice as fast on such tiny matrices on CPU);
- the bias is added in place to the logits and the softmax runs in place, so the forward holds one
  N x N map, the only one kept for backward (plus a bool mask with dropout);
- the backward keeps ``qkv`` itself (as large as the three copies, which are freed after forward),
  runs head by head and a block of windows at a time (about ``_BLOCK_BYTES`` of N x N map, so
  backward holds one block's map, not a head's) on strided views of it (batched GEMMs take any row
  stride, so nothing is copied into a GEMM layout), takes the softmax backward in place, writes
  the qkv gradient straight into the projection's ``(B, N, 3, h, d)`` layout and reduces the bias
  gradient over the batch.

With `attnzoo.fused_attn` off, for half precision, and where a custom autograd function
cannot run (functorch transforms, ``torch.compile``, ``torch.export``, ``torch.jit.trace``:
`attnzoo.kernels.route`), it calls `attnzoo.attend` (whose math path is
the reference the tests compare against). Double backward (``create_graph=True``) recomputes the
attention with plain ops in backward (`_plain_biased`). A query whose every key the bias masks
(``-inf`` over its whole row) gets zero output and zero gradients, as in `attnzoo.attend`.

Shape letters: B batch (windows), N tokens, h heads, d head width, G bias groups.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from attnzoo.functional import attend, fused_enabled
from attnzoo.kernels import choose
from attnzoo.kernels.route import composite_required, host_readable, recompute_grads, without_autocast

__all__ = ["biased_attention"]


def _dead_rows(bias: Tensor) -> Tensor | None:
    """Queries whose every key the bias masks (a row of ``-inf``): ``(..., N, 1)`` bool, or None."""
    dead = torch.isneginf(bias).all(-1, keepdim=True)
    if not host_readable(dead):  # meta, compiling, vmap: no value to look at, keep the fill
        return dead
    return dead if bool(dead.any()) else None


_BLOCK_BYTES = 1 << 20  # N x N map of one block of windows in `_BiasedAttention.backward`


def _block(b: int, n: int, groups: int, element_size: int) -> int:
    """Windows per backward block: at most about `_BLOCK_BYTES` of N x N map (one bias group at least),
    a multiple of the bias groups, the blocks as even as that allows."""
    per_group, units = groups * n * n * element_size, b // groups
    blocks = -(-units // max(1, _BLOCK_BYTES // per_group))
    return -(-units // blocks) * groups


def _softmax_backward(grad: Tensor, probs: Tensor, out: Tensor) -> Tensor:
    """Softmax backward over the last axis into `out`, which may be `grad` itself (the kernel takes a
    row's sum before it writes the row; checked in float64 by tests/kernels/test_biased.py)."""
    return torch.ops.aten._softmax_backward_data.out(grad, probs, -1, probs.dtype, grad_input=out)


def _plain_biased(qkv: Tensor, bias: Tensor, scale: float, keep: Tensor | None, dropout_p: float) -> Tensor:
    """The kernel with plain differentiable ops (its composite twin), with a given dropout mask."""
    b, n, _, h, d = qkv.shape
    groups = bias.shape[0] if bias.ndim == 4 else 1
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, N, d)
    logits = (q * scale) @ k.transpose(-2, -1)  # (B, h, N, N)
    dead = torch.isneginf(bias).all(-1, keepdim=True)  # (G, h, N, 1) or (h, N, 1)
    bias = bias.masked_fill(dead, 0.0).view(groups, h, n, n)
    logits = logits.view(b // groups, groups, h, n, n) + bias  # group-major batch
    probs = logits.softmax(-1).masked_fill(dead.view(groups, h, n, 1), 0.0).view(b, h, n, n)
    if keep is not None:
        probs = probs * keep / (1.0 - dropout_p)  # keep: (B, h, N, N)
    return (probs @ v).transpose(1, 2).reshape(b, n, h * d)  # (B, h, N, d) -> (B, N, h*d)


class _BiasedAttention(torch.autograd.Function):
    """softmax(scale * q k^T + bias) v on packed qkv, keeping one N x N map for backward.

    Head by head, so no full-size copy of q, k or v is made: for each head, q (scaled) and k^T
    are copied to contiguous ``(B, N, d)`` / ``(B, d, N)`` blocks (a transposed second operand
    runs at about half speed on tiny matrices), the logits go straight into that head's block of
    the saved weights (head-major ``(h, B, N, N)``, each block contiguous), the bias is added and
    the softmax taken in place, and the product with v (a strided view: batched GEMMs take any row
    stride) is written into the head's slot of the output. Saved for backward: ``qkv`` and
    ``bias`` as given (a double backward differentiates them), the weights and the dropout mask.
    """

    @staticmethod
    @without_autocast
    def forward(ctx, qkv: Tensor, bias: Tensor, scale: float, dropout_p: float) -> Tensor:  # type: ignore[override]
        b, n, _, h, d = qkv.shape
        groups = bias.shape[0] if bias.ndim == 4 else 1
        dead = _dead_rows(bias)  # (G, h, N, 1) or (h, N, 1)
        bias_g = (bias if dead is None else bias.masked_fill(dead, 0.0)).view(groups, h, n, n)
        dead_g = None if dead is None else dead.view(groups, h, n, 1)
        probs = qkv.new_empty((h, b, n, n))  # head-major weights
        keep = None
        if dropout_p > 0.0:
            # drawn in the (B, h, N, N) order of `attend`'s dropout, so one seed gives one mask
            keep = torch.empty((b, h, n, n), dtype=torch.bool, device=qkv.device).bernoulli_(1.0 - dropout_p)
        out = qkv.new_empty((b, n, h, d))
        for i in range(h):
            q_i = qkv[:, :, 0, i] * scale  # (B, N, d), scaled
            kt_i = qkv[:, :, 1, i].transpose(1, 2).contiguous()  # (B, d, N)
            p_i = probs[i]  # (B, N, N), contiguous
            torch.bmm(q_i, kt_i, out=p_i)  # logits
            del q_i, kt_i
            grouped = p_i.view(b // groups, groups, n, n)  # group-major batch
            grouped.add_(bias_g[:, i])  # (G, N, N) over every image
            torch.softmax(p_i, dim=-1, out=p_i)  # in place: one N x N buffer
            if dead_g is not None:
                grouped.masked_fill_(dead_g[:, i], 0.0)  # masked queries: zero weights, output, grads
            dropped = p_i if keep is None else p_i * keep[:, i] / (1.0 - dropout_p)
            out[:, :, i] = torch.bmm(dropped, qkv[:, :, 2, i])  # (B, N, d)
            del dropped
        ctx.save_for_backward(qkv, bias, probs, keep)
        ctx.meta = (scale, dropout_p)
        return out.view(b, n, h * d)  # (B, N, h*d)

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        qkv, bias, probs, keep = ctx.saved_tensors
        scale, dropout_p = ctx.meta
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain ops instead
            grads = recompute_grads(
                lambda t, bb: _plain_biased(t, bb, scale, keep, dropout_p),
                [qkv, bias], grad_out, ctx.needs_input_grad[:2],
            )
            return (*grads, None, None)
        # Head by head and a block of windows at a time (`_block`), on strided views of qkv (batched
        # GEMMs take any row stride), so backward copies nothing into a GEMM layout and only one
        # block's N x N maps are alive at a time.
        b, n, _, h, d = qkv.shape
        groups = bias.shape[0] if bias.ndim == 4 else 1
        g = grad_out.reshape(b, n, h, d)

        want_qkv, want_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_qkv = qkv.new_empty((b, n, 3, h, d)) if want_qkv else None
        grad_bias = bias.new_empty((groups, h, n, n)) if want_bias else None
        step = _block(b, n, groups, probs.element_size())
        for i, b0 in itertools.product(range(h), range(0, b, step)):
            rows = slice(b0, b0 + step)
            g_i, p_i = g[rows, :, i], probs[i, rows]  # (Bc, N, d) strided view, (Bc, N, N)
            q_i, k_i, v_i = (qkv[rows, :, j, i] for j in range(3))  # (Bc, N, d) views
            keep_i = None if keep is None else keep[rows, i]
            # The GEMMs write contiguous results that are then copied into the packed gradient: a
            # strided `out=` makes bmm fall back to one small GEMM per batch element.
            if grad_qkv is not None:
                dropped = p_i if keep_i is None else p_i * keep_i / (1.0 - dropout_p)
                grad_qkv[rows, :, 2, i] = torch.bmm(dropped.transpose(1, 2), g_i)  # (Bc, N, d)
                del dropped
            grad_probs = torch.bmm(g_i, v_i.transpose(1, 2))  # (Bc, N, N)
            if keep_i is not None:
                grad_probs.mul_(keep_i).mul_(1.0 / (1.0 - dropout_p))
            # softmax backward in place (each row's sum is taken before the row is written)
            grad_logits = _softmax_backward(grad_probs, p_i, out=grad_probs)  # (Bc, N, N)
            if grad_qkv is not None:
                # the scale is applied by the copy into the packed gradient (one pass, not two)
                torch.mul(torch.bmm(grad_logits, k_i), scale, out=grad_qkv[rows, :, 0, i])  # (Bc, N, d)
                torch.mul(torch.bmm(grad_logits.transpose(1, 2), q_i), scale, out=grad_qkv[rows, :, 1, i])
            if grad_bias is not None:
                part = grad_logits.view(-1, groups, n, n).sum(0)  # (G, N, N), group-major block
                if b0 == 0:
                    grad_bias[:, i] = part
                else:
                    grad_bias[:, i] += part
            del grad_probs, grad_logits  # before the next block allocates its own
        return grad_qkv, None if grad_bias is None else grad_bias.view(bias.shape), None, None


def biased_attention(qkv: Tensor, bias: Tensor, *, scale: float, dropout_p: float = 0.0) -> Tensor:
    """Self-attention with an additive bias shared by groups of the batch, from packed q/k/v.

    Equal to `attnzoo.attend` on the unpacked heads with ``bias`` broadcast over the batch.
    With the fused path on (`attnzoo.fused_attn`) and a float32/float64 input, a dedicated
    kernel runs (see the module docstring) unless `attend` measured faster for the shape
    class in this process (`attnzoo.kernels.choose`, site ``"window"``; override with
    ``ATTNZOO_KERNEL_WINDOW=biased|sdpa|auto`` or ``prefer("window", ...)``): on tiny windows the
    kernel beat both the SDPA kernels and the generic math path, in training (where a learnable
    bias makes SDPA fall back to its math path) and in inference. Otherwise (the fused path off,
    half precision, under torch.compile, torch.export or torch.func) `attend` runs.

    Args:
        qkv: Packed projections ``(B, N, 3, h, d)`` (any strides).
        bias: Additive float bias ``(h, N, N)``, or ``(G, h, N, N)`` with G dividing B and
            batch element ``i`` using group ``i % G`` (Swin's window order: image-major). A row
            of ``-inf`` masks its query entirely: zero output, zero gradients.
        scale: Multiplies the logits.
        dropout_p: Dropout on the attention weights; pass 0.0 in eval mode. Default: 0.0.

    Shape:
        - Output: ``(B, N, h*d)``, heads concatenated.
    """
    # The hand-written kernel is for eager mode; torch.compile, torch.export (ONNX) and torch.func
    # take the plain path.
    if fused_enabled() and qkv.dtype in (torch.float32, torch.float64) and not composite_required():
        bias_c = bias.to(qkv.dtype).contiguous()
        if _choice(qkv, bias_c, float(scale)) == "biased":
            return _BiasedAttention.apply(qkv, bias_c, float(scale), float(dropout_p))
    return _attend_path(qkv, bias, scale, dropout_p)


def _attend_path(qkv: Tensor, bias: Tensor, scale: float, dropout_p: float) -> Tensor:
    """`attend` on the unpacked heads, the bias broadcast over the batch."""
    b, n, _, h, d = qkv.shape
    if bias.ndim == 4:
        bias = bias.expand(b // bias.shape[0], *bias.shape).reshape(b, h, n, n)  # (B, h, N, N)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, N, d)
    out: Tensor = attend(q, k, v, bias=bias, scale=scale, dropout_p=dropout_p)  # (B, h, N, d)
    return out.transpose(1, 2).reshape(b, n, h * d)  # (B, N, h*d)


def _choice(qkv: Tensor, bias: Tensor, scale: float) -> str:
    """``"biased"`` or ``"sdpa"`` (site ``"window"`` of `attnzoo.kernels.choose`); calibration runs
    without dropout, so it draws no random numbers."""
    b, n, _, h, d = qkv.shape
    groups = bias.shape[0] if bias.ndim == 4 else 1
    train = torch.is_grad_enabled() and (qkv.requires_grad or bias.requires_grad)
    needs = [qkv.requires_grad, bias.requires_grad] if train else False
    key = (*(choose.bucket(x) for x in (b, n, h, d, groups)), qkv.dtype, train)
    kernel = lambda t, bb: _BiasedAttention.apply(t, bb, scale, 0.0)  # noqa: E731
    plain = lambda t, bb: _attend_path(t, bb, scale, 0.0)  # noqa: E731
    candidates = {
        "biased": choose.workload(kernel, (qkv, bias), needs),
        "sdpa": choose.workload(plain, (qkv, bias), needs),
    }
    return choose.choose("window", key, candidates, static="biased", elements=qkv.numel(), device=qkv.device)
