"""Exact global attention without an L x S matrix: a blocked GEMM kernel, and the dispatch to it.

PyTorch's CPU flash kernel (behind ``scaled_dot_product_attention``) needs q, k and v with one head
dim. SAGAN-style blocks have small queries and keys (d = C/8) but full-width values (e = C), and the
Gaussian non-local block the reverse; padding q and k up to e multiplies the score FLOPs by e/d.
`_BlockedAttention` computes ``softmax(scale * q k^T) v`` exactly with large matrix products
over blocks of rows and recomputes the probabilities in backward (FlashAttention's scheme, with
blocks sized for a CPU cache instead of a GPU tile):

- forward, per block of queries: ``S = q_blk k^T``, ``P = exp(S - max)`` in place, the row sums
  ``l``, ``O_blk = P v / l`` and the log-sum-exp ``lse = max + log l`` (saved: O(L) floats);
- backward, per block of keys, in transposed form so every product is a plain row-major GEMM:
  ``P^T = exp([k, 1] [q; -lse]^T)`` (the ``-lse`` rides along as one more contraction row),
  ``dS^T = P^T * ([v, 1] [dO; -D]^T)`` with ``D = rowsum(dO * O)``, then
  ``dV_blk = P^T dO``, ``dK_blk = dS^T q``, ``dQ^T += k_blk^T dS^T``.

Per block the whole batch goes through one batched GEMM. Only one ``B x rows x S`` score block
(forward) or two ``B x rows x L`` blocks (backward) exist at a time, about ``_BLOCK_ELEMENTS`` each.
`global_attention` routes between this kernel, `attnzoo.functional.attend` (fused
SDPA when the head dims agree; the math path when fusion is switched off or the weights are asked
for) and nothing else.

Double backward (``create_graph=True``) recomputes ``softmax(scale * q k^T) v`` with plain ops in
backward (`_plain_attention`, which keeps the L x S map). Under functorch transforms, ``torch.compile``
and ``torch.jit.trace`` (`attnzoo.kernels.route`),
`global_attention` takes the SDPA path and `blocked_attention` the plain ops.

Shape letters: B batch (times heads), L queries, S keys, d query/key dim, e value dim.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnzoo.functional import attend, fused_enabled
from attnzoo.kernels import choose
from attnzoo.kernels.route import (
    composite_required,
    large_logits,
    recompute_grads,
    rowwise_grads,
    without_autocast,
)
from attnzoo.kernels.softmax import LOG2E

__all__ = ["global_attention", "blocked_attention", "global_kernel", "kernel_choice", "KERNELS"]

# Elements of one score block, over the whole batch: 512 Ki floats = 2 MiB in float32 (64 rows at
# N = 4096, B = 2). On one core of the 2-core target, 2^18-2^19 ran about 10% faster than 2^20-2^21
# (the block and its GEMM panels stay in the 2 MiB L2); larger blocks mean fewer parallel regions,
# which only matters when the cores are shared with other work.
_BLOCK_ELEMENTS = 1 << 19

# Fewest rows per block. Long sequences would otherwise get thin blocks (32 rows at N = 16384),
# whose q k^T GEMMs have too little work per parallel region: at (1, 16384), 2 threads, a quiet
# machine, 128 rows ran fwd+bwd in 1.53 s against 1.73 s for 32 (medians of 7 alternating rounds).
_MIN_BLOCK_ROWS = 128

# Exponents are kept above this floor: below it exp() returns subnormal numbers, and MKL's GEMMs on
# subnormal probabilities run about 10x slower (measured: timm's NonLocalAttn at its kaiming init).
# Entries that low weigh less than exp(-80) of a row's largest, far below float32 resolution.
_EXP_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}
# Both kernels exponentiate in base 2 (q pre-multiplied by `LOG2E`): torch's exp2 ran 2.5x faster
# than exp on 1M floats on both CPU kinds, and the exponentials were a fifth of a SAGAN training step.
_LN2 = math.log(2.0)

_threads = torch.get_num_threads  # indirection, so tests can pose as a many-core machine

KERNELS = ("auto", "blocked", "sdpa")


def kernel_choice() -> str:
    """The kernel `global_attention` prefers when fused: innermost `global_kernel`,
    else ``ATTNZOO_KERNEL_GLOBAL`` (or the older ``ATTNZOO_GLOBAL_KERNEL``), else ``"auto"``."""
    return choose.override("global")


@contextlib.contextmanager
def global_kernel(choice: str) -> Iterator[None]:
    """Prefer one kernel for CPU global attention inside a ``with`` block (thread-local, nestable).

    Args:
        choice: ``"auto"`` (the faster of the two for the shape class, measured once per process,
            see `attnzoo.kernels.choose`; with ``ATTNZOO_KERNEL_CALIBRATE=0`` the static rule: the
            blocked kernel where the queries are narrower than the values, padded SDPA otherwise),
            ``"blocked"`` (float32/float64 always blocked) or ``"sdpa"`` (always SDPA flash,
            padding the narrower width).
    """
    if choice not in KERNELS:
        raise ValueError(f"global_kernel expects one of {KERNELS}, got {choice!r}")
    with choose.prefer("global", choice):
        yield


def _block_rows(batch: int, length: int) -> int:
    """Rows per block so that a ``batch x rows x length`` block holds about ``_BLOCK_ELEMENTS``."""
    rows = max(_BLOCK_ELEMENTS // max(batch * length, 1), _MIN_BLOCK_ROWS)
    return 1 << (rows.bit_length() - 1)  # a power of two keeps the GEMM kernels on their fast paths


def _plain_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """``softmax(scale * q k^T) v`` with plain differentiable ops: the composite twin of the kernel."""
    low = q.dtype in (torch.float16, torch.bfloat16)
    logits = (q * scale) @ k.transpose(-2, -1)  # (..., L, S)
    return logits.softmax(-1, dtype=torch.float32 if low else None).to(v.dtype) @ v  # (..., L, e)


class _BlockedAttention(torch.autograd.Function):
    """``softmax(scale * q k^T) v`` for 3-D ``(B, L, d)``, ``(B, S, d)``, ``(B, S, e)`` inputs."""

    @staticmethod
    @without_autocast
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, scale: float, block: int | None) -> Tensor:
        batch, length_q, _ = q.shape
        length_k, dim_v = k.shape[1], v.shape[2]
        q_2 = q * (scale * LOG2E)  # logits in base 2: exp2 runs about 2.5x faster than exp on CPU
        k_t = k.transpose(1, 2)  # (B, d, S)
        v_c = v.contiguous()  # (B, S, e): row-major values keep P @ v on MKL's fast path
        rows = min(block or _block_rows(batch, length_k), length_q)
        scores_buf = q.new_empty(batch, rows, length_k)  # reused by every block
        out = q.new_empty(batch, length_q, dim_v)
        sums = q.new_empty(batch, length_q, 1)
        # |logit| <= bound = max |q_i| * max |k_j|. If 2 * bound + log(S) stays above the exponent
        # floor, neither exp(logit) here nor exp(logit - lse) in backward can overflow or go
        # subnormal, so the row maxima (two passes over every block) are not needed: softmax does not
        # depend on the shift. Otherwise shift by the row maxima and clamp at the floor. The bound spans
        # the batch: a NaN in one sample makes it NaN, and then the shift must run (written as `not <=`,
        # which NaN fails), or the other samples' large logits overflow without it.
        floor = _EXP_FLOOR[q.dtype]
        bound = 0.0
        if q.numel() and k.numel():
            bound = abs(scale) * float(q.norm(dim=-1).amax() * k.norm(dim=-1).amax())
        shift = not 2 * bound + math.log(max(length_k, 1)) <= -floor
        maxes = q.new_empty(batch, length_q, 1) if shift else None
        for start in range(0, length_q, rows):
            stop = min(start + rows, length_q)
            s = scores_buf[:, : stop - start]
            torch.bmm(q_2[:, start:stop], k_t, out=s)  # (B, n, S) logits / ln 2
            if maxes is not None:
                torch.amax(s, dim=-1, keepdim=True, out=maxes[:, start:stop])
                s.sub_(maxes[:, start:stop]).clamp_(min=floor * LOG2E)
            s.exp2_()  # = exp(logits - max)
            torch.sum(s, dim=-1, keepdim=True, out=sums[:, start:stop])
            torch.bmm(s, v_c, out=out[:, start:stop])  # (B, n, e), normalised after the loop
        out.div_(sums)
        lse = sums.log_() if maxes is None else sums.log_().add_(maxes, alpha=_LN2)  # (B, L, 1), natural
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.block, ctx.shift = scale, block, shift
        return out

    @staticmethod
    @without_autocast
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        scale, block = ctx.scale, ctx.block
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain ops instead
            needs = ctx.needs_input_grad[:3]
            plain = lambda a, b, c: _plain_attention(a, b, c, scale)  # noqa: E731
            grads = recompute_grads(plain, [q, k, v], grad_out, needs)
            return (*grads, None, None)
        if large_logits(lse):  # exp(logit - lse) would be off: a fresh softmax per block of rows
            rows = lambda a, b, c, start, stop: _plain_attention(a, b, c, scale)  # noqa: E731
            return (*rowwise_grads(rows, q, k, v, grad_out, ctx.needs_input_grad[:3]), None, None)
        batch, length_q, dim_qk = q.shape
        length_k, dim_v = k.shape[1], v.shape[2]
        grad_out = grad_out.contiguous()  # (B, L, e)
        delta = (grad_out * out).sum(dim=-1, keepdim=True)  # (B, L, 1): rowsum(dO * O)
        q_s = (q * scale).contiguous()  # (B, L, d)
        ones = q.new_ones(batch, length_k, 1)
        # [q, -lse] / ln 2: the products give (logits - lse) / ln 2, whose exp2 is P (exp2 is faster)
        q_aug_t = torch.cat([q_s, -lse], dim=-1).mul_(LOG2E).transpose(1, 2).contiguous()  # (B, d+1, L)
        k_aug = torch.cat([k, ones], dim=-1)  # (B, S, d+1)
        g_aug_t = torch.cat([grad_out, -delta], dim=-1).transpose(1, 2).contiguous()  # (B, e+1, L)
        v_aug = torch.cat([v, ones], dim=-1)  # (B, S, e+1)
        k_t = k.transpose(1, 2)  # (B, d, S)
        grad_q_t = q.new_zeros(batch, dim_qk, length_q)  # (B, d, L), accumulated over key blocks
        grad_k = k.new_empty(batch, length_k, dim_qk)
        grad_v = v.new_empty(batch, length_k, dim_v)
        cols = min(block or _block_rows(batch, length_q), length_k)
        p_buf, ds_buf = q.new_empty(batch, cols, length_q), q.new_empty(batch, cols, length_q)
        for start in range(0, length_k, cols):
            stop = min(start + cols, length_k)
            p_t, ds_t = p_buf[:, : stop - start], ds_buf[:, : stop - start]
            torch.bmm(k_aug[:, start:stop], q_aug_t, out=p_t)  # (B, n, L): logits - lse
            if ctx.shift:
                p_t.clamp_(min=_EXP_FLOOR[q.dtype] * LOG2E)
            p_t.exp2_()  # P^T block
            torch.bmm(v_aug[:, start:stop], g_aug_t, out=ds_t)  # (B, n, L): dP^T - D^T
            ds_t.mul_(p_t)  # dS^T block (gradient of the scaled logits)
            torch.bmm(p_t, grad_out, out=grad_v[:, start:stop])
            torch.bmm(ds_t, q_s, out=grad_k[:, start:stop])
            grad_q_t.baddbmm_(k_t[:, :, start:stop], ds_t)
        grad_q = grad_q_t.transpose(1, 2)  # (B, L, d)
        if scale != 1.0:
            grad_q = grad_q * scale
        return grad_q, grad_k, grad_v, None, None


def blocked_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, block: int | None = None) -> Tensor:
    """Exact ``softmax(scale * q k^T) v`` by blocks of rows, recomputed in backward.

    Args:
        q: Queries; any strides (transposed views of convolution outputs are fine).
        k: Keys.
        v: Values; e may differ from d.
        scale: Multiplies the logits.
        block: Rows per block (queries in forward, keys in backward). Default: blocks of about
            ``2**19`` scores over the whole batch (2 MiB in float32), at least 128 rows.

    Returns:
        The output, contiguous ``(..., L, e)``.

    Shape:
        - q: ``(..., L, d)``; k: ``(..., S, d)``; v: ``(..., S, e)`` with the same leading dims.
    """
    if composite_required():  # functorch, compile, tracing: plain ops
        return _plain_attention(q, k, v, float(scale))
    lead = q.shape[:-2]
    q3 = q.reshape(-1, q.shape[-2], q.shape[-1])  # (B, L, d): leading dims folded
    k3 = k.reshape(-1, k.shape[-2], k.shape[-1])  # (B, S, d)
    v3 = v.reshape(-1, v.shape[-2], v.shape[-1])  # (B, S, e)
    out = _BlockedAttention.apply(q3, k3, v3, float(scale), block)
    return out.reshape(*lead, q.shape[-2], v.shape[-1])  # (..., L, e)


def global_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, need_weights: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """One head of global attention, on the fastest exact path that keeps no ``L x S`` matrix.

    - weights asked for, or fusion switched off (`attnzoo.fused_attn`): ``attend``'s math
      path, which materialises and returns the ``(B, L, S)`` weights;
    - float32/float64 on CPU with ``d != e``: `blocked_attention` or the narrower of (q, k)
      and v zero-padded, then SDPA flash (the CPU flash kernel refuses unequal head dims, and
      padding q, k up to e multiplies four of its seven products by e/d), whichever measured
      faster for the shape class in this process (`attnzoo.kernels.choose`, site ``"global"``);
      with ``ATTNZOO_KERNEL_CALIBRATE=0`` (and above 2**26 query-key pairs), the blocked kernel
      when d < e (SAGAN: d = e/8) and padded SDPA when d > e (`_static`);
    - otherwise: ``attend`` on its fused path (SDPA flash on CPU, the GPU kernels elsewhere).

    `global_kernel` (or ``ATTNZOO_KERNEL_GLOBAL``/``ATTNZOO_GLOBAL_KERNEL``) overrides that
    choice: the blocked kernel uses about half the FLOPs of padded flash but runs about seven
    thread hand-offs per block, so which one is faster depends on the CPU (AVX2 or AVX-512) and on
    whether its cores are shared with other work.

    Args:
        q: Queries.
        k: Keys.
        v: Values.
        scale: Multiplies the logits (1.0 for SAGAN and the non-local block).
        need_weights: Also return the ``(B, L, S)`` attention weights. Default: False.

    Returns:
        ``(B, L, e)``, or ``(output, weights)`` with ``need_weights``.

    Shape:
        - q: ``(B, L, d)``; k: ``(B, S, d)``; v: ``(B, S, e)``.
    """
    if not need_weights and fused_enabled():
        # The blocked kernel is for eager CPU runs: its block sizes and shift test read sizes and data,
        # which torch.compile / torch.export / jit.trace cannot follow; they take the SDPA path.
        # Functorch transforms cannot run it either.
        if (
            q.device.type == "cpu"
            and q.dtype in (torch.float32, torch.float64)
            and not composite_required()
            and _choice(q, k, v, scale) == "blocked"
        ):
            return blocked_attention(q, k, v, scale=scale)
        return _padded_sdpa(q, k, v, scale)
    # The math path (fusion off, or the weights asked for): one head, (B, 1, L, S) weights.
    out, weights = attend(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=scale, need_weights=True)
    return (out.squeeze(1), weights.squeeze(1)) if need_weights else out.squeeze(1)


_CALIBRATE_MAX_PAIRS = 1 << 26  # query-key pairs (B * L * S) up to which the kernels are measured


def _static(q: Tensor, v: Tensor) -> str:
    """The validated static rule (2026-12-07, alternating runs on both machine kinds, with the base-2
    exponentials): narrow queries and keys (d < e, SAGAN) take the blocked kernel, 0.67-0.87 of
    padded SDPA's training step at N = 1k-4k on AVX-512 and 0.67-0.95 on AVX2 (level at N = 16k),
    0.69-0.94 in inference; wide ones (d > e, the Gaussian non-local's reverse) take padded SDPA, which
    was 1.07-1.48 times faster there."""
    return "blocked" if q.shape[-1] < v.shape[-1] else "sdpa"


def _choice(q: Tensor, k: Tensor, v: Tensor, scale: float) -> str:
    """``"blocked"`` or ``"sdpa"`` for CPU float32/float64 inputs (`attnzoo.kernels.choose`)."""
    forced = kernel_choice()
    if forced != "auto":
        return forced
    small, large = sorted((q.shape[-1], v.shape[-1]))
    if small == large:  # SDPA flash takes the inputs as they are
        return "sdpa"
    if q.shape[0] * q.shape[1] * k.shape[1] > _CALIBRATE_MAX_PAIRS:
        # Measuring would cost seconds to minutes on the first call (two runs of each kernel at
        # this size): the static choice stands.
        return _static(q, v)
    train = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    needs = [t.requires_grad for t in (q, k, v)] if train else False
    key = (*(choose.bucket(n) for n in (q.shape[0], q.shape[1], k.shape[1], small, large)),
           q.shape[-1] < v.shape[-1], q.dtype, train)
    candidates = {
        "blocked": choose.workload(lambda a, b, c: blocked_attention(a, b, c, scale=scale), (q, k, v), needs),
        "sdpa": choose.workload(lambda a, b, c: _padded_sdpa(a, b, c, scale), (q, k, v), needs),
    }
    elements = q.numel() + k.numel() + v.numel()
    return choose.choose("global", key, candidates, static=_static(q, v), elements=elements, device=q.device)


def _padded_sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """``attend``'s fused path; on CPU the narrower of (q, k) and v zero-padded to one head dim."""
    dim_qk, dim_v = q.shape[-1], v.shape[-1]
    if q.device.type != "cpu" or dim_qk == dim_v:
        return _fused(q, k, v, scale)
    # The CPU flash kernel takes one head dim: zero-pad the narrower side ([q, 0] . [k, 0] = q . k).
    if dim_qk < dim_v:
        return _fused(F.pad(q, (0, dim_v - dim_qk)), F.pad(k, (0, dim_v - dim_qk)), v, scale)
    return _fused(q, k, F.pad(v, (0, dim_qk - dim_v)), scale)[..., :dim_v]


def _fused(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """``attend`` on SDPA, with the queries split into heads when the batch cannot fill the threads.

    The CPU flash kernel parallelises its backward over batch x heads only, so one image would
    train on one core; chunks of at least 512 queries, posed as heads over shared (expanded, not
    copied) keys and values, give every thread a share. Each query row is computed exactly as before.
    """
    batch, length_q, dim = q.shape
    chunks = 1
    # Not while torch.compile traces: reading the thread count is a graph break (fullgraph=True
    # failed in training), and the compiled graph keeps whatever split it was traced with.
    if (q.device.type == "cpu" and not torch.compiler.is_compiling() and torch.is_grad_enabled()
            and any(t.requires_grad for t in (q, k, v))):
        chunks = max(min(_threads() // batch, length_q // 512), 1)
    rows = -(-length_q // chunks)
    if chunks > 1 and rows * chunks != length_q:
        q = F.pad(q, (0, 0, 0, rows * chunks - length_q))  # padded queries are computed, then dropped
    q4 = q.reshape(batch, chunks, rows, dim)  # (B, chunks, rows, d): query chunks as heads
    k4 = k.unsqueeze(1).expand(-1, chunks, -1, -1)  # (B, chunks, S, d), no copy
    v4 = v.unsqueeze(1).expand(-1, chunks, -1, -1)  # (B, chunks, S, e)
    # SDPA's fused kernels need the last dim contiguous, or they silently take the math path.
    q4, k4, v4 = (t if t.stride(-1) == 1 else t.contiguous() for t in (q4, k4, v4))
    out = attend(q4, k4, v4, scale=scale)  # (B, chunks, rows, e)
    return out.reshape(batch, chunks * rows, -1)[:, :length_q]  # (B, L, e)
